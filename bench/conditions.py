"""Text prompts measured (issue 24): attribute adherence, class accuracy and FID against w.

The captioned model (jobs/configs/fashion_mnist_captions.yaml) is asked for "a {level}
{class}" for every class and every non-medium level of each attribute (brightness,
size, texture: cfgd.data.attributes), n samples per prompt, seeds 0..n-1 for every prompt
and w (common random numbers). The attribute functions with the thresholds stored in the
shards are the judge: **adherence** is the share of samples whose measured level (for
the prompt's class) is the one asked for; chance is about 1/3 (terciles). Held-out
class:level combinations (data.caption_holdout: never written in a training caption) are
reported apart from seen ones. **Class accuracy** and **FID** use the platform's
evaluator and the judge (JudgeNet), FID on "a {class}" prompts (n_fid/10 per class)
against the real test split. The negative prompt: "a {class}" with and without "dark" /
"light" as negative prompt, mean measured brightness of the object.

    .venv/bin/python bench/conditions.py --checkpoint outputs/runs/fashion_mnist_captions \
        --w 0 1 3 5 --n 20 --n-fid 500

Writes <out>/results.json, <out>/table.md and <out>/grid.png (prompts × w).
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

from cfgd.data.attributes import ATTRIBUTES, levels, measure  # noqa: E402
from cfgd.data.captions import class_word, parse_holdout  # noqa: E402
from cfgd.data.images import to_uint8  # noqa: E402
from cfgd.data.shards import read_split_meta  # noqa: E402
from cfgd.diffusion.plan import Condition, Guidance, SamplingPlan, Solver  # noqa: E402
from cfgd.evaluate.evaluator import Evaluator, RealSplit  # noqa: E402
from cfgd.evaluate.metrics import compute_metrics  # noqa: E402
from cfgd.sampling.checkpoint_sampler import CheckpointSampler  # noqa: E402
from cfgd.sampling.tiles import labelled_grid  # noqa: E402

GRID_PROMPTS = ["a dress", "a dark dress", "a light dress", "a large bag", "a small bag", "a patterned bag",
                "a small sneaker", "a large sneaker"]


def attribute_prompts(names: list[str], holdout: set) -> list[dict]:
    """One prompt per (class, attribute, non-medium level), flagged held out or seen."""
    out = []
    for c, name in enumerate(names):
        for attr, lv in ATTRIBUTES.items():
            for i, level in enumerate(lv):
                if level != "medium":
                    out.append({"prompt": f"a {level} {class_word(name)}", "cls": c, "attr": attr, "level": i,
                                "held_out": (c, attr, i) in holdout})
    return out


def sample(gen, prompts, seeds, w, steps, negative=None):
    rows = [Condition(prompt=p, negative_prompt=negative) for p in prompts]
    plan = SamplingPlan(solver=Solver(name="dpm++2m", steps=steps), rows=(Guidance(w=w),) * len(rows))
    return gen.sample(rows, seeds, plan, batch_size=256)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="outputs/runs/fashion_mnist_captions")
    ap.add_argument("--data-root", default="outputs/data/fashion_mnist_captions")
    ap.add_argument("--evaluator", default="outputs/evaluators/fashion_mnist")
    ap.add_argument("--judge", default="outputs/judges/fashion_mnist")
    ap.add_argument("--w", type=float, nargs="+", default=[0.0, 1.0, 3.0, 5.0])
    ap.add_argument("--n", type=int, default=20, help="samples per attribute prompt")
    ap.add_argument("--n-fid", type=int, default=500, help="samples per w for FID and accuracy ('a {class}')")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default="outputs/conditions")
    args = ap.parse_args()
    torch.set_num_threads(2)
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    gen = CheckpointSampler.load(ROOT / args.checkpoint)
    names = gen.checkpoint.label_names
    cap = read_split_meta(str(ROOT / args.data_root), "train").conditions["caption"]
    holdout = parse_holdout(cap["holdout"], names)
    judges = {"evaluator": Evaluator.load(ROOT / args.evaluator), "judge": Evaluator.load(ROOT / args.judge)}
    reals = {k: RealSplit.load(j, str(ROOT / args.data_root)) for k, j in judges.items()}
    results = {"checkpoint": str(gen.checkpoint.path), "step": gen.checkpoint.step, "args": vars(args),
               "holdout": cap["holdout"], "floor": {k: r.floor(args.n_fid) for k, r in reals.items()}, "w": {}}
    prompts = attribute_prompts(names, holdout)
    fid_labels = np.repeat(np.arange(10), args.n_fid // 10)
    fid_prompts = [f"a {class_word(names[c])}" for c in fid_labels]
    for w in args.w:
        t0 = time.perf_counter()
        texts = [p["prompt"] for p in prompts for _ in range(args.n)]
        imgs = sample(gen, texts, list(range(args.n)) * len(prompts), w, args.steps)
        sample_s = time.perf_counter() - t0
        u8 = to_uint8(imgs)
        cls = np.repeat([p["cls"] for p in prompts], args.n)
        lv = levels(u8, cls, cap["thresholds"])
        hit = np.concatenate([lv[p["attr"]][i * args.n:(i + 1) * args.n] == p["level"] for i, p in enumerate(prompts)])
        held = np.repeat([p["held_out"] for p in prompts], args.n)
        acc_attr = {k: float((judges[k].embed(imgs).probs.argmax(1) == cls).mean()) for k in judges}
        row = {"adherence_seen": float(hit[~held].mean()), "adherence_held_out": float(hit[held].mean()),
               "adherence_by_attribute": {a: float(np.mean([hit[i * args.n:(i + 1) * args.n].mean()
                                                           for i, p in enumerate(prompts) if p["attr"] == a and not p["held_out"]]))
                                          for a in ATTRIBUTES},
               "held_out": {p["prompt"]: float(hit[i * args.n:(i + 1) * args.n].mean())
                            for i, p in enumerate(prompts) if p["held_out"]},
               "class_accuracy_attribute_prompts": acc_attr, "attribute_samples": len(texts),
               "attribute_sample_s": sample_s}
        fid_imgs = sample(gen, fid_prompts, list(range(len(fid_prompts))), w, args.steps)
        for k, j in judges.items():
            m = compute_metrics(j.embed(fid_imgs), fid_labels, reals[k].reference, reals[k].pr_reference(len(fid_labels)))
            row[k] = {key: m[key] for key in ("accuracy", "fid", "fid_std", "precision", "recall")}
        neg = {}
        for c, word in [(3, "dress"), (8, "bag"), (0, "t-shirt")]:
            base = f"a {word}"
            for negative in (None, "dark", "light"):
                x = to_uint8(sample(gen, [base] * args.n, list(range(args.n)), w, args.steps, negative))
                neg[f"{base} | negative {negative!r}"] = float(measure(x)["brightness"].mean())
        row["negative_prompt_brightness"] = neg
        results["w"][f"{w:g}"] = row
        print(f"[conditions] w={w:g}: adherence seen {row['adherence_seen']:.3f}, held out "
              f"{row['adherence_held_out']:.3f}; class acc {row['evaluator']['accuracy']:.3f}/"
              f"{row['judge']['accuracy']:.3f}; FID {row['evaluator']['fid']:.2f}/{row['judge']['fid']:.2f}; "
              f"{len(texts) / sample_s:.1f} samples/s", flush=True)
        (out / "results.json").write_text(json.dumps(results, indent=1))
    grid_rows = []
    for p in GRID_PROMPTS:
        for w in args.w:
            grid_rows.append(to_uint8(sample(gen, [p] * 4, [0, 1, 2, 3], w, args.steps)))
    labelled_grid(np.concatenate(grid_rows), GRID_PROMPTS, len(args.w), col_labels=[f"w = {w:g}" for w in args.w],
                  per_cell=4, zoom=3).save(out / "grid.png")
    (out / "table.md").write_text(table(results))
    print(table(results))


def table(r: dict) -> str:
    lines = ["| w | adherence, seen | adherence, held out | brightness / size / texture (seen) | class acc evaluator / "
             "judge | FID evaluator | FID judge | recall evaluator |", "|---|---|---|---|---|---|---|---|"]
    for w, row in r["w"].items():
        a = row["adherence_by_attribute"]
        e, j = row["evaluator"], row["judge"]
        lines.append(f"| {w} | {row['adherence_seen']:.3f} | {row['adherence_held_out']:.3f} | {a['brightness']:.2f} / "
                     f"{a['size']:.2f} / {a['texture']:.2f} | {e['accuracy']:.3f} / {j['accuracy']:.3f} | "
                     f"{e['fid']:.2f} ± {e['fid_std']:.2f} | {j['fid']:.2f} ± {j['fid_std']:.2f} | {e['recall']:.3f} |")
    f = r["floor"]
    lines.append(f"| real test images (floor) | | | | {f['evaluator']['accuracy']:.3f} / {f['judge']['accuracy']:.3f} | "
                 f"{f['evaluator']['fid']:.2f} | {f['judge']['fid']:.2f} | {f['evaluator']['recall']:.3f} |")
    lines += ["", "Negative prompts: mean measured brightness of the object (0..1)", "",
              "| w | prompt | none | 'dark' | 'light' |", "|---|---|---|---|---|"]
    for w, row in r["w"].items():
        neg = row["negative_prompt_brightness"]
        for base in ("a dress", "a bag", "a t-shirt"):
            v = [neg[f"{base} | negative {n!r}"] for n in (None, "dark", "light")]
            lines.append(f"| {w} | {base} | {v[0]:.3f} | {v[1]:.3f} | {v[2]:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
