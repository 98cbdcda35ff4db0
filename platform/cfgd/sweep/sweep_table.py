"""The sweep's table: a row per grid point (and the floor), and each point's samples table."""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow as pa

from cfgd.data.images import encode_png
from cfgd.sweep.point_store import CheckpointInfo
from cfgd.sweep.sweep_grid import GridPoint, rows_per_image

TABLE_COLUMNS = ["kind", "checkpoint", "checkpoint_step", "solver", "steps", "eta", "rule", "params", "prompt",
                 "negative_prompt", "interval_lo",
                 "interval_hi", "w", "guidance_scale", "rows_per_image", "fid", "fid_std", "inception_score",
                 "inception_score_std", "accuracy", "precision", "recall", "n_samples", "seconds", "samples_per_s",
                 "point_id"]


def samples_table(images: np.ndarray, labels: np.ndarray, seeds: np.ndarray, w: float,
                   preds: np.ndarray, prompts: list[str] | None = None) -> pa.Table:
    """A point's samples; ``prompts``: a text point's prompt per sample (a column when given)."""
    n = len(labels)
    extra = {"prompt": pa.array(prompts, type=pa.string())} if prompts is not None else {}
    return pa.table({
        "index": pa.array(np.arange(n, dtype=np.int64)), "label": pa.array(labels.astype(np.int64)),
        "seed": pa.array(seeds.astype(np.int64)), "w": pa.array(np.full(n, w)),
        "guidance_scale": pa.array(np.full(n, 1 + w)), "pred": pa.array(preds.astype(np.int64)),
        **extra, "image": pa.array([encode_png(im) for im in images], type=pa.binary()),
    })


def table_row(record: dict, p: GridPoint, info: CheckpointInfo) -> dict:
    iv = p.guidance.interval
    return {**record["metrics"], "kind": "generated", "checkpoint": p.checkpoint, "checkpoint_step": info.step,
            "solver": p.solver.name, "steps": p.solver.steps, "eta": p.solver.eta, "rule": p.guidance.rule,
            "params": json.dumps(p.params(), sort_keys=True) if p.params() else "",
            "prompt": p.prompt, "negative_prompt": p.negative_prompt,
            "interval_lo": iv[0] if iv else None, "interval_hi": iv[1] if iv else None, "w": p.w,
            "guidance_scale": 1 + p.w, "rows_per_image": rows_per_image(p, info.timesteps, info.alphas_cumprod),
            "n_samples": record["n_samples"], "seconds": record["seconds"],
            "samples_per_s": record["samples_per_s"], "point_id": record["id"]}


def group_name(group: tuple) -> str:
    ck, solver, g, prompt, neg = group
    name = ck.rstrip("/").rsplit("/", 1)[-1]
    iv = f"_t{g.interval[0]}-{g.interval[1]}" if g.interval else ""
    extra = "".join(f"_{k}{v}" for k, v in GridPoint(ck, solver, g).params().items() if k != "guide")
    eta = f"_eta{solver.eta:g}" if solver.name == "ddim" else ""
    text = "".join(f"_{tag}-{_slug(t)}" for tag, t in (("p", prompt), ("neg", neg)) if t)
    return f"{name}_{solver.name}{solver.steps}{eta}_{g.rule}{iv}{extra}{text}".replace("+", "p")


def _slug(text: str) -> str:
    """A prompt template as a file-name part: 'a dark {class}' → 'a-dark-class'."""
    return "-".join(re.findall(r"[a-z0-9]+", text.lower()))[:40]
