"""Guidance sweeps: sample quality against w (and solver, steps, eta, guidance rule and
its parameters, interval, checkpoint).

For every grid point the sweep draws ``samples_per_w`` samples: sample i has class
``i mod num_classes`` and seed ``seed + i`` at *every* grid point (common random
numbers), so two points differ only by their settings, not by their noise. Rows of
different guidance (w, rule, parameters) share one ``Generator.sample`` call through
the per-row sampling plan; chunks of rows run as tasks on Ray actors that load each
checkpoint once. Each grid point's plan row is built once, in :func:`sweep_axes`.

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

import hashlib
import io
import json
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from cfgd import storage
from cfgd.checkpoint import fetch_checkpoint, read_checkpoint
from cfgd.config import ConfigError, masked
from cfgd.evaluate import Evaluator, RealSplit, compute_metrics
from cfgd.fid_inception import InceptionFID, sweep_fid_inception
from cfgd.generate import Generator
from cfgd.grid import labelled_grid
from cfgd.images import decode_png, encode_png, to_uint8
from cfgd.plan import PlanError, SamplingPlan
from cfgd.rayenv import init_ray
from cfgd.storage import StorageOptions
from cfgd.sweep_grid import GridPoint, SweepConfig, rows_per_image, sample_rows, sweep_axes  # noqa: F401

TABLE_COLUMNS = ["kind", "checkpoint", "checkpoint_step", "solver", "steps", "eta", "rule", "params", "interval_lo",
                 "interval_hi", "w", "guidance_scale", "rows_per_image", "fid", "fid_std", "inception_score",
                 "inception_score_std", "accuracy", "precision", "recall", "n_samples", "seconds", "samples_per_s",
                 "point_id"]


# ------------------------------------------------------------------ Ray workers


class SampleWorker:
    """A Ray actor: loads each checkpoint once and samples chunks of mixed-w rows."""

    def __init__(self, storage_options: StorageOptions, threads: int, use_ema: bool):
        # Ray sets OMP_NUM_THREADS=1 in workers: choose the thread count deliberately.
        torch.set_num_threads(threads)
        self.storage_options = storage_options
        self.use_ema = use_ema
        self.generators: dict[str, Generator] = {}

    def sample(self, task: dict) -> dict:
        """task: checkpoint, labels, seeds, plan (a SamplingPlan, one row per label).

        Returns {"task": id, "images": uint8 (B, H, W, C), "seconds": sampling time}.
        """
        ck = task["checkpoint"]
        if ck not in self.generators:
            self.generators[ck] = Generator.load(ck, use_ema=self.use_ema, storage=self.storage_options)
        t0 = time.perf_counter()
        images = self.generators[ck].sample(task["labels"], task["seeds"], task["plan"],
                                            batch_size=len(task["labels"]))
        return {"task": task["id"], "images": to_uint8(images), "seconds": time.perf_counter() - t0}


# ------------------------------------------------------------------ storage helpers


class _Out:
    """Reads and writes under the sweep's output location (local or s3://)."""

    def __init__(self, uri: str, opts: StorageOptions):
        self.uri, self.opts = uri.rstrip("/"), opts
        self.fs = storage.fsspec_fs(uri, opts)

    def path(self, rel: str) -> str:
        return f"{self.uri}/{rel}"

    def exists(self, rel: str) -> bool:
        return self.fs.exists(storage.arrow_path(self.path(rel)))

    def write(self, rel: str, data: bytes) -> str:
        storage.write_bytes_atomic(self.path(rel), data, self.opts)
        return self.path(rel)

    def read(self, rel: str) -> bytes:
        return storage.read_bytes(self.path(rel), self.opts)


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def _csv_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pacsv.write_csv(table, sink)
    return sink.getvalue().to_pybytes()


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------ the sweep


@dataclass
class CheckpointInfo:
    uri: str  # what workers load (the resolved local directory for local checkpoints)
    sha256: str
    step: int
    num_classes: int
    shape: tuple[int, int, int]
    timesteps: int
    alphas_cumprod: Any
    data_root: str


def _checkpoint_info(uri: str, opts: StorageOptions, use_ema: bool) -> CheckpointInfo:
    local = fetch_checkpoint(uri, opts)
    ck = read_checkpoint(local)
    # Local: pin the resolved checkpoint so a newer one arriving mid-sweep is not mixed in.
    return CheckpointInfo(uri=uri if storage.is_remote(uri) else str(local), sha256=ck.weights_sha256(use_ema),
                          step=ck.step, num_classes=ck.spec.num_classes, shape=ck.shape, timesteps=ck.timesteps,
                          alphas_cumprod=ck.schedule().alphas_cumprod, data_root=ck.data_root)


@dataclass
class SweepResult:
    out: str
    rows: list[dict]  # the table (grid points in grid order, then the floor)
    computed: list[str]  # ids of points sampled by this run
    skipped: list[str]  # ids of points found done and reused
    seconds: float
    paths: dict[str, str]


def _point_key(p: GridPoint, ck: CheckpointInfo, cfg: SweepConfig, ev: Evaluator, data_root: str) -> dict:
    # Keys of the default CFG/DDIM point keep the shape they had before rules existed, so
    # earlier sweeps' results are reused; anything else adds the full plan row.
    g = p.guidance
    key = {"checkpoint": p.checkpoint, "checkpoint_sha256": ck.sha256, "steps": p.solver.steps, "eta": p.solver.eta,
           "interval": list(g.interval) if g.interval else None, "w": g.w, "spacing": p.solver.spacing,
           "use_ema": cfg.use_ema, "samples_per_w": cfg.samples_per_w, "seed": cfg.seed,
            "evaluator_sha256": ev.sha256, "data_root": data_root, "real_split": cfg.real_split,
            "k": cfg.k, "is_splits": cfg.is_splits}
    if p.solver.name != "ddim" or g.rule != "cfg" or p.params():
        key["plan"] = {"solver": p.solver.model_dump(), "guidance": g.model_dump()}
    return key


def _tasks(missing: list[GridPoint], ids: dict[GridPoint, str], infos: dict[str, CheckpointInfo],
           cfg: SweepConfig) -> tuple[list[dict], dict[str, dict[str, float]]]:
    """Chunks of rows (sample-major, so each chunk mixes every missing w of its group).

    Returns the tasks and, per task, each point's share of its network cost (to
    attribute the task's time to points).
    """
    tasks, shares = [], {}
    by_group: dict[tuple, list[GridPoint]] = {}
    for p in missing:
        by_group.setdefault((p.checkpoint, p.solver), []).append(p)
    for (ck_uri, solver), points in by_group.items():
        info = infos[ck_uri]
        labels, seeds = sample_rows(cfg.samples_per_w, info.num_classes, cfg.seed)
        cost_of = {p: rows_per_image(p, info.timesteps, info.alphas_cumprod) for p in points}
        rows = [(i, p) for i in range(cfg.samples_per_w) for p in points]
        for lo in range(0, len(rows), cfg.chunk_size):
            chunk = rows[lo:lo + cfg.chunk_size]
            tid = f"t{len(tasks)}"
            cost: dict[str, float] = {}
            for _, p in chunk:
                cost[ids[p]] = cost.get(ids[p], 0.0) + cost_of[p]
            total = sum(cost.values())
            shares[tid] = {k: v / total for k, v in cost.items()}
            tasks.append({
                "id": tid, "checkpoint": info.uri,
                "labels": [int(labels[i]) for i, _ in chunk], "seeds": [int(seeds[i]) for i, _ in chunk],
                "plan": SamplingPlan(solver=solver, rows=tuple(p.guidance for _, p in chunk)),
                "rows": [(ids[p], i) for i, p in chunk],
            })
    return tasks, shares


def _samples_table(images: np.ndarray, labels: np.ndarray, seeds: np.ndarray, w: float,
                   preds: np.ndarray) -> pa.Table:
    n = len(labels)
    return pa.table({
        "index": pa.array(np.arange(n, dtype=np.int64)), "label": pa.array(labels.astype(np.int64)),
        "seed": pa.array(seeds.astype(np.int64)), "w": pa.array(np.full(n, w)),
        "guidance_scale": pa.array(np.full(n, 1 + w)), "pred": pa.array(preds.astype(np.int64)),
        "image": pa.array([encode_png(im) for im in images], type=pa.binary()),
    })


def run_sweep(cfg: SweepConfig, points: list[GridPoint] | None = None,
              log: Callable[[str], None] = print) -> SweepResult:
    """Run (or finish) the sweep described by ``cfg``; see the module docstring for outputs.

    ``points``: the grid from :func:`sweep_axes` when the caller built it already.
    """
    t_start = time.perf_counter()
    points = sweep_axes(cfg) if points is None else points
    checkpoints = list(dict.fromkeys(p.checkpoint for p in points))
    opts = cfg.storage
    infos = {uri: _checkpoint_info(uri, opts, cfg.use_ema) for uri in checkpoints}
    evaluator = Evaluator.load(cfg.evaluator, opts)
    # Loaded (or refused) before any sampling; only an explicit key adds the column.
    inception = InceptionFID(cfg.inception_weights) if cfg.inception_weights else None
    for uri, info in infos.items():
        if info.shape != evaluator.image_shape or info.num_classes != len(evaluator.class_names):
            raise ValueError(f"checkpoint {uri} makes {info.num_classes} classes of images {info.shape}, but "
                             f"evaluator {cfg.evaluator} was trained on {len(evaluator.class_names)} classes of "
                             f"{evaluator.image_shape}")
        for p in points:
            if p.checkpoint == uri:
                try:
                    SamplingPlan(solver=p.solver, rows=(p.guidance,)).check(info.timesteps)
                except PlanError as err:
                    raise ConfigError(f"{err.field}: {err} (checkpoint {uri})") from None
    data_root = cfg.data_root or infos[checkpoints[0]].data_root
    if not data_root:
        raise ConfigError("data_root is required: the checkpoint does not name its data")
    out_uri = cfg.out or os.path.join("outputs", "sweeps", checkpoints[0].rstrip("/").rsplit("/", 1)[-1])
    storage.check_access(out_uri, opts, write=True)
    out = _Out(out_uri, opts)

    keys = {p: _point_key(p, infos[p.checkpoint], cfg, evaluator, data_root) for p in points}
    ids = {p: _digest(keys[p]) for p in points}
    done = {p for p in points if out.exists(f"points/{ids[p]}.json")}
    missing = [p for p in points if p not in done]
    floor_id = "floor-" + _digest({"evaluator_sha256": evaluator.sha256, "data_root": data_root,
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
        _sample_points(cfg, missing, ids, keys, infos, evaluator, real, out, log)

    rows = [{**_table_row(json.loads(out.read(f"points/{ids[p]}.json")), p, infos[p.checkpoint]),
             "group": _group_name(p.group)} for p in points]
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
    paths = {"table_parquet": out.write("table.parquet", _parquet_bytes(table)),
             "table_csv": out.write("table.csv", _csv_bytes(table)),
             "plot": out.write("plot.png", plot_sweep(rows))}
    paths.update(_write_grids(out, points, ids, cfg.grid_columns, cfg.grid_zoom))
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


def _config_dict(cfg: SweepConfig) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(cfg))


def _sample_points(cfg: SweepConfig, missing: list[GridPoint], ids: dict[GridPoint, str], keys: dict[GridPoint, dict],
                   infos: dict[str, CheckpointInfo], evaluator: Evaluator, real: RealSplit, out: _Out,
                   log: Callable[[str], None]) -> None:
    """Sample the missing points on Ray actors; evaluate and store each point as it completes."""
    ray = init_ray(cfg.ray_address, cfg.num_cpus)
    from ray.util import ActorPool

    tasks, shares = _tasks(missing, ids, infos, cfg)
    free = ray.available_resources().get("CPU", 0.0)
    n_workers = cfg.num_workers or max(1, int(free // cfg.cpus_per_worker))
    n_workers = min(n_workers, len(tasks))
    threads = cfg.threads_per_worker or max(1, int(cfg.cpus_per_worker))
    # SPREAD: on a multi-node cluster the actors land on different nodes (no effect on one node).
    actor_cls = ray.remote(SampleWorker).options(num_cpus=cfg.cpus_per_worker, scheduling_strategy="SPREAD")
    actors = [actor_cls.remote(cfg.storage, threads, cfg.use_ema) for _ in range(n_workers)]
    log(f"[cfgd.sweep] {sum(len(t['labels']) for t in tasks)} rows in {len(tasks)} tasks on {n_workers} "
        f"actors ({cfg.cpus_per_worker} CPU, {threads} threads each)")
    n = cfg.samples_per_w
    by_id = {ids[p]: p for p in missing}
    shape = infos[missing[0].checkpoint].shape
    buffers = {pid: np.zeros((n, shape[1], shape[2], shape[0]), np.uint8) for pid in by_id}
    remaining = {pid: n for pid in by_id}
    seconds = {pid: 0.0 for pid in by_id}
    rows_of = {t["id"]: t["rows"] for t in tasks}
    bar = tqdm(total=sum(len(t["labels"]) for t in tasks), desc="sweep", unit="sample", disable=not cfg.progress)
    try:
        for res in ActorPool(actors).map_unordered(lambda a, t: a.sample.remote(t), tasks):
            for (pid, i), img in zip(rows_of[res["task"]], res["images"]):
                buffers[pid][i] = img
                remaining[pid] -= 1
            for pid, share in shares[res["task"]].items():
                seconds[pid] += share * res["seconds"]
            bar.update(len(res["images"]))
            for pid in [pid for pid, left in remaining.items() if left == 0]:
                p = by_id[pid]
                _finish_point(p, pid, keys[p], buffers.pop(pid), seconds[pid], infos[p.checkpoint], evaluator,
                              real, cfg, out)
                del remaining[pid]
                bar.set_postfix_str(f"{len(by_id) - len(remaining)}/{len(by_id)} points", refresh=False)
    finally:
        bar.close()
        for a in actors:
            ray.kill(a)


def _finish_point(p: GridPoint, pid: str, key: dict, images: np.ndarray, seconds: float, info: CheckpointInfo,
                  evaluator: Evaluator, real: RealSplit, cfg: SweepConfig, out: _Out) -> None:
    labels, seeds = sample_rows(cfg.samples_per_w, info.num_classes, cfg.seed)
    # Samples are scored as the uint8 images they are stored as, like the real data.
    emb = evaluator.embed(images)
    metrics = compute_metrics(emb, labels, real.reference, real.pr_reference(len(labels)), cfg.k, cfg.is_splits)
    out.write(f"points/{pid}.samples.parquet",
              _parquet_bytes(_samples_table(images, labels, seeds, p.w, emb.probs.argmax(1))))
    record = {"id": pid, "kind": "generated", "key": key, "metrics": metrics, "n_samples": len(labels),
              "seconds": seconds, "samples_per_s": len(labels) / seconds if seconds > 0 else None}
    out.write(f"points/{pid}.json", json.dumps(record, indent=2).encode())  # last: marks the point done


def _table_row(record: dict, p: GridPoint, info: CheckpointInfo) -> dict:
    iv = p.guidance.interval
    return {**record["metrics"], "kind": "generated", "checkpoint": p.checkpoint, "checkpoint_step": info.step,
            "solver": p.solver.name, "steps": p.solver.steps, "eta": p.solver.eta, "rule": p.guidance.rule,
            "params": json.dumps(p.params(), sort_keys=True) if p.params() else "",
            "interval_lo": iv[0] if iv else None, "interval_hi": iv[1] if iv else None, "w": p.w,
            "guidance_scale": 1 + p.w, "rows_per_image": rows_per_image(p, info.timesteps, info.alphas_cumprod),
            "n_samples": record["n_samples"], "seconds": record["seconds"],
            "samples_per_s": record["samples_per_s"], "point_id": record["id"]}


# ------------------------------------------------------------------ pictures


def _group_name(group: tuple) -> str:
    ck, solver, g = group
    name = ck.rstrip("/").rsplit("/", 1)[-1]
    iv = f"_t{g.interval[0]}-{g.interval[1]}" if g.interval else ""
    extra = "".join(f"_{k}{v}" for k, v in GridPoint(ck, solver, g).params().items() if k != "guide")
    eta = f"_eta{solver.eta:g}" if solver.name == "ddim" else ""
    return f"{name}_{solver.name}{solver.steps}{eta}_{g.rule}{iv}{extra}".replace("+", "p")


def _write_grids(out: _Out, points: list[GridPoint], ids: dict[GridPoint, str], columns: int,
                 zoom: int) -> dict[str, str]:
    """grid.png for the first group (rows = w, the same seeds in every row), grids/* for every group."""
    groups: dict[tuple, list[GridPoint]] = {}
    for p in points:
        groups.setdefault(p.group, []).append(p)
    paths = {}
    for gi, (group, members) in enumerate(groups.items()):
        images, seeds = [], None
        for p in members:
            t = pq.read_table(io.BytesIO(out.read(f"points/{ids[p]}.samples.parquet")), columns=["seed", "image"])
            t = t.slice(0, columns)
            s = t.column("seed").to_pylist()
            assert seeds is None or s == seeds, "grid rows must share seeds"
            seeds = s
            images += [decode_png(b) for b in t.column("image").to_pylist()]
        png = io.BytesIO()
        labelled_grid(np.stack(images), [f"w={p.w:g}" for p in members], len(seeds), zoom=zoom, left=48,
                      font_size=None).save(png, format="PNG")
        if gi == 0:
            paths["grid"] = out.write("grid.png", png.getvalue())
        if len(groups) > 1:
            paths[f"grid:{_group_name(group)}"] = out.write(f"grids/{_group_name(group)}.png", png.getvalue())
    return paths


def plot_sweep(rows: list[dict]) -> bytes:
    """PNG: FID vs w; accuracy and IS vs w; FID vs IS (as in Ho & Salimans' Fig. 4). Floor dashed."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, Agg renders the PNG

    gen = [r for r in rows if r["kind"] == "generated"]
    floor = next((r for r in rows if r["kind"] == "real_floor"), None)
    groups: dict[tuple, list[dict]] = {}
    for r in gen:
        groups.setdefault(r["group"], []).append(r)
    fig = Figure(figsize=(16, 4.6), layout="constrained")
    ax_fid, ax_acc, ax_tradeoff = fig.subplots(1, 3)
    ax_is = ax_acc.twinx()
    for gi, (key, rs) in enumerate(groups.items()):
        rs = sorted(rs, key=lambda r: r["w"])
        w = [r["w"] for r in rs]
        name = key if len(groups) > 1 else None
        color = f"C{gi % 10}"
        ax_fid.plot(w, [r["fid"] for r in rs], "o-", color=color, label=name)
        ax_acc.plot(w, [r["accuracy"] for r in rs], "o-", color=color, label=name and f"accuracy {name}")
        ax_is.plot(w, [r["inception_score"] for r in rs], "s--", color=color, alpha=0.6)
        ax_tradeoff.plot([r["inception_score"] for r in rs], [r["fid"] for r in rs], "o-", color=color, label=name)
        for r in rs:
            ax_tradeoff.annotate(f"w={r['w']:g}", (r["inception_score"], r["fid"]), textcoords="offset points",
                                 xytext=(4, 4), fontsize=8)
    if floor is not None:
        ax_fid.axhline(floor["fid"], color="gray", ls=":", label="real vs real (floor)")
        ax_acc.axhline(floor["accuracy"], color="gray", ls=":", label="real data accuracy")
        ax_is.axhline(floor["inception_score"], color="gray", ls="-.", alpha=0.5)
        ax_tradeoff.plot([floor["inception_score"]], [floor["fid"]], "k*", ms=10, label="real vs real")
    ax_fid.set(xlabel="guidance strength w", ylabel="FID (evaluator features)", title="FID vs w")
    ax_acc.set(xlabel="guidance strength w", ylabel="conditional accuracy (o-)", title="accuracy and IS vs w")
    ax_is.set_ylabel("Inception Score (s--)")
    ax_tradeoff.set(xlabel="Inception Score", ylabel="FID", title="FID vs IS (trade-off)")
    for ax in (ax_fid, ax_acc, ax_tradeoff):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()
