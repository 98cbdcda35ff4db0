"""Sampling benchmark: the guided sampler against its floor and the usual alternatives.

    .venv/bin/python bench/bench_sampling.py                     # defaults: 32 images, 25 steps, w = 2
    .venv/bin/python bench/bench_sampling.py --batch 64 --steps 50 --repeats 5 \
        --checkpoint outputs/runs/fashion_mnist_demo

Every row is the median of --repeats runs in this process, same network, same batch:

  floor       the network's forward passes alone (steps × 2B rows), no sampler
  platform    cfgd.sampling.ddim_sample with w (one 2B-row forward per step)
  naive       two separate forward calls per step (B rows each) + the same DDIM update
  diffusers   Hugging Face DDIMScheduler with the pipelines' CFG loop (cat([x]*2), chunk(2))
  interval    the platform with a guidance interval covering half of the steps

then scaling in batch size and steps, 5 w values batched together vs 5 runs, and the
peak memory of sampling with 10 vs 250 steps (separate processes).
"""

from __future__ import annotations

import argparse
import json
import platform as _platform
import resource
import statistics
import subprocess
import sys
import time

import torch

from cfgd.diffusion import make_schedule
from cfgd.generate import Generator, eps_fn_of
from cfgd.guidance import null_label
from cfgd.model import ModelSpec, build_model
from cfgd.sampling import ddim_coefficients, ddim_sample, ddim_timesteps


def load_model(checkpoint: str | None):
    if checkpoint:
        gen = Generator.load(checkpoint)
        d = gen.checkpoint.meta["config"]["diffusion"]
        return gen.model, gen.shape, gen.num_classes, make_schedule(d["schedule"], d["timesteps"])
    torch.manual_seed(0)
    model = build_model(ModelSpec("small", 28, 1, 10)).eval()
    return model, (1, 28, 28), 10, make_schedule("cosine", 1000)


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up: first calls pay for allocator growth and kernel selection
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def variants(model, shape, num_classes, schedule, B: int, steps: int, w: float):
    null = null_label(num_classes)
    labels = torch.arange(B) % num_classes
    seeds = list(range(B))
    ts = ddim_timesteps(schedule.T, steps, "trailing")
    eps_fn = eps_fn_of(model)

    @torch.inference_mode()
    def floor():
        x = torch.randn(2 * B, *shape)
        y = torch.cat([labels, torch.full((B,), null)])
        for t in ts:
            model(x, torch.full((2 * B,), t), y)

    def platform_(interval=None):
        ddim_sample(eps_fn, schedule, labels, seeds, shape, steps=steps, w=w, null_label=null, interval=interval)

    coefs = ddim_coefficients(schedule, ts, 0.0)

    @torch.inference_mode()
    def naive():
        x = torch.randn(B, *shape)
        nulls = torch.full((B,), null)
        for t, (sa, s1a, sa_p, dir_p, _) in zip(ts, coefs):
            tt = torch.full((B,), t)
            ec, eu = model(x, tt, labels), model(x, tt, nulls)
            eps = eu + (1 + w) * (ec - eu)
            x0 = (x - s1a * eps) / sa
            x = sa_p * x0 + dir_p * eps

    def diffusers_():
        from diffusers import DDIMScheduler

        sched = DDIMScheduler(num_train_timesteps=schedule.T, beta_schedule="squaredcos_cap_v2",
                              clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing")
        sched.set_timesteps(steps)
        nulls = torch.full((B,), null)
        with torch.inference_mode():
            x = torch.randn(B, *shape)
            for t in sched.timesteps:
                xin = torch.cat([x] * 2)
                # diffusers counts timesteps from 0; cfgd's network was trained on 1..T.
                out = model(xin, torch.full((2 * B,), int(t) + 1), torch.cat([labels, nulls]))
                ec, eu = out.chunk(2)
                x = sched.step(eu + (1 + w) * (ec - eu), t, x).prev_sample

    half = (ts[steps // 2 - 1] if steps > 1 else ts[0], schedule.T)  # the noisiest half of the steps
    out = {"floor": floor, "platform": platform_, "naive": naive, "diffusers": diffusers_,
           "interval": lambda: platform_(interval=half)}
    try:
        import diffusers  # noqa: F401
    except ImportError:
        print("diffusers is not installed (pip install -e '.[bench]'): skipping that row")
        del out["diffusers"]
    return out


def mem_child(steps: int, checkpoint: str | None, B: int) -> None:
    model, shape, nc, schedule = load_model(checkpoint)
    ddim_sample(eps_fn_of(model), schedule, torch.arange(B) % nc, list(range(B)), shape, steps=steps, w=2.0,
                null_label=null_label(nc))
    print(json.dumps({"maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def peak_memory(steps: int, args) -> float:
    cmd = [sys.executable, __file__, "--mem-child", str(steps), "--batch", str(args.batch)]
    if args.checkpoint:
        cmd += ["--checkpoint", args.checkpoint]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    return json.loads(out)["maxrss_mib"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--w", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--checkpoint", default=None, help="checkpoint or run dir (default: an untrained small UNet)")
    ap.add_argument("--skip-scale", action="store_true")
    ap.add_argument("--mem-child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.mem_child is not None:
        mem_child(args.mem_child, args.checkpoint, args.batch)
        return

    model, shape, nc, schedule = load_model(args.checkpoint)
    B, steps = args.batch, args.steps
    print(f"machine: {_platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}; "
          f"image {shape}, batch {B}, {steps} DDIM steps, w = {args.w}, median of {args.repeats}\n")
    times = {name: median_time(fn, args.repeats) for name, fn in variants(model, shape, nc, schedule, B, steps,
                                                                         args.w).items()}
    print(f"{'variant':<11} {'seconds':>8} {'images/s':>9}")
    for name, t in times.items():
        print(f"{name:<11} {t:8.3f} {B / t:9.2f}")
    print(f"\nplatform / floor            {times['platform'] / times['floor']:.3f}   (target <= 1.05)")
    if "diffusers" in times:
        print(f"diffusers / platform        {times['diffusers'] / times['platform']:.3f}   (> 1: platform faster)")
    print(f"naive / platform            {times['naive'] / times['platform']:.3f}")
    print(f"full / interval (half)      {times['platform'] / times['interval']:.3f}   (expected ~1.33)")
    if args.skip_scale:
        return

    eps_fn, null = eps_fn_of(model), null_label(nc)

    def run(b, s, w=args.w):
        return lambda: ddim_sample(eps_fn, schedule, torch.arange(b) % nc, list(range(b)), shape, steps=s, w=w,
                                   null_label=null)

    print("\nscale in batch size (10 steps):")
    base = None
    for b in (1, 8, 64, 256):
        t = median_time(run(b, 10), 1)
        base = base or t
        print(f"  batch {b:>4}: {t:7.3f} s  {b * 10 / t:8.1f} image-steps/s")
    print("scale in steps (batch 8):")
    for s in (10, 50, 250):
        t = median_time(run(8, s), 1)
        print(f"  steps {s:>4}: {t:7.3f} s  {t / s * 1000:7.1f} ms/step")
    ws = [0.0, 0.5, 1.0, 2.0, 4.0]
    per = max(1, B // len(ws))
    together = median_time(lambda: ddim_sample(
        eps_fn, schedule, torch.arange(per * len(ws)) % nc, list(range(per * len(ws))), shape, steps=steps,
        w=torch.tensor([w for w in ws for _ in range(per)]), null_label=null), 1)
    separate = median_time(lambda: [run(per, steps, w)() for w in ws], 1)
    print(f"sweep of 5 w values x {per} images: batched {together:.3f} s, 5 separate runs {separate:.3f} s "
          f"(ratio {separate / together:.2f})")
    m10, m250 = peak_memory(10, args), peak_memory(250, args)
    print(f"peak RSS of a sampling process: 10 steps {m10:.0f} MiB, 250 steps {m250:.0f} MiB "
          f"(ratio {m250 / m10:.3f}, target within 1.10)")


if __name__ == "__main__":
    main()
