"""Guidance sweeps: sample quality against w (and solver, steps, eta, guidance rule and
its parameters, interval, checkpoint).

For every grid point the sweep draws ``samples_per_w`` samples: sample i has class
``i mod num_classes`` and seed ``seed + i`` at *every* grid point (common random
numbers), so two points differ only by their settings, not by their noise. A text
checkpoint's sample i gets the point's prompt template for that class; an
image-conditioned checkpoint's sample i is conditioned on the real split's i-th held-out
row (its class and its conditioning image; never a row of FID's reference half). Rows of
different guidance (w, rule, parameters) share one ``CheckpointSampler.sample`` call through
the per-row sampling plan; chunks of rows run as tasks on Ray actors that load each
checkpoint once (:mod:`cfgd.sweep.sample_actors`). Each grid point's plan row is built once, in
:func:`cfgd.sweep.sweep_grid.sweep_axes`.

Output layout under ``out`` (a local directory or ``s3://``)::

    points/<id>.json             metrics of one grid point (written last: marks it done)
    points/<id>.samples.parquet  its samples: index, label, seed, w, guidance_scale, pred, image (PNG)
    points/floor-<id>.json       real held-out half vs the other half (the floor)
    table.parquet, table.csv     one row per grid point + the floor row
    plot.png                     FID vs w, accuracy and IS vs w, FID vs IS
    grid.png                     rows = w, columns = the same seeds (first non-w setting);
    grids/<group>.png            one per other setting when there are several
    sweep.json                   resolved config (secrets masked), grid, counts, timing

A point's id hashes everything that determines its numbers (checkpoint weights,
sampler settings, w, sample count, seed, evaluator weights, real data), so a rerun
with the same ``out`` skips the points already done and a changed setting never
reuses a stale result.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pyarrow as pa

from cfgd.config import ConfigError, masked
from cfgd.data import tokenizer as tokenizers
from cfgd.data.split_loader import read_rows
from cfgd.diffusion.plan import PlanError, SamplingPlan
from cfgd.evaluate.evaluator import Evaluator, RealSplit
from cfgd.evaluate.fid_inception import InceptionFID, sweep_fid_inception
from cfgd.io.access import check_access
from cfgd.sweep.point_store import CheckpointInfo, SweepOutput, checkpoint_info, csv_bytes, digest, parquet_bytes, point_key
from cfgd.sweep.sample_actors import sample_points
from cfgd.sweep.sweep_grid import GridPoint, SweepConfig, sweep_axes
from cfgd.sweep.sweep_plots import plot_sweep, write_grids
from cfgd.sweep.sweep_table import TABLE_COLUMNS, group_name, table_row


@dataclass
class SweepResult:
    out: str
    rows: list[dict]  # the table (grid points in grid order, then the floor)
    computed: list[str]  # ids of points sampled by this run
    skipped: list[str]  # ids of points found done and reused
    seconds: float
    paths: dict[str, str]


def run_sweep(cfg: SweepConfig, points: list[GridPoint] | None = None,
              log: Callable[[str], None] = print) -> SweepResult:
    """Run (or finish) the sweep described by ``cfg``; see the module docstring for outputs.

    ``points``: the grid from :func:`sweep_axes` when the caller built it already.
    """
    t_start = time.perf_counter()
    points = sweep_axes(cfg) if points is None else points
    checkpoints = list(dict.fromkeys(p.checkpoint for p in points))
    opts = cfg.storage
    infos = {uri: checkpoint_info(uri, opts, cfg.use_ema) for uri in checkpoints}
    evaluator = Evaluator.load(cfg.evaluator, opts)
    # Loaded (or refused) before any sampling; only an explicit key adds the column.
    inception = InceptionFID(cfg.inception_weights) if cfg.inception_weights else None
    for uri, info in infos.items():
        if info.shape != evaluator.image_shape or info.num_classes != len(evaluator.class_names):
            raise ValueError(f"checkpoint {uri} makes {info.num_classes} classes of images {info.shape}, but "
                             f"evaluator {cfg.evaluator} was trained on {len(evaluator.class_names)} classes of "
                             f"{evaluator.image_shape}")
        mine = [p for p in points if p.checkpoint == uri]
        check_conditions(uri, info, mine)
        for p in mine:
            try:
                SamplingPlan(solver=p.solver, rows=(p.guidance,)).check(info.timesteps)
                SamplingPlan(solver=p.solver, rows=(p.guidance,)).check_image(info.has_image)
            except PlanError as err:
                raise ConfigError(f"{err.field}: {err} (checkpoint {uri})") from None
    data_root = cfg.data_root or infos[checkpoints[0]].data_root
    if not data_root:
        raise ConfigError("data_root is required: the checkpoint does not name its data")
    out_uri = cfg.out or os.path.join("outputs", "sweeps", checkpoints[0].rstrip("/").rsplit("/", 1)[-1])
    check_access(out_uri, opts, write=True)
    out = SweepOutput(out_uri, opts)

    keys = {p: point_key(p, infos[p.checkpoint], cfg, evaluator, data_root) for p in points}
    ids = {p: digest(keys[p]) for p in points}
    done = {p for p in points if out.exists(f"points/{ids[p]}.json")}
    missing = [p for p in points if p not in done]
    floor_id = "floor-" + digest({"evaluator_sha256": evaluator.sha256, "data_root": data_root,
                                    "real_split": cfg.real_split, "n": cfg.samples_per_w, "seed": cfg.seed,
                                    "k": cfg.k, "is_splits": cfg.is_splits})
    need_floor = not out.exists(f"points/{floor_id}.json")
    log(f"[cfgd.sweep] {len(points)} grid points ({len(done)} already done) × {cfg.samples_per_w} samples → {out_uri}")

    if missing or need_floor:
        real = RealSplit.load(evaluator, data_root, cfg.real_split, opts, seed=cfg.seed)
        n_real = len(real.held_out) + len(real.reference)
        log(f"[cfgd.sweep] real {data_root}/{cfg.real_split}: {n_real} images, evaluator "
            f"{cfg.evaluator} (test accuracy {evaluator.test_accuracy:.4f})")
    if need_floor:
        n = min(cfg.samples_per_w, len(real.held_out))
        floor = {"id": floor_id, "kind": "real_floor", "n_samples": n,
                 "metrics": real.floor(n, cfg.k, cfg.is_splits)}
        out.write(f"points/{floor_id}.json", json.dumps(floor, indent=2).encode())

    if missing:
        images = {info.uri: image_rows(uri, info, data_root, cfg, real) for uri, info in infos.items()
                  if info.has_image}
        sample_points(cfg, missing, ids, keys, infos, evaluator, real, out, log, images)

    rows = [{**table_row(json.loads(out.read(f"points/{ids[p]}.json")), p, infos[p.checkpoint]),
             "group": group_name(p.group)} for p in points]
    floor = json.loads(out.read(f"points/{floor_id}.json"))
    rows.append({**{c: None for c in TABLE_COLUMNS}, **floor["metrics"], "kind": "real_floor",
                 "n_samples": floor["n_samples"], "point_id": floor_id})
    columns = TABLE_COLUMNS
    if inception is not None:
        fids = sweep_fid_inception(inception, out, [ids[p] for p in points], floor_id, data_root, cfg.real_split,
                                   cfg.seed, opts, log)
        for r in rows:
            r["fid_inception"] = fids[r["point_id"]]
        columns = TABLE_COLUMNS + ["fid_inception"]
    table = pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in rows])
    paths = {"table_parquet": out.write("table.parquet", parquet_bytes(table)),
             "table_csv": out.write("table.csv", csv_bytes(table)),
             "plot": out.write("plot.png", plot_sweep(rows))}
    paths.update(write_grids(out, points, ids, cfg.grid_columns, cfg.grid_zoom))
    seconds = time.perf_counter() - t_start
    summary = {"config": masked(_config_dict(cfg)), "out": out_uri, "data_root": data_root,
               "evaluator_sha256": evaluator.sha256, "points": {ids[p]: keys[p] for p in points},
               "computed": [ids[p] for p in missing], "skipped": [ids[p] for p in points if p in done],
               "seconds": seconds}
    if inception is not None:
        summary["inception_weights_sha256"] = inception.sha256
    paths["summary"] = out.write("sweep.json", json.dumps(summary, indent=2, default=str).encode())
    log(f"[cfgd.sweep] done in {seconds:.1f}s: {len(missing)} points sampled, {len(done)} skipped; "
        f"table {paths['table_csv']}, plot {paths['plot']}, grid {paths['grid']}")
    return SweepResult(out_uri, rows, [ids[p] for p in missing], [ids[p] for p in points if p in done],
                       seconds, paths)


def image_rows(uri: str, info: CheckpointInfo, data_root: str, cfg: SweepConfig,
               real: RealSplit) -> tuple[np.ndarray, list[bytes]]:
    """An image-conditioned checkpoint's sample rows: the first ``samples_per_w`` rows of the
    real split's held-out half (never FID's reference), their labels and conditioning images."""
    index = real.held_out_index[:cfg.samples_per_w]
    if len(index) < cfg.samples_per_w:
        raise ConfigError(f"samples_per_w={cfg.samples_per_w}: checkpoint {uri} is conditioned on images, one per "
                          f"sample from the {len(real.held_out_index)} held-out rows of {cfg.real_split}")
    data = read_rows(data_root, cfg.real_split, [int(i) for i in index], cfg.storage)
    if "cond_image" not in data or tuple(data["cond_image"].shape[1:]) != info.cond_shape:
        got = tuple(data["cond_image"].shape[1:]) if "cond_image" in data else "no cond_image column"
        raise ConfigError(f"data_root={data_root!r}: checkpoint {uri} takes conditioning images of (c, h, w) = "
                          f"{info.cond_shape}; {cfg.real_split} has {got}")
    return data["label"], [bytes(b) for b in data["cond_png"]]


def check_conditions(uri: str, info: CheckpointInfo, points: list[GridPoint]) -> None:
    """ConfigError naming the key when a point's condition does not fit its checkpoint: prompts
    for a text checkpoint (tokenized here, every class's, before anything is sampled), labels
    for a label checkpoint."""
    prompted = [p for p in points if p.prompt is not None]
    if info.condition == "label":
        if prompted:
            raise ConfigError(f"prompt: checkpoint {uri} is conditioned on class labels, not text (drop prompt)")
        return
    if info.condition != "text":
        raise ConfigError(f"checkpoint {uri} is conditioned on {info.condition}; sweeps take label and text "
                          "checkpoints")
    if len(prompted) != len(points):
        raise ConfigError(f"prompt is required: checkpoint {uri} is conditioned on text (e.g. prompt='a {{class}}')")
    tok = tokenizers.cached(info.tokenizer_json)
    for p in prompted:
        for name in ("prompt", "negative_prompt"):
            try:
                rows = [p.condition(c, info.label_names) for c in range(info.num_classes)]
                tok.encode([getattr(r, name) or "" for r in rows], name)
            except ValueError as err:  # pydantic's ValidationError is one too
                raise ConfigError(f"{name}={getattr(p, name)!r}: {err} (checkpoint {uri})") from None


def _config_dict(cfg: SweepConfig) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(cfg))
