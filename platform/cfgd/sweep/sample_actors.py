"""Sampling a sweep's missing points on Ray actors; each point scored and stored as it completes.

Rows of different guidance (w, rule, parameters) share one ``CheckpointSampler.sample``
call through the per-row sampling plan; chunks of rows run as tasks on
:class:`SampleWorker` actors that load each checkpoint once.
"""

from __future__ import annotations

import json
import time
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from cfgd.data.images import to_uint8
from cfgd.diffusion.plan import Condition, SamplingPlan
from cfgd.evaluate.evaluator import Evaluator, RealSplit
from cfgd.evaluate.metrics import compute_metrics
from cfgd.io.storage import StorageOptions
from cfgd.rayenv import init_ray
from cfgd.sampling.checkpoint_sampler import CheckpointSampler
from cfgd.sweep.point_store import CheckpointInfo, SweepOutput, parquet_bytes
from cfgd.sweep.sweep_grid import GridPoint, SweepConfig, rows_per_image, sample_rows
from cfgd.sweep.sweep_table import samples_table


class SampleWorker:
    """A Ray actor: loads each checkpoint once and samples chunks of mixed-w rows."""

    def __init__(self, storage_options: StorageOptions, threads: int, use_ema: bool):
        # Ray sets OMP_NUM_THREADS=1 in workers: choose the thread count deliberately.
        torch.set_num_threads(threads)
        self.storage_options = storage_options
        self.use_ema = use_ema
        self.samplers: dict[str, CheckpointSampler] = {}

    def sample(self, task: dict) -> dict:
        """task: checkpoint, conditions (labels or Conditions), seeds, plan (a SamplingPlan, one row each).

        Returns {"task": id, "images": uint8 (B, H, W, C), "seconds": sampling time}.
        """
        ck = task["checkpoint"]
        if ck not in self.samplers:
            self.samplers[ck] = CheckpointSampler.load(ck, use_ema=self.use_ema, storage=self.storage_options)
        t0 = time.perf_counter()
        images = self.samplers[ck].sample(task["conditions"], task["seeds"], task["plan"],
                                            batch_size=len(task["seeds"]))
        return {"task": task["id"], "images": to_uint8(images), "seconds": time.perf_counter() - t0}


def point_rows(info: CheckpointInfo, cfg: SweepConfig, images: dict | None) -> tuple[np.ndarray, np.ndarray,
                                                                                    list | None]:
    """(labels, seeds, conditioning images or None) of the samples every grid point of a
    checkpoint draws: class i mod C; an image-conditioned checkpoint's real held-out rows
    (cfgd.sweep.runner.image_rows). Seeds are seed + i either way."""
    labels, seeds = sample_rows(cfg.samples_per_w, info.num_classes, cfg.seed)
    if not info.has_image:
        return labels, seeds, None
    row_labels, pngs = images[info.uri]
    return np.asarray(row_labels, dtype=np.int64), seeds, pngs


def _condition(p: GridPoint, label: int, info: CheckpointInfo, png: bytes | None):
    c = p.condition(label, info.label_names)
    if png is None:
        return c
    return (c if isinstance(c, Condition) else Condition(label=c)).model_copy(update={"image": png})


def make_tasks(missing: list[GridPoint], ids: dict[GridPoint, str], infos: dict[str, CheckpointInfo],
           cfg: SweepConfig, images: dict | None = None) -> tuple[list[dict], dict[str, dict[str, float]]]:
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
        labels, seeds, pngs = point_rows(info, cfg, images)
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
                "conditions": [_condition(p, int(labels[i]), info, pngs[i] if pngs else None) for i, p in chunk],
                "seeds": [int(seeds[i]) for i, _ in chunk],
                "plan": SamplingPlan(solver=solver, rows=tuple(p.guidance for _, p in chunk)),
                "rows": [(ids[p], i) for i, p in chunk],
            })
    return tasks, shares


def sample_points(cfg: SweepConfig, missing: list[GridPoint], ids: dict[GridPoint, str], keys: dict[GridPoint, dict],
                   infos: dict[str, CheckpointInfo], evaluator: Evaluator, real: RealSplit, out: SweepOutput,
                   log: Callable[[str], None], images: dict | None = None) -> None:
    """Sample the missing points on Ray actors; evaluate and store each point as it completes.
    ``images``: per image-conditioned checkpoint, its rows' (labels, conditioning PNGs)."""
    ray = init_ray(cfg.ray_address, cfg.num_cpus)
    from ray.util import ActorPool

    tasks, shares = make_tasks(missing, ids, infos, cfg, images)
    free = ray.available_resources().get("CPU", 0.0)
    n_workers = cfg.num_workers or max(1, int(free // cfg.cpus_per_worker))
    n_workers = min(n_workers, len(tasks))
    threads = cfg.threads_per_worker or max(1, int(cfg.cpus_per_worker))
    # SPREAD: on a multi-node cluster the actors land on different nodes (no effect on one node).
    actor_cls = ray.remote(SampleWorker).options(num_cpus=cfg.cpus_per_worker, scheduling_strategy="SPREAD")
    actors = [actor_cls.remote(cfg.storage, threads, cfg.use_ema) for _ in range(n_workers)]
    log(f"[cfgd.sweep] {sum(len(t['seeds']) for t in tasks)} rows in {len(tasks)} tasks on {n_workers} "
        f"actors ({cfg.cpus_per_worker} CPU, {threads} threads each)")
    n = cfg.samples_per_w
    by_id = {ids[p]: p for p in missing}
    shape = infos[missing[0].checkpoint].shape
    buffers = {pid: np.zeros((n, shape[1], shape[2], shape[0]), np.uint8) for pid in by_id}
    remaining = {pid: n for pid in by_id}
    seconds = {pid: 0.0 for pid in by_id}
    rows_of = {t["id"]: t["rows"] for t in tasks}
    bar = tqdm(total=sum(len(t["seeds"]) for t in tasks), desc="sweep", unit="sample", disable=not cfg.progress)
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
                finish_point(p, pid, keys[p], buffers.pop(pid), seconds[pid], infos[p.checkpoint], evaluator,
                              real, cfg, out, images)
                del remaining[pid]
                bar.set_postfix_str(f"{len(by_id) - len(remaining)}/{len(by_id)} points", refresh=False)
    finally:
        bar.close()
        for a in actors:
            ray.kill(a)


def finish_point(p: GridPoint, pid: str, key: dict, images: np.ndarray, seconds: float, info: CheckpointInfo,
                  evaluator: Evaluator, real: RealSplit, cfg: SweepConfig, out: SweepOutput,
                  conditioning: dict | None = None) -> None:
    labels, seeds, _ = point_rows(info, cfg, conditioning)
    prompts = None if p.prompt is None else [p.condition(int(c), info.label_names).prompt for c in labels]
    # Samples are scored as the uint8 images they are stored as, like the real data.
    emb = evaluator.embed(images)
    metrics = compute_metrics(emb, labels, real.reference, real.pr_reference(len(labels)), cfg.k, cfg.is_splits)
    out.write(f"points/{pid}.samples.parquet",
              parquet_bytes(samples_table(images, labels, seeds, p.w, emb.probs.argmax(1), prompts)))
    record = {"id": pid, "kind": "generated", "key": key, "metrics": metrics, "n_samples": len(labels),
              "seconds": seconds, "samples_per_s": len(labels) / seconds if seconds > 0 else None}
    out.write(f"points/{pid}.json", json.dumps(record, indent=2).encode())  # last: marks the point done
