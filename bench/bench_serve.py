"""Serving throughput and latency: HTTP through Serve vs ``CheckpointSampler.sample`` in-process.

    .venv/bin/python bench/bench_serve.py --checkpoint outputs/runs/fashion_mnist_demo
    .venv/bin/python bench/bench_serve.py             # a tiny random 8x8 checkpoint

Starts its own local Ray (never joins another cluster) and Serve on a free port of
127.0.0.1, then measures, with the same torch threads everywhere:

1. in-process: ``CheckpointSampler.sample`` on batches of ``max_batch_size × num_images`` rows
   (the most one Serve batch holds) — the ceiling;
2. HTTP, batching on: ``clients`` concurrent clients, each sending its next request as
   soon as the last one returns, for ``duration`` seconds;
3. HTTP, batching off (``max_batch_size = 1``), with the default row padding and
   without it (padding makes a lone image cost a 16-row forward pass).

images/s (HTTP) ÷ images/s (in-process) is the Serve overhead at saturation.
"""

from __future__ import annotations

import argparse
import json
import asyncio
import logging
import os
import random
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # serve.app


HEADERS: dict[str, str] = {}  # the API token header, with --token

def tiny_checkpoint(directory: Path) -> str:
    from cfgd.config import Config, to_dict
    from cfgd.io.checkpoint import write_checkpoint
    from cfgd.model.unet import ModelSpec, build_model

    torch.manual_seed(0)
    model = build_model(ModelSpec("tiny", image_size=8, in_channels=1, num_classes=10)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return str(write_checkpoint(directory / "tiny", model_state=model.state_dict(), ema_state=model.state_dict(),
                                optimizer_state=None, spec=model.spec, label_names=[str(i) for i in range(10)],
                                step=0, epoch=0, config=to_dict(Config())))


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def bench_in_process(checkpoint: str, args) -> dict:
    from cfgd import serving
    from cfgd.diffusion.plan import Guidance, SamplingPlan, Solver

    torch.set_num_threads(args.threads)
    gen = serving.load_sampler(checkpoint, None, args.pad_rows)
    rows = args.max_batch_size * args.num_images
    rng = random.Random(0)

    def once():
        labels = [rng.randrange(gen.num_classes) for _ in range(rows)]
        ws = [rng.uniform(0, 4) for _ in range(rows)]
        seeds = [rng.randrange(2**31) for _ in range(rows)]
        plan = SamplingPlan(solver=Solver(steps=args.steps), rows=tuple(Guidance(w=w) for w in ws))
        return gen.sample(labels, seeds, plan, batch_size=rows)

    once()  # warm-up
    times, start = [], time.perf_counter()
    while time.perf_counter() - start < args.duration / 2 or len(times) < 2:
        t = time.perf_counter()
        once()
        times.append(time.perf_counter() - t)
    total = time.perf_counter() - start
    return {"images_s": rows * len(times) / total, "p50": percentile(times, 50), "p99": percentile(times, 99),
            "batch": args.max_batch_size}


async def http_load(url: str, args, num_classes: int) -> dict:
    import aiohttp

    latencies, images = [], 0
    deadline = time.perf_counter() + args.duration
    rng = random.Random(1)

    async def client(session):
        nonlocal images
        while time.perf_counter() < deadline:
            body = {"class_label": rng.randrange(num_classes), "w": rng.uniform(0, 4),
                    "seed": rng.randrange(2**31), "steps": args.steps, "num_images": args.num_images}
            t = time.perf_counter()
            async with session.post(url + "/generate", json=body, headers=HEADERS) as r:
                payload = await r.json()
                if r.status != 200:
                    raise RuntimeError(f"HTTP {r.status}: {payload}")
            latencies.append(time.perf_counter() - t)
            images += len(payload["images"])

    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=args.clients), timeout=timeout) as s:
        start = time.perf_counter()
        await asyncio.gather(*(client(s) for _ in range(args.clients)))
        total = time.perf_counter() - start
    return {"images_s": images / total, "p50": percentile(latencies, 50), "p99": percentile(latencies, 99),
            "requests": len(latencies)}


def bench_guard(n: int = 20000) -> str:
    """Cost of cfgd.serving.guard.Guard per request, in-process on a trivial ASGI app (µs)."""
    from cfgd.serving.guard import Guard

    async def app(scope, receive, send):
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    body = json.dumps({"class_label": 1, "w": 2.0, "seed": 3, "steps": 10}).encode()

    async def run(handler) -> float:
        async def send(message):
            pass

        t = time.perf_counter()
        for _ in range(n):
            msgs = [{"type": "http.request", "body": body, "more_body": False}]

            async def receive():
                return msgs.pop() if msgs else {"type": "http.disconnect"}

            scope = {"type": "http", "path": "/generate", "root_path": "", "client": ("127.0.0.1", 5000),
                     "headers": [(b"content-type", b"application/json"),
                                 (b"content-length", str(len(body)).encode()), (b"authorization", b"Bearer " + b"a" * 64)]}
            await handler(scope, receive, send)
        return (time.perf_counter() - t) / n * 1e6

    bare = asyncio.run(run(app))
    tok = asyncio.run(run(Guard(app, tokens=(b"a" * 64, b"b" * 64))))
    loop = asyncio.run(run(Guard(app, tokens=())))
    return (f"guard per request: bare ASGI app {bare:.1f} us; with the token check (2 tokens) {tok:.1f} us; "
            f"no token (loopback check) {loop:.1f} us")


def bench_http(checkpoint: str, args, url: str, max_batch_size: int, pad_rows: int, num_classes: int) -> dict:
    import requests
    from ray import serve

    from serve.app import Ingress, Sampler

    settings = {"checkpoints": {"bench": checkpoint}, "default_checkpoint": "bench", "max_images": args.num_images,
                "max_batch_size": max_batch_size, "batch_wait_timeout_s": args.batch_wait, "pad_rows": pad_rows,
                "torch_threads": args.threads}
    sampler = Sampler.options(user_config=settings, ray_actor_options={"num_cpus": 1},
                              max_ongoing_requests=max(args.clients, max_batch_size))
    serve.run(Ingress.bind(sampler.bind()), name="bench", route_prefix="/")
    warm = {"class_label": 0, "steps": args.steps, "num_images": args.num_images}
    for _ in range(2):
        requests.post(url + "/generate", json=warm, timeout=600, headers=HEADERS).raise_for_status()
    before = requests.get(url + "/stats", timeout=60, headers=HEADERS).json()
    result = asyncio.run(http_load(url, args, num_classes))
    after = requests.get(url + "/stats", timeout=60, headers=HEADERS).json()
    batches = after["batches"] - before["batches"]
    result["batch"] = (after["requests"] - before["requests"]) / max(batches, 1)
    serve.delete("bench")
    return result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default="", help="checkpoint or run dir (default: a tiny random 8x8 model)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--duration", type=float, default=20.0, help="seconds of load per HTTP mode")
    p.add_argument("--num-images", type=int, default=1, help="images per request")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--batch-wait", type=float, default=0.05, help="batch_wait_timeout_s")
    p.add_argument("--pad-rows", type=int, default=16)
    p.add_argument("--threads", type=int, default=1, help="torch threads in-process and per replica")
    p.add_argument("--token", action="store_true", help="require an API token (CFGD_API_TOKEN) and send it")
    args = p.parse_args(argv)
    if args.token:  # before ray.init: the replicas inherit the environment
        import secrets

        os.environ["CFGD_API_TOKEN"] = secrets.token_hex(32)
        HEADERS["Authorization"] = "Bearer " + os.environ["CFGD_API_TOKEN"]

    import ray
    from ray import serve

    from cfgd.sampling.checkpoint_sampler import CheckpointSampler

    checkpoint = args.checkpoint or tiny_checkpoint(Path(tempfile.mkdtemp(prefix="cfgd-bench-")))
    checkpoint = os.path.abspath(checkpoint)
    gen = CheckpointSampler.load(checkpoint)
    s = gen.checkpoint.spec
    print(f"checkpoint {checkpoint}: {s.size} {s.image_size}x{s.image_size}x{s.in_channels}, "
          f"{s.num_classes} classes; {args.steps} DDIM steps, guided (w in [0, 4]), "
          f"{args.num_images} image(s)/request, torch threads {args.threads}, {os.cpu_count()} cores", flush=True)

    print(bench_guard(), flush=True)
    rows = [("in-process CheckpointSampler.sample", "-", bench_in_process(checkpoint, args))]
    print(f"in-process done: {rows[-1][2]['images_s']:.1f} images/s", flush=True)

    # Replica access logs would drown the table: keep them in the session's log files.
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level="error",
             log_to_driver=False)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    try:
        modes = [(f"HTTP, batching on (max {args.max_batch_size})", args.max_batch_size, args.pad_rows),
                 ("HTTP, batching off", 1, args.pad_rows),
                 ("HTTP, batching off, pad_rows 0", 1, 0)]
        for name, mbs, pad in modes:
            rows.append((name, str(args.clients), bench_http(checkpoint, args, url, mbs, pad, s.num_classes)))
            print(f"{name} done: {rows[-1][2]['images_s']:.1f} images/s", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()

    base = rows[0][2]["images_s"]
    print()
    print(f"{'mode':<36} {'clients':>7} {'images/s':>9} {'vs in-proc':>10} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'req/batch':>9}")
    for name, clients, r in rows:
        print(f"{name:<36} {clients:>7} {r['images_s']:>9.2f} {r['images_s'] / base:>10.2f} "
              f"{1000 * r['p50']:>8.0f} {1000 * r['p99']:>8.0f} {r['batch']:>9.1f}")
    print("\nin-process latency is per batch call; HTTP latency is per request (client side).")
    on, off = rows[1][2]["images_s"], rows[2][2]["images_s"]
    print(f"Serve overhead at saturation: HTTP batched / in-process = {on / base:.2f}; "
          f"batching on / off = {on / off:.2f}")


if __name__ == "__main__":
    main()
