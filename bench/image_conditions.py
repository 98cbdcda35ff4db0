"""Image conditions measured (issue 25): super-resolution and completion with a class as the
second condition, against the image's scale s_I and the class's guidance w.

The model (jobs/configs/fashion_mnist_superres.yaml or fashion_mnist_completion.yaml) is
conditioned on each test image's conditioning image (its 7×7 downsample, or its top half
and mask) and on its class. Sources: class-balanced real *test* images from the half of
the test split that FID does not use as its reference (bench/variations.pick_sources).
Every cell of the (s_I, w) grid samples the same sources with the same seeds, sequential
rule (InstructPix2Pix, image first); the independent rule (Composable Diffusion) at the
same cells is a second table.

* **consistency**: super-resolution: PSNR between the sample downsampled back by k and
  the conditioning image; completion: PSNR on the kept half (sample vs the real pixels);
* **PSNR to the real image** (the one the condition was made from: how much is recovered);
* **class accuracy** (evaluator / judge) against the source's class, **FID** against the
  reference half by both networks;
* **cost**: network rows per image (plan_cost) and seconds per image, same run.

    .venv/bin/python bench/image_conditions.py --checkpoint outputs/runs/fashion_mnist_superres \\
        --data-root outputs/data/fashion_mnist_superres --image-scales 0 1 2 4 --w 0 1 3 --n 200

Writes <out>/results.json, <out>/table.md and <out>/grid.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))
sys.path.insert(0, str(ROOT / "bench"))

from cfgd.data.image_condition import low_res  # noqa: E402
from cfgd.data.images import to_uint8  # noqa: E402
from cfgd.data.shards import read_split_meta  # noqa: E402
from cfgd.data.split_loader import load_split, read_rows  # noqa: E402
from cfgd.diffusion.guidance import plan_cost  # noqa: E402
from cfgd.diffusion.plan import Condition, Guidance, SamplingPlan, Solver  # noqa: E402
from cfgd.diffusion.solvers import ddim_timesteps  # noqa: E402
from cfgd.evaluate.evaluator import Evaluator, RealSplit  # noqa: E402
from cfgd.evaluate.metrics import compute_metrics  # noqa: E402
from cfgd.sampling.checkpoint_sampler import CheckpointSampler  # noqa: E402
from cfgd.sampling.tiles import labelled_grid  # noqa: E402
from variations import pick_sources, spread  # noqa: E402


def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean PSNR (dB, peak 255) over images of uint8 arrays (N, H, W, C), on ``mask`` (H, W) if given."""
    d = (a.astype(np.float64) - b.astype(np.float64)) ** 2
    mse = d[:, mask].mean(axis=(1, 2)) if mask is not None else d.mean(axis=(1, 2, 3))
    return float(np.mean(10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10))))


def consistency(samples: np.ndarray, real: np.ndarray, cond: dict) -> float:
    """PSNR of what the condition pins down: the k×-downsample, or the kept half."""
    if cond["transform"] == "low_res":
        return psnr(low_res(samples, cond["factor"]), low_res(real, cond["factor"]))
    h, w = samples.shape[1:3]
    keep = {"top": np.s_[:h // 2, :], "bottom": np.s_[h // 2:, :], "left": np.s_[:, :w // 2],
            "right": np.s_[:, w // 2:]}[cond["keep"]]
    mask = np.zeros((h, w), dtype=bool)
    mask[keep] = True
    return psnr(samples, real, mask)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="outputs/runs/fashion_mnist_superres")
    ap.add_argument("--data-root", default="outputs/data/fashion_mnist_superres")
    ap.add_argument("--evaluator", default="outputs/evaluators/fashion_mnist")
    ap.add_argument("--judge", default="outputs/judges/fashion_mnist")
    ap.add_argument("--image-scales", type=float, nargs="+", default=[0.0, 1.0, 2.0, 4.0])
    ap.add_argument("--w", type=float, nargs="+", default=[0.0, 1.0, 3.0])
    ap.add_argument("--n", type=int, default=200, help="sources (class-balanced), one sample each per cell")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    torch.set_num_threads(2)
    gen = CheckpointSampler.load(ROOT / args.checkpoint)
    root = str(ROOT / args.data_root)
    cond_desc = read_split_meta(root, "test").conditions["cond_image"]
    out = ROOT / (args.out or f"outputs/image_conditions/{cond_desc['transform']}")
    out.mkdir(parents=True, exist_ok=True)
    judges = {"evaluator": Evaluator.load(ROOT / args.evaluator), "judge": Evaluator.load(ROOT / args.judge)}
    images, labels, _ = load_split(root, "test")
    reals = {k: RealSplit.of(j.embed(images), labels) for k, j in judges.items()}
    sources, _ = pick_sources(labels, args.n)
    data = read_rows(root, "test", [int(s) for s in sources])
    real_u8 = to_uint8(torch.from_numpy(data["image"]))
    want = data["label"]
    rows = [Condition(label=int(c), image=bytes(p)) for c, p in zip(want, data["cond_png"])]
    seeds = list(range(len(rows)))
    solver = Solver(name="dpm++2m", steps=args.steps)
    ts = ddim_timesteps(gen.timesteps, solver.steps, solver.spacing, gen.schedule().alphas_cumprod)
    results = {"checkpoint": str(gen.checkpoint.path), "step": gen.checkpoint.step, "args": vars(args),
               "condition": cond_desc, "floor": {k: r.floor(len(rows)) for k, r in reals.items()}, "cells": []}
    grid, show = {}, spread(want, 6)  # grid rows: a source of each of 6 classes
    for combine in ("sequential", "independent"):
        for s_i in args.image_scales:
            for w in args.w:
                g = Guidance(w=w, image_scale=s_i, combine=combine)
                plan = SamplingPlan(solver=solver, rows=(g,) * len(rows))
                t0 = time.perf_counter()
                imgs = gen.sample(rows, seeds, plan, batch_size=256)
                seconds = time.perf_counter() - t0
                u8 = to_uint8(imgs)
                cell = {"combine": combine, "image_scale": s_i, "w": w, "seconds_per_image": seconds / len(rows),
                        "rows_per_image": plan_cost(SamplingPlan(solver=solver, rows=(g,)), gen.timesteps, ts)[0],
                        "consistency_psnr": consistency(u8, real_u8, cond_desc), "psnr_to_real": psnr(u8, real_u8)}
                for k, j in judges.items():
                    m = compute_metrics(j.embed(imgs), want, reals[k].reference, reals[k].pr_reference(len(rows)))
                    cell[k] = {key: m[key] for key in ("accuracy", "fid", "fid_std", "recall")}
                results["cells"].append(cell)
                if combine == "sequential":
                    grid[(s_i, w)] = u8[show]
                print(f"[image-conditions] {combine} s_I={s_i:g} w={w:g}: consistency {cell['consistency_psnr']:.2f} "
                      f"dB, to real {cell['psnr_to_real']:.2f} dB, acc {cell['evaluator']['accuracy']:.3f}/"
                      f"{cell['judge']['accuracy']:.3f}, FID {cell['evaluator']['fid']:.2f}/{cell['judge']['fid']:.2f}"
                      f", {cell['rows_per_image']} rows/image, {cell['seconds_per_image'] * 1e3:.1f} ms/image",
                      flush=True)
                (out / "results.json").write_text(json.dumps(results, indent=1))
    # Grid: rows = a source of each of 6 classes; columns = the conditioning image, the real image, then each (s_I, w) at seed i.
    cond_u8 = to_uint8(torch.nn.functional.interpolate(torch.from_numpy(data["cond_image"][show, :1]),
                                                       size=real_u8.shape[1:3], mode="nearest"))
    cols = [cond_u8, real_u8[show]] + [grid[k] for k in sorted(grid)]
    names = ["condition", "real"] + [f"sI={s:g} w={w:g}" for s, w in sorted(grid)]
    labelled_grid(np.stack(cols, 1).reshape(-1, *real_u8.shape[1:]),
                  [gen.checkpoint.label_names[c] for c in want[show]], len(cols), col_labels=names, per_cell=1,
                  zoom=3).save(out / "grid.png")
    (out / "table.md").write_text(table(results))
    print(table(results))


def table(r: dict) -> str:
    lines = ["| rule | s_I | w | rows/image | consistency PSNR (dB) | PSNR to real (dB) | acc evaluator / judge | "
             "FID evaluator | FID judge | recall evaluator | ms/image |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in r["cells"]:
        e, j = c["evaluator"], c["judge"]
        lines.append(f"| {c['combine']} | {c['image_scale']:g} | {c['w']:g} | {c['rows_per_image']} | "
                     f"{c['consistency_psnr']:.2f} | {c['psnr_to_real']:.2f} | {e['accuracy']:.3f} / {j['accuracy']:.3f}"
                     f" | {e['fid']:.2f} ± {e['fid_std']:.2f} | {j['fid']:.2f} ± {j['fid_std']:.2f} | "
                     f"{e['recall']:.2f} | {c['seconds_per_image'] * 1e3:.1f} |")
    f = r["floor"]
    lines.append(f"| real held-out images (floor) | | | | | | {f['evaluator']['accuracy']:.3f} / "
                 f"{f['judge']['accuracy']:.3f} | {f['evaluator']['fid']:.2f} | {f['judge']['fid']:.2f} | "
                 f"{f['evaluator']['recall']:.2f} | |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
