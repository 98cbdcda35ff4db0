"""Cost of guidance over two conditions (an image and a class): the sampler against its floor.

For an image-conditioned checkpoint (default: an untrained `small` UNet with a 7×7 image
condition), B images, S DDIM steps:

* **floor k**: the network alone on k·B rows per step (k = 2: the two evaluations of plain
  CFG; k = 3: three condition subsets), with every row's condition already encoded;
* **platform**: ``CheckpointSampler.sample`` for rows that need 2 subsets per step
  (image_scale 1: CFG on the class with the image given) and 3 (image_scale 2, sequential;
  and independent), encoding and image decoding included.

Median of ``--repeats`` interleaved rounds, in one process; ratios only.

    .venv/bin/python bench/bench_two_conditions.py --checkpoint outputs/runs/fashion_mnist_superres
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))

from cfgd.data.images import PNG_MODES, encode_png  # noqa: E402
from cfgd.diffusion import conditions as cond_ops  # noqa: E402
from cfgd.diffusion.guidance import plan_cost  # noqa: E402
from cfgd.diffusion.plan import Condition, Guidance, SamplingPlan, Solver  # noqa: E402
from cfgd.diffusion.solvers import ddim_timesteps  # noqa: E402
from cfgd.io.checkpoint import Checkpoint  # noqa: E402
from cfgd.model.unet import build_model  # noqa: E402
from cfgd.sampling.checkpoint_sampler import CheckpointSampler, prepare_network  # noqa: E402
from cfgd.sampling.row_conditions import encode_rows  # noqa: E402
from cfgd.spec import ModelSpec  # noqa: E402


def untrained() -> CheckpointSampler:
    torch.manual_seed(0)
    spec = ModelSpec("small", 28, 1, 10, cond_channels=1, cond_height=7, cond_width=7)
    model, rows, nhwc = prepare_network(build_model(spec).eval(), "cpu")
    meta = {"model": spec.to_dict(), "step": 0, "label_names": [str(i) for i in range(10)],
            "config": {"diffusion": {"schedule": "cosine", "timesteps": 1000}}}
    return CheckpointSampler(Checkpoint("untrained", meta), model, torch.device("cpu"), rows, nhwc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    gen = CheckpointSampler.load(ROOT / args.checkpoint) if args.checkpoint else untrained()
    spec, B, steps = gen.checkpoint.spec, args.batch, args.steps
    rng = np.random.default_rng(0)
    rows = [Condition(label=i % spec.num_classes,
                      image=encode_png(rng.integers(0, 256, (spec.cond_height, spec.cond_width, spec.cond_channels),
                                                    dtype=np.uint8), PNG_MODES)) for i in range(B)]
    cond, uncond, (c01, c00) = encode_rows(gen.checkpoint, gen.model, rows, gen.device)
    eps_fn, schedule = gen.eps_fn(), gen.schedule()
    ts = ddim_timesteps(schedule.T, steps, "trailing")

    def floor(parts):
        y = cond_ops.cat(parts)

        @torch.inference_mode()
        def run():
            x = torch.randn(len(parts) * B, *gen.shape)
            for t in ts:
                eps_fn(x, torch.full((len(parts) * B,), t), y)
        return run

    plans = {"2 rows (image_scale 1)": Guidance(w=2.0),
             "3 rows (image_scale 2, sequential)": Guidance(w=2.0, image_scale=2.0),
             "3 rows (image_scale 2, independent)": Guidance(w=2.0, image_scale=2.0, combine="independent")}

    def platform(g):
        plan = SamplingPlan(solver=Solver(steps=steps), rows=(g,) * B)
        return lambda: gen.sample(rows, list(range(B)), plan, batch_size=B)

    fns = {"floor 2": floor([cond, uncond]), "floor 3": floor([cond, uncond, c00]),
           **{name: platform(g) for name, g in plans.items()}}
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(args.repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"two conditions ({B} images, {steps} DDIM steps, w = 2; {gen.checkpoint.path}), median of {args.repeats}:")
    for k in ("floor 2", "floor 3"):
        print(f"  {k:38s} {med[k]:7.3f} s  {med[k] / steps * 1000:7.1f} ms/step")
    print(f"  floor 3 / floor 2: {med['floor 3'] / med['floor 2']:.3f}")
    for name, g in plans.items():
        rows_per_image = plan_cost(SamplingPlan(solver=Solver(steps=steps), rows=(g,)), gen.timesteps, ts)[0]
        k = "floor 2" if rows_per_image == 2 * steps else "floor 3"
        print(f"  {name:38s} {med[name]:7.3f} s  {rows_per_image / steps:.0f} rows/step  / {k} "
              f"{med[name] / med[k]:.3f}  (target <= 1.05)")


if __name__ == "__main__":
    main()
