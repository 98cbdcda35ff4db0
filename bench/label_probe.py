"""Where along the noise levels does a model follow its label? (issue 23's diagnosis)

For real test images x0 (true class c), noise them to x_t at each probed t and ask the
model for x̂0(x_t, t, y) with y a *different* class (c + k mod 10, k = 1..9 in turn).
A judge classifies x̂0: the share it calls y ("follows the label"), the share it still
calls c ("follows the image"), and the mean |x̂0(y) − x̂0(∅)| (how much the label moves
the prediction). Early in sampling (large t) x_t carries almost nothing of c, so a model
that conditions well follows y there; a model whose label signal is weak falls back to
the unconditional guess. Same images, noise and labels for every checkpoint.

    .venv/bin/python bench/label_probe.py outputs/judges/mnist RUN_DIR [RUN_DIR ...] --n 500
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))

from cfgd.data.images import uint8_to_model  # noqa: E402
from cfgd.data.split_loader import load_split  # noqa: E402
from cfgd.diffusion.process import q_sample  # noqa: E402
from cfgd.evaluate.evaluator import Evaluator  # noqa: E402
from cfgd.sampling.checkpoint_sampler import CheckpointSampler  # noqa: E402

TS = (999, 950, 900, 800, 700, 600, 500, 300)


@torch.inference_mode()
def probe(sampler: CheckpointSampler, judge: Evaluator, x0: torch.Tensor, c: np.ndarray, seed: int = 0) -> list[dict]:
    schedule, eps_fn = sampler.schedule(), sampler.eps_fn()
    n = len(c)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=g)
    y = (c + 1 + np.arange(n) % 9) % 10  # every other class, in turn
    null = torch.full((n,), sampler.checkpoint.null_label, dtype=torch.long)
    rows = []
    for t_val in TS:
        t = torch.full((n,), t_val, dtype=torch.long)
        x_t = q_sample(schedule, x0, t, noise)
        a = schedule.alpha_bar(t).to(torch.float32)[:, None, None, None]

        def x0_hat(labels):
            eps = eps_fn(x_t, t, labels)
            return ((x_t - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)

        cond, uncond = x0_hat(torch.as_tensor(y)), x0_hat(null)
        pred = judge.embed(cond).probs.argmax(1)
        rows.append({"t": t_val, "follows_label": float((pred == y).mean()), "follows_image": float((pred == c).mean()),
                     "label_effect": float((cond - uncond).abs().mean())})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("judge")
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--n", type=int, default=500)
    args = ap.parse_args()
    torch.set_num_threads(2)
    judge = Evaluator.load(args.judge)
    images, labels, _ = load_split(judge.meta["data_root"], "test")
    x0, c = images[: args.n], np.asarray(labels[: args.n])
    x0 = x0 if isinstance(x0, torch.Tensor) else uint8_to_model(x0)
    print("| run | " + " | ".join(f"t={t}" for t in TS) + " |")
    print("|---|" + "---|" * len(TS))
    for run in args.runs:
        rows = probe(CheckpointSampler.load(run), judge, x0, c)
        cells = [f"{r['follows_label']:.2f} / {r['follows_image']:.2f} / {r['label_effect']:.3f}" for r in rows]
        print(f"| {Path(run).name} | " + " | ".join(cells) + " |", flush=True)
    print("cells: share of x̂0(x_t, t, y ≠ c) the judge calls y / calls c / mean |x̂0(y) − x̂0(∅)|")


if __name__ == "__main__":
    main()
