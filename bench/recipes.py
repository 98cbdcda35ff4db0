"""Training recipes judged on two data sets by two judges (issue 23's table).

For each data set and recipe (parameterisation / loss weighting, plus any extra overrides)
this trains the data set's demo config (same steps, batch, LR schedule, EMA, seed), then
samples n images per w (n/10 per class, seeds 0..n-1, the same for every recipe) and
scores them with two classifiers trained on the real train split: the platform's
evaluator (EvalNet, what recipes were tuned with) and the judge (JudgeNet, another
architecture, seed and augmentation; jobs/configs/judge.yaml). Per judge: conditional
accuracy with its bootstrap std, FID (in that judge's feature space) with its bootstrap
std, precision and recall, and the real-vs-real floor at the same n.

    .venv/bin/python bench/recipes.py --datasets fashion_mnist mnist \
        --recipes eps:uniform eps:min_snr v:min_snr v:uniform --w 0 1 --n 500

Prerequisites, per data set D: shards (jobs/prepare_data.py --config jobs/configs/D.yaml),
outputs/evaluators/D (jobs/train_evaluator.py) and outputs/judges/D
(jobs/train_evaluator.py --config jobs/configs/judge.yaml). Training is skipped when the
run already has its final checkpoint (rerun to add recipes). Writes
<out>/results.json, <out>/table.md and a sample grid per (data set, recipe, w).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))

from cfgd.config import load_config  # noqa: E402
from cfgd.data.images import to_uint8  # noqa: E402
from cfgd.diffusion.plan import Guidance, SamplingPlan, Solver  # noqa: E402
from cfgd.evaluate.evaluator import Evaluator, RealSplit  # noqa: E402
from cfgd.evaluate.metrics import compute_metrics  # noqa: E402
from cfgd.io.checkpoint import find_checkpoints  # noqa: E402
from cfgd.sampling.checkpoint_sampler import CheckpointSampler  # noqa: E402
from cfgd.sampling.tiles import labelled_grid  # noqa: E402

JUDGES = {"evaluator": "outputs/evaluators/{ds}", "judge": "outputs/judges/{ds}"}


def parse_recipe(text: str) -> tuple[str, list[str]]:
    """'v:min_snr' or 'v:min_snr:train.min_snr_gamma=1' -> (name, overrides)."""
    param, weighting, *extra = text.split(":")
    return text, [f"diffusion.parameterization={param}", f"train.loss_weighting={weighting}", *extra]


def train(ds: str, name: str, overrides: list[str], out: Path, log) -> tuple[Path, dict]:
    """Train (or find) the recipe's run; returns its final checkpoint and the run's timing."""
    run_name = f"{ds}-{name.replace(':', '-').replace('=', '').replace('.', '')}"
    args = ["--config", f"jobs/configs/{ds}.yaml", *overrides, f"train.storage_path={out / 'runs'}",
            f"train.run_name={run_name}"]
    cfg = load_config(str(ROOT / f"jobs/configs/{ds}.yaml"), overrides)
    run_dir = out / "runs" / run_name
    timing_file = run_dir.parent / f"{run_name}.timing.json"
    done = [p for step, p in find_checkpoints(run_dir) if step >= cfg.train.steps] if run_dir.exists() else []
    if not done:
        log(f"[recipes] training {run_name}: {' '.join(overrides)}")
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "jobs/train.py", *args], cwd=ROOT, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"training {run_name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        rates = [float(line.split("samples/s")[0].split()[-1]) for line in proc.stdout.splitlines()
                 if "samples/s" in line and "[cfgd.train] step" in line]
        timing_file.write_text(json.dumps({"wall_s": time.perf_counter() - t0,
                                           "samples_per_s": float(np.median(rates)) if rates else None}))
        done = [p for step, p in find_checkpoints(run_dir) if step >= cfg.train.steps]
    return done[-1], json.loads(timing_file.read_text()) if timing_file.exists() else {}


def accuracy_std(probs: np.ndarray, labels: np.ndarray, resamples: int = 200, seed: int = 0) -> float:
    hits = probs.argmax(1) == labels
    rng = np.random.default_rng(seed)
    return float(np.std([hits[rng.integers(0, len(hits), len(hits))].mean() for _ in range(resamples)]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=["fashion_mnist", "mnist"])
    ap.add_argument("--recipes", nargs="+", default=["eps:uniform", "eps:min_snr", "v:min_snr", "v:uniform"])
    ap.add_argument("--w", nargs="+", type=float, default=[0.0, 1.0])
    ap.add_argument("--n", type=int, default=500, help="samples per w (a multiple of 10)")
    ap.add_argument("--steps", type=int, default=20, help="DPM-Solver++(2M) steps")
    ap.add_argument("--out", default="outputs/recipes")
    ap.add_argument("--table", action="store_true", help="only print the table of results already measured")
    args = ap.parse_args()
    out = (ROOT / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    if args.table:
        print(table(results, args))
        return
    torch.set_num_threads(2)
    for ds in args.datasets:
        judges = {k: Evaluator.load(ROOT / v.format(ds=ds)) for k, v in JUDGES.items()}
        data_root = str(ROOT / load_config(str(ROOT / f"jobs/configs/{ds}.yaml"), []).data.root)
        reals = {k: RealSplit.load(j, data_root) for k, j in judges.items()}
        for k, j in judges.items():
            results[f"{ds}/floor/{k}"] = {**reals[k].floor(args.n), "test_accuracy": j.test_accuracy}
        labels = np.repeat(np.arange(10), args.n // 10)
        seeds = list(range(len(labels)))
        for text in args.recipes:
            name, overrides = parse_recipe(text)
            ckpt, timing = train(ds, name, overrides, out, print)
            sampler = CheckpointSampler.load(ckpt)
            for w in args.w:
                key = f"{ds}/{name}/w={w:g}"
                t0 = time.perf_counter()
                plan = SamplingPlan(solver=Solver(name="dpm++2m", steps=args.steps), rows=(Guidance(w=w),) * len(labels))
                images = sampler.sample(labels.tolist(), seeds, plan)
                row = {"checkpoint": str(ckpt), "sample_s": time.perf_counter() - t0, **timing}
                for k, j in judges.items():
                    emb = j.embed(images)
                    m = compute_metrics(emb, labels, reals[k].reference, reals[k].pr_reference(len(labels)))
                    row[k] = {**m, "accuracy_std": accuracy_std(emb.probs, labels)}
                results[key] = row
                u8 = to_uint8(images)
                pick = np.concatenate([np.flatnonzero(labels == c)[:8] for c in range(10)])
                grid = labelled_grid(u8[pick], sampler.checkpoint.label_names, cols=8)
                grid.save(out / f"{key.replace('/', '_').replace(':', '-')}.png")
                e, jd = row["evaluator"], row["judge"]
                print(f"[recipes] {key}: acc {e['accuracy']:.3f}/{jd['accuracy']:.3f} (evaluator/judge), "
                      f"FID {e['fid']:.2f}/{jd['fid']:.2f}, recall {e['recall']:.3f}/{jd['recall']:.3f}", flush=True)
                results_file.write_text(json.dumps(results, indent=1))
    (out / "table.md").write_text(table(results, args))
    print(table(results, args))


def table(results: dict, args) -> str:
    lines = ["| data set | recipe | w | acc evaluator | acc judge | FID evaluator | FID judge | recall evaluator | "
             "recall judge |", "|---|---|---|---|---|---|---|---|---|"]
    for ds in args.datasets:
        for text in args.recipes:
            for w in args.w:
                r = results.get(f"{ds}/{text}/w={w:g}")
                if r:
                    e, j = r["evaluator"], r["judge"]
                    lines.append(f"| {ds} | {text} | {w:g} | {e['accuracy']:.3f} ± {e['accuracy_std']:.3f} | "
                                 f"{j['accuracy']:.3f} ± {j['accuracy_std']:.3f} | {e['fid']:.2f} ± {e['fid_std']:.2f} | "
                                 f"{j['fid']:.2f} ± {j['fid_std']:.2f} | {e['recall']:.3f} | {j['recall']:.3f} |")
        for k in JUDGES:
            f = results.get(f"{ds}/floor/{k}")
            if f:
                lines.append(f"| {ds} | real test images ({k} floor) | – | {f['accuracy']:.3f} | | {f['fid']:.2f} | | "
                             f"{f['recall']:.3f} | |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
