"""Samples of one checkpoint with fixed seeds across solvers and rules, to compare two builds.

    .venv/bin/python bench/same_samples.py outputs/runs/fashion_mnist_demo after.npz --compare before.npz

Run it on two checkouts (e.g. a refactor and the commit before it, with PYTHONPATH
pointing at each one's platform/): a refactor that keeps behaviour gives max |Δ| = 0.
"""

import argparse

import numpy as np
import torch

from cfgd.diffusion.plan import Guidance, SamplingPlan, Solver
from cfgd.sampling.checkpoint_sampler import CheckpointSampler

CASES = [
    ("ddim", Solver(name="ddim", steps=20), (Guidance(w=0.0), Guidance(w=3.0), Guidance(rule="cfg_zero_star", w=2.0),
                                             Guidance(rule="cfg++", lam=0.5))),
    ("dpm", Solver(name="dpm++2m", steps=10), (Guidance(w=1.0), Guidance(rule="apg", w=4.0, apg_beta=-0.5, apg_r=15.0),
                                               Guidance(w=2.0, interval=(1, 800)))),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("out", help="where to save the samples (.npz)")
    p.add_argument("--compare", help="an .npz from another build: print max |Δ| per case")
    args = p.parse_args()
    torch.set_num_threads(2)
    gen = CheckpointSampler.load(args.checkpoint)
    out = {}
    for name, solver, rows in CASES:
        n = len(rows)
        out[name] = gen.sample([0, 7, 9, 4][:n], seeds=[1, 2, 3, 4][:n], plan=SamplingPlan(solver=solver, rows=rows)).numpy()
    np.savez(args.out, **out)
    print({k: float(np.abs(v).sum()) for k, v in out.items()})
    if args.compare:
        other = np.load(args.compare)
        print("max |Δ|:", {k: float(np.abs(out[k] - other[k]).max()) for k in out})


if __name__ == "__main__":
    main()
