"""Sampling benchmark: the guided sampler against its floor and the usual alternatives.

    .venv/bin/python bench/bench_sampling.py                     # defaults: 32 images, 25 steps, w = 2
    .venv/bin/python bench/bench_sampling.py --batch 64 --steps 50 --repeats 5 \
        --checkpoint outputs/runs/fashion_mnist_demo

Every row is the median of --repeats runs in this process, same network, same batch,
the runs of the variants interleaved (round-robin) so that machine noise hits them alike:

  floor        the network's forward passes alone (steps × 2B rows), run the way the
               platform runs it (cfgd.sampling.checkpoint_sampler.eps_fn_of: on CPU channels-last, calls of
               at most 32 rows), no sampler
  platform     cfgd.diffusion.solvers.sample (DDIM, CFG with w) over that eps_fn
  platform-dpm the same with DPM-Solver++(2M)
  floor-plain  the forward passes with the network as loaded (NCHW, one 2B-row call)
  plain        the platform over the network as loaded: the platform before issue 6's
               CPU execution settings
  naive        two separate forward calls per step (B rows each) + the same DDIM update
  diffusers    Hugging Face DDIMScheduler with the pipelines' CFG loop (cat([x]*2), chunk(2))
  diffusers-dpm  the same loop with DPMSolverMultistepScheduler (dpmsolver++, order 2)
  interval     the platform with a guidance interval covering half of the steps

naive and diffusers drive the network as loaded, as a user's own loop would.
--text compares a text-conditioned model (a transformer text encoder, cross-attention
at the attention levels) with the label model of the same size: the cost per step of
each floor, the cross-attention's share, and the platform sampler over the text model
(prompts encoded once per batch) against its floor.

Then every solver × guidance rule against the floor (--skip-rules to skip), scaling in
batch size and steps, 5 w values batched together vs 5 runs, and the peak memory of
sampling with 10 vs 250 steps (separate processes).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform as _platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

from cfgd.diffusion.plan import Guidance, SamplingPlan, Solver
from cfgd.diffusion.process import make_schedule
from cfgd.diffusion.solvers import ddim_coefficients, ddim_timesteps, sample
from cfgd.model.unet import ModelSpec, build_model
from cfgd.sampling.checkpoint_sampler import CheckpointSampler, eps_fn_of, prepare_network
from cfgd.spec import null_label

# The rules table: (name, Guidance fields); autoguidance uses the same network as its
# guide (a second network of the same size costs the same).
RULE_ROWS = [("cfg", {"w": 2.0}), ("cfg++", {"rule": "cfg++", "lam": 0.6}),
             ("apg", {"rule": "apg", "w": 2.0, "apg_beta": -0.5, "apg_r": 15.0, "apg_eta": 0.0}),
             ("cfg_zero_star", {"rule": "cfg_zero_star", "w": 2.0}),
             ("autoguidance", {"rule": "autoguidance", "w": 2.0, "guide": "self"}),
             ("cfg+cosine", {"w": 2.0, "weight_schedule": "cosine"}), ("cfg+threshold", {"w": 2.0, "threshold": 0.995})]


def run_plan(eps_fn, schedule, labels, seeds, shape, null, steps, w=None, solver="ddim", interval=None,
             guidance: dict | None = None):
    """cfgd.diffusion.solvers.sample with one guidance for every row (w: a number or one per row)."""
    B = len(seeds)
    ws = w if isinstance(w, (list, tuple)) else [w] * B
    fields = guidance or {}
    rows = tuple(Guidance(**{"w": v, "interval": interval, **fields}) for v in ws) if w is not None \
        else (Guidance(interval=interval, **fields),) * B
    plan = SamplingPlan(solver=Solver(name=solver, steps=steps), rows=rows)
    return sample(eps_fn, schedule, labels, seeds, shape, plan, null_label=null, guides={"self": eps_fn})


@dataclass
class Net:
    """The network under test: as the platform runs it (eps_fn) and as loaded (model, NCHW)."""

    model: torch.nn.Module
    eps_fn: object
    shape: tuple
    num_classes: int
    schedule: object


def load_net(checkpoint: str | None) -> Net:
    """The checkpoint as ``CheckpointSampler.load`` sets it up; an untrained small UNet without one."""
    if checkpoint:
        gen = CheckpointSampler.load(checkpoint)
        model = copy.deepcopy(gen.model).to(memory_format=torch.contiguous_format)
        return Net(model, gen.eps_fn(), gen.shape, gen.num_classes, gen.schedule())
    torch.manual_seed(0)
    model = build_model(ModelSpec("small", 28, 1, 10)).eval()
    fast = eps_fn_of(*prepare_network(copy.deepcopy(model), "cpu"))
    return Net(model, fast, (1, 28, 28), 10, make_schedule("cosine", 1000))


def median_times(fns: dict, repeats: int) -> dict[str, float]:
    """Median wall time of each callable over ``repeats`` rounds, the callables interleaved."""
    for fn in fns.values():
        fn()  # warm-up: first calls pay for allocator growth and kernel selection
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in times.items()}


def median_time(fn, repeats: int) -> float:
    return median_times({"": fn}, repeats)[""]


def variants(net: Net, B: int, steps: int, w: float):
    shape, schedule, null = net.shape, net.schedule, null_label(net.num_classes)
    labels = torch.arange(B) % net.num_classes
    seeds = list(range(B))
    ts = ddim_timesteps(schedule.T, steps, "trailing")
    eps_fn, model = net.eps_fn, net.model
    plain_eps = eps_fn_of(model)  # the network as loaded: NCHW, every row in one call

    def floor_of(fn):
        @torch.inference_mode()
        def floor():
            x = torch.randn(2 * B, *shape)
            y = torch.cat([labels, torch.full((B,), null)])
            for t in ts:
                fn(x, torch.full((2 * B,), t), y)
        return floor

    def platform_(interval=None, fn=eps_fn, solver="ddim"):
        run_plan(fn, schedule, labels, seeds, shape, null, steps, w=w, solver=solver, interval=interval)

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

    def diffusers_dpm():
        from diffusers import DPMSolverMultistepScheduler

        sched = DPMSolverMultistepScheduler(num_train_timesteps=schedule.T, trained_betas=schedule.betas.tolist(),
                                            algorithm_type="dpmsolver++", solver_order=2, lower_order_final=True,
                                            final_sigmas_type="zero", timestep_spacing="trailing")
        sched.set_timesteps(steps)
        nulls = torch.full((B,), null)
        with torch.inference_mode():
            x = torch.randn(B, *shape)
            for t in sched.timesteps:
                out = model(torch.cat([x] * 2), torch.full((2 * B,), int(t) + 1), torch.cat([labels, nulls]))
                ec, eu = out.chunk(2)
                x = sched.step(eu + (1 + w) * (ec - eu), t, x).prev_sample

    half = (ts[steps // 2 - 1] if steps > 1 else ts[0], schedule.T)  # the noisiest half of the steps
    out = {"floor": floor_of(eps_fn), "platform": platform_, "platform-dpm": lambda: platform_(solver="dpm++2m"),
           "floor-plain": floor_of(plain_eps), "plain": lambda: platform_(fn=plain_eps), "naive": naive,
           "diffusers": diffusers_, "diffusers-dpm": diffusers_dpm, "interval": lambda: platform_(interval=half)}
    try:
        import diffusers  # noqa: F401
    except ImportError:
        print("diffusers is not installed (pip install -e '.[bench]'): skipping that row")
        del out["diffusers"], out["diffusers-dpm"]
    return out


def rules_table(net: Net, B: int, steps: int, repeats: int) -> None:
    """Each solver × rule against the floor (2B network rows per step, no sampler)."""
    shape, schedule, null = net.shape, net.schedule, null_label(net.num_classes)
    labels, seeds = torch.arange(B) % net.num_classes, list(range(B))
    ts = ddim_timesteps(schedule.T, steps, "trailing")

    @torch.inference_mode()
    def floor():
        x = torch.randn(2 * B, *shape)
        y = torch.cat([labels, torch.full((B,), null)])
        for t in ts:
            net.eps_fn(x, torch.full((2 * B,), t), y)

    fns = {"floor": floor}
    for solver in ("ddim", "dpm++2m"):
        for name, fields in RULE_ROWS:
            if name == "cfg++" and solver != "ddim":
                continue  # CFG++ is defined for DDIM only
            fns[f"{solver} {name}"] = (lambda s=solver, f=fields: run_plan(
                net.eps_fn, schedule, labels, seeds, shape, null, steps, solver=s, guidance=f))
    times = median_times(fns, repeats)
    print(f"\nsolver × rule ({B} images, {steps} steps; floor {times['floor']:.3f} s):")
    print(f"  {'solver rule':<26} {'seconds':>8} {'/ floor':>8}")
    for name, t in times.items():
        if name != "floor":
            print(f"  {name:<26} {t:8.3f} {t / times['floor']:8.3f}")


def text_vs_label(net: Net, B: int, steps: int, repeats: int, text_checkpoint: str | None) -> None:
    """Per-step cost of the text model against the label model, and the sampler over it."""
    from cfgd.diffusion.plan import Condition
    from cfgd.sampling.row_conditions import encode_rows

    if text_checkpoint:
        gen = CheckpointSampler.load(text_checkpoint)
    else:
        from cfgd.data.tokenizer import build
        from cfgd.io.checkpoint import Checkpoint

        torch.manual_seed(0)
        tok = build([f"a {a} {c}" for a in ("dark", "light", "small", "large", "plain", "patterned")
                     for c in ("dress", "bag", "shirt", "coat", "sandal", "sneaker", "trouser", "pullover")])
        spec = ModelSpec("small", 28, 1, 10, condition="text", vocab_size=tok.vocab_size, max_tokens=tok.max_tokens)
        model, rows, nhwc = prepare_network(build_model(spec).eval(), "cpu")
        meta = {"model": spec.to_dict(), "tokenizer": tok.to_json(), "step": 0,
                "config": {"diffusion": {"schedule": "cosine", "timesteps": 1000}}}
        gen = CheckpointSampler(Checkpoint("untrained", meta), model, torch.device("cpu"), rows, nhwc)
    prompts = [Condition(prompt=f"a {['dark', 'light', 'small', 'large'][i % 4]} dress") for i in range(B)]
    schedule, text_eps = gen.schedule(), gen.eps_fn()
    ts = ddim_timesteps(schedule.T, steps, "trailing")
    labels, null = torch.arange(B) % net.num_classes, null_label(net.num_classes)
    cond, uncond, _ = encode_rows(gen.checkpoint, gen.model, prompts, gen.device)

    @torch.inference_mode()
    def floor(eps_fn, y):
        x = torch.randn(2 * B, *net.shape)
        for t in ts:
            eps_fn(x, torch.full((2 * B,), t), y)

    from cfgd.diffusion import conditions as cond_ops

    both = cond_ops.cat([cond, uncond])
    plan = SamplingPlan(solver=Solver(steps=steps), rows=(Guidance(w=2.0),) * B)

    def platform_text():
        c, u, _ = encode_rows(gen.checkpoint, gen.model, prompts, gen.device)  # once per batch, timed with it
        sample(text_eps, schedule, c, list(range(B)), gen.shape, plan, uncond=u)

    times = median_times({"label floor": lambda: floor(net.eps_fn, torch.cat([labels, torch.full((B,), null)])),
                          "text floor": lambda: floor(text_eps, both), "text platform": platform_text}, repeats)
    lf, tf, tp = times["label floor"], times["text floor"], times["text platform"]
    print(f"\ntext vs label model ({B} images, {steps} DDIM steps, w = 2; {gen.checkpoint.path}):")
    print(f"  label floor   {lf:7.3f} s  {lf / steps * 1000:7.1f} ms/step")
    print(f"  text floor    {tf:7.3f} s  {tf / steps * 1000:7.1f} ms/step  (text / label {tf / lf:.3f}: the "
          f"cross-attention and the pooled vector cost {100 * (tf - lf) / tf:.0f} % of a text step)")
    print(f"  text platform {tp:7.3f} s  / text floor {tp / tf:.3f}   (target <= 1.05; includes encoding the prompts)")


def mem_child(steps: int, checkpoint: str | None, B: int) -> None:
    net = load_net(checkpoint)
    nc = net.num_classes
    run_plan(net.eps_fn, net.schedule, torch.arange(B) % nc, list(range(B)), net.shape, null_label(nc), steps, w=2.0)
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
    ap.add_argument("--skip-rules", action="store_true")
    ap.add_argument("--text", action="store_true", help="only the text-vs-label model comparison")
    ap.add_argument("--text-checkpoint", default=None, help="a text model for --text (default: an untrained one)")
    ap.add_argument("--mem-child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.mem_child is not None:
        mem_child(args.mem_child, args.checkpoint, args.batch)
        return

    net = load_net(args.checkpoint)
    shape, nc, schedule = net.shape, net.num_classes, net.schedule
    B, steps = args.batch, args.steps
    if args.text:
        text_vs_label(net, B, steps, args.repeats, args.text_checkpoint)
        return
    print(f"machine: {_platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}; image {shape}, batch {B}, {steps} DDIM steps, w = {args.w}, "
          f"median of {args.repeats} interleaved rounds\n")
    times = median_times(variants(net, B, steps, args.w), args.repeats)
    print(f"{'variant':<12} {'seconds':>8} {'images/s':>9}")
    for name, t in times.items():
        print(f"{name:<12} {t:8.3f} {B / t:9.2f}")
    print(f"\nplatform / floor              {times['platform'] / times['floor']:.3f}   (target <= 1.05)")
    print(f"platform-dpm / floor          {times['platform-dpm'] / times['floor']:.3f}   (target <= 1.05)")
    print(f"plain / floor-plain           {times['plain'] / times['floor-plain']:.3f}")
    print(f"plain / platform              {times['plain'] / times['platform']:.3f}   (speed-up of the CPU settings)")
    if "diffusers" in times:
        print(f"diffusers / platform          {times['diffusers'] / times['platform']:.3f}   (> 1: platform faster)")
        print(f"diffusers / plain             {times['diffusers'] / times['plain']:.3f}   (same network calls)")
        print(f"diffusers-dpm / platform-dpm  {times['diffusers-dpm'] / times['platform-dpm']:.3f}   (> 1: platform faster)")
    print(f"naive / platform              {times['naive'] / times['platform']:.3f}")
    print(f"full / interval (half)        {times['platform'] / times['interval']:.3f}   (expected ~1.33)")
    if not args.skip_rules:
        rules_table(net, B, steps, args.repeats)
    if args.skip_scale:
        return

    eps_fn, null = net.eps_fn, null_label(nc)

    def run(b, s, w=args.w):
        return lambda: run_plan(eps_fn, schedule, torch.arange(b) % nc, list(range(b)), shape, null, s, w=w)

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
    together = median_time(lambda: run_plan(
        eps_fn, schedule, torch.arange(per * len(ws)) % nc, list(range(per * len(ws))), shape, null, steps,
        w=[w for w in ws for _ in range(per)]), 1)
    separate = median_time(lambda: [run(per, steps, w)() for w in ws], 1)
    print(f"sweep of 5 w values x {per} images: batched {together:.3f} s, 5 separate runs {separate:.3f} s "
          f"(ratio {separate / together:.2f})")
    m10, m250 = peak_memory(10, args), peak_memory(250, args)
    print(f"peak RSS of a sampling process: 10 steps {m10:.0f} MiB, 250 steps {m250:.0f} MiB "
          f"(ratio {m250 / m10:.3f}, target within 1.10)")


if __name__ == "__main__":
    main()
