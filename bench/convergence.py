"""Convergence comparison: FID and accuracy against the training step, several runs in one plot.

    .venv/bin/python bench/convergence.py outputs/runs/eps_uniform outputs/runs/v_minsnr \\
        --evaluator outputs/evaluators/fashion_mnist --out docs/convergence.png

Reads each run's evaluations (``<run>/eval/``, written by evaluation during training,
``train.eval_every``). ``--score`` first scores every kept checkpoint that has none,
with the same function and settings (cfgd.train.checkpoint_eval.CheckpointEval), for runs trained
without evaluation. Prints a table (FID at ``--fid-w`` and accuracy at ``--acc-w`` per
step) and writes the plot.
"""

import argparse
import time
from pathlib import Path

import torch

from cfgd.io.checkpoint import find_checkpoints, read_checkpoint
from cfgd.train.checkpoint_eval import CheckpointEval, read_records


def score_missing(run: Path, args) -> None:
    done = {r["step"] for r in read_records(str(run))}
    for step, path in sorted(find_checkpoints(run), key=lambda sp: (sp[0] not in args.first, sp[0])):
        if step in done:
            continue
        data_root = args.data_root or read_checkpoint(path).data_root
        ev = CheckpointEval(evaluator=args.evaluator, data_root=data_root, run_uri=str(run), w=tuple(args.w),
                            samples=args.samples, steps=args.steps, seed=args.seed, threads=args.threads)
        t0 = time.perf_counter()
        m = ev.evaluate(str(path), str(path))
        print(f"scored {run.name} step {step}: FID {m['fid']:.2f} at w={m['fid_best_w']:g} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run directories (local)")
    p.add_argument("--out", default="outputs/convergence.png", help="the plot (PNG)")
    p.add_argument("--fid-w", type=float, default=1.0, help="the w of the FID curves")
    p.add_argument("--acc-w", type=float, default=0.0, help="the w of the accuracy curves")
    p.add_argument("--score", action="store_true", help="score kept checkpoints that have no evaluation yet")
    p.add_argument("--evaluator", default="outputs/evaluators/fashion_mnist", help="for --score")
    p.add_argument("--data-root", default="", help="for --score; default: the data the checkpoint names")
    p.add_argument("--w", type=float, nargs="+", default=[0.0, 1.0], help="for --score: the w values scored")
    p.add_argument("--samples", type=int, default=200, help="for --score: samples per w")
    p.add_argument("--steps", type=int, default=20, help="for --score: DDIM steps")
    p.add_argument("--first", type=int, nargs="*", default=[], help="for --score: score these steps first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()

    from cfgd.train.checkpoint_eval import plot_curves

    runs, floor = {}, None
    for run in args.runs:
        if args.score:
            score_missing(run, args)
        records = read_records(str(run))
        if not records:
            raise SystemExit(f"{run}: no evaluations under {run}/eval/ (train with train.eval_every, or use --score)")
        runs[run.name] = [row for rec in records for row in rec["rows"]]
        floor = floor or records[-1].get("floor")
    steps = sorted({r["step"] for rows in runs.values() for r in rows})
    width = max(len(n) for n in runs) + 2
    print(f"FID at w = {args.fid_w:g} / accuracy at w = {args.acc_w:g}, per training step"
          + (f"; real vs real: FID {floor['fid']:.2f}, accuracy {floor['accuracy']:.3f}" if floor else ""))
    print("run".ljust(width) + "".join(f"{s:>14d}" for s in steps))
    for name, rows in runs.items():
        cell = {}
        for s in steps:
            f = next((r["fid"] for r in rows if r["step"] == s and r["w"] == args.fid_w), None)
            a = next((r["accuracy"] for r in rows if r["step"] == s and r["w"] == args.acc_w), None)
            cell[s] = f"{f:.1f}/{a:.3f}" if f is not None and a is not None else "-"
        print(name.ljust(width) + "".join(f"{cell[s]:>14}" for s in steps))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_bytes(plot_curves(runs, floor, fid_w=args.fid_w, acc_w=args.acc_w))
    print(f"plot: {args.out}")


if __name__ == "__main__":
    main()
