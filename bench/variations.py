"""Image variations measured (issue 24): how close guided samples come to the image whose
embedding conditions them, against w.

The embedding model (jobs/configs/fashion_mnist_variations.yaml) is conditioned on each
image's evaluator features (jobs/embed.py, cfgd.embed.encoders.EvaluatorFeatures). Sources
are real *test* images the model never saw, class-balanced, taken from the half of the
test split that FID does not use as its reference (RealSplit's held-out half, seed 0).
Each source gets ``--per-source`` samples (seeds 0..k-1, the same at every w).

Judged twice, in two feature spaces:

* **cosine to the source**: of the sample's features and the source's, in the
  evaluator's space (the conditioning space itself) and in the judge's (JudgeNet, an
  independent network the model never saw). Baselines, real against real: another test
  image of the same class (what the class alone gives) and a test image of any class.
* **class agreement**: the sample classified as the source's class (evaluator / judge).
* **FID** of all samples against the reference half, by both networks.

    .venv/bin/python bench/variations.py --checkpoint outputs/runs/fashion_mnist_variations \\
        --w 0 1 3 5 --sources 100 --per-source 4

Writes <out>/results.json, <out>/table.md and <out>/grid.png (rows = a source of each of 8
classes: the source, then its seed-0 sample at each w).
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

from cfgd.data.images import to_uint8  # noqa: E402
from cfgd.data.split_loader import load_split, read_rows  # noqa: E402
from cfgd.diffusion.plan import Condition, Guidance, SamplingPlan, Solver  # noqa: E402
from cfgd.evaluate.evaluator import Evaluator, RealSplit  # noqa: E402
from cfgd.evaluate.metrics import compute_metrics  # noqa: E402
from cfgd.sampling.checkpoint_sampler import CheckpointSampler  # noqa: E402
from cfgd.sampling.tiles import labelled_grid  # noqa: E402


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of (N, D) arrays."""
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return (a * b).sum(1)


def pick_sources(labels: np.ndarray, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(sources, held-out pool): n class-balanced rows of RealSplit's held-out half (same
    permutation as RealSplit.of), so FID's reference half never contains a source."""
    perm = np.random.default_rng(seed).permutation(len(labels))
    held = perm[:len(labels) // 2]
    classes = np.unique(labels)
    per = n // len(classes)
    return np.concatenate([held[labels[held] == c][:per] for c in classes]), held


def spread(labels: np.ndarray, n: int) -> np.ndarray:
    """Indices of the first row of each of the first n classes present (a grid of one per class)."""
    return np.array([int(np.flatnonzero(labels == c)[0]) for c in np.unique(labels)[:n]])


def baselines(feats: np.ndarray, labels: np.ndarray, sources: np.ndarray, pool: np.ndarray,
              rng: np.random.Generator) -> dict[str, float]:
    """Mean cosine of each source to a random other held-out image of its class, and of any class."""
    same, other = [], []
    for s in sources:
        cands = pool[(labels[pool] == labels[s]) & (pool != s)]
        same.append(int(rng.choice(cands)))
        other.append(int(rng.choice(pool[pool != s])))
    return {"same_class": float(cosine(feats[sources], feats[same]).mean()),
            "any_class": float(cosine(feats[sources], feats[other]).mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="outputs/runs/fashion_mnist_variations")
    ap.add_argument("--data-root", default="outputs/data/fashion_mnist_embedded")
    ap.add_argument("--evaluator", default="outputs/evaluators/fashion_mnist")
    ap.add_argument("--judge", default="outputs/judges/fashion_mnist")
    ap.add_argument("--w", type=float, nargs="+", default=[0.0, 1.0, 3.0, 5.0])
    ap.add_argument("--sources", type=int, default=100, help="source images (class-balanced)")
    ap.add_argument("--per-source", type=int, default=4, help="samples per source and w")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default="outputs/variations")
    args = ap.parse_args()
    torch.set_num_threads(2)
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    gen = CheckpointSampler.load(ROOT / args.checkpoint)
    root = str(ROOT / args.data_root)
    judges = {"evaluator": Evaluator.load(ROOT / args.evaluator), "judge": Evaluator.load(ROOT / args.judge)}
    images, labels, _ = load_split(root, "test")
    real = {k: j.embed(images) for k, j in judges.items()}
    reals = {k: RealSplit.of(real[k], labels) for k in judges}
    sources, pool = pick_sources(labels, args.sources)
    data = read_rows(root, "test", [int(s) for s in sources])
    assert (data["label"] == labels[sources]).all()
    n = len(sources) * args.per_source
    src_rows = np.repeat(np.arange(len(sources)), args.per_source)
    rows = [Condition(embedding=tuple(data["embedding"][i].reshape(-1).tolist())) for i in src_rows]
    seeds = [int(s) for s in np.tile(np.arange(args.per_source), len(sources))]
    want = labels[sources][src_rows]
    # The conditioning vector is the evaluator's feature of the source: check it is.
    cond_cos = cosine(data["embedding"].reshape(len(sources), -1), real["evaluator"].features[sources])
    results = {"checkpoint": str(gen.checkpoint.path), "step": gen.checkpoint.step, "args": vars(args),
               "embedding_is_evaluator_feature_cosine": float(cond_cos.min()), "sources": sources.tolist(),
               "baseline_cosine": {k: baselines(real[k].features, labels, sources, pool, np.random.default_rng(0))
                                   for k in judges},
               "floor": {k: r.floor(n) for k, r in reals.items()}, "w": {}}
    show = spread(data["label"], 8)  # grid rows: one source of each of 8 classes
    grid = [to_uint8(torch.from_numpy(data["image"][show]))]
    for w in args.w:
        t0 = time.perf_counter()
        plan = SamplingPlan(solver=Solver(name="dpm++2m", steps=args.steps), rows=(Guidance(w=w),) * n)
        imgs = gen.sample(rows, seeds, plan, batch_size=256)
        seconds = time.perf_counter() - t0
        row = {"samples": n, "sample_s": seconds}
        for k, j in judges.items():
            emb = j.embed(imgs)
            m = compute_metrics(emb, want, reals[k].reference, reals[k].pr_reference(n))
            row[k] = {"cosine_to_source": float(cosine(emb.features, real[k].features[sources][src_rows]).mean()),
                      "class_agreement": float((emb.probs.argmax(1) == want).mean()),
                      **{key: m[key] for key in ("fid", "fid_std", "precision", "recall")}}
        results["w"][f"{w:g}"] = row
        grid.append(to_uint8(imgs[::args.per_source][show]))
        e, j = row["evaluator"], row["judge"]
        print(f"[variations] w={w:g}: cosine to source {e['cosine_to_source']:.3f}/{j['cosine_to_source']:.3f}, "
              f"class agreement {e['class_agreement']:.3f}/{j['class_agreement']:.3f}, FID {e['fid']:.2f}/"
              f"{j['fid']:.2f} ({n / seconds:.1f} samples/s)", flush=True)
        (out / "results.json").write_text(json.dumps(results, indent=1))
    # Rows = the first 8 sources; columns = the source, then each w (seed 0).
    tiles = np.stack(grid, 1).reshape(-1, *grid[0].shape[1:])
    labelled_grid(tiles, [gen.checkpoint.label_names[c] for c in data["label"][show]], 1 + len(args.w),
                  col_labels=["source"] + [f"w = {w:g}" for w in args.w], per_cell=1, zoom=3).save(out / "grid.png")
    (out / "table.md").write_text(table(results))
    print(table(results))


def table(r: dict) -> str:
    lines = ["| w | cosine to source, evaluator / judge | class agreement, evaluator / judge | FID evaluator | "
             "FID judge | recall evaluator / judge |", "|---|---|---|---|---|---|"]
    for w, row in r["w"].items():
        e, j = row["evaluator"], row["judge"]
        lines.append(f"| {w} | {e['cosine_to_source']:.3f} / {j['cosine_to_source']:.3f} | {e['class_agreement']:.3f}"
                     f" / {j['class_agreement']:.3f} | {e['fid']:.2f} ± {e['fid_std']:.2f} | {j['fid']:.2f} ± "
                     f"{j['fid_std']:.2f} | {e['recall']:.2f} / {j['recall']:.2f} |")
    b, f = r["baseline_cosine"], r["floor"]
    lines.append(f"| real: another image of the source's class | {b['evaluator']['same_class']:.3f} / "
                 f"{b['judge']['same_class']:.3f} | | | | |")
    lines.append(f"| real: an image of any class | {b['evaluator']['any_class']:.3f} / {b['judge']['any_class']:.3f}"
                 f" | | | | |")
    lines.append(f"| real held-out images (floor) | | {f['evaluator']['accuracy']:.3f} / {f['judge']['accuracy']:.3f} "
                 f"| {f['evaluator']['fid']:.2f} | {f['judge']['fid']:.2f} | {f['evaluator']['recall']:.2f} / "
                 f"{f['judge']['recall']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
