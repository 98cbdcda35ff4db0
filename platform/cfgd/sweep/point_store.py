"""Where a sweep keeps its results, and what makes two grid points the same.

A point's id hashes everything that determines its numbers (checkpoint weights, sampler
settings, w, sample count, seed, evaluator weights, real data): :func:`point_key` and
:func:`digest`. A point is done when ``points/<id>.json`` exists under the sweep's
output (:class:`SweepOutput`, local or ``s3://``), so a rerun skips it and a changed
setting never reuses a stale result.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from cfgd.evaluate.evaluator import Evaluator
from cfgd.io import storage, transfers
from cfgd.io.checkpoint import fetch_checkpoint, read_checkpoint
from cfgd.io.storage import StorageOptions
from cfgd.sweep.sweep_grid import GridPoint, SweepConfig


class SweepOutput:
    """Reads and writes under the sweep's output location (local or s3://)."""

    def __init__(self, uri: str, opts: StorageOptions):
        self.uri, self.opts = uri.rstrip("/"), opts
        self.fs = storage.fsspec_fs(uri, opts)

    def path(self, rel: str) -> str:
        return f"{self.uri}/{rel}"

    def exists(self, rel: str) -> bool:
        return self.fs.exists(storage.arrow_path(self.path(rel)))

    def write(self, rel: str, data: bytes) -> str:
        transfers.write_bytes_atomic(self.path(rel), data, self.opts)
        return self.path(rel)

    def read(self, rel: str) -> bytes:
        return transfers.read_bytes(self.path(rel), self.opts)


def parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def csv_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pacsv.write_csv(table, sink)
    return sink.getvalue().to_pybytes()


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


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
    condition: str = "label"  # what the network is conditioned on (ModelSpec.condition)
    label_names: tuple[str, ...] = ()
    tokenizer_json: str | None = None  # a text checkpoint's tokenizer
    has_image: bool = False  # conditioned on an image too
    cond_shape: tuple[int, int, int] = (0, 0, 0)  # its conditioning image's (c, h, w)


def checkpoint_info(uri: str, opts: StorageOptions, use_ema: bool) -> CheckpointInfo:
    local = fetch_checkpoint(uri, opts)
    ck = read_checkpoint(local)
    # Local: pin the resolved checkpoint so a newer one arriving mid-sweep is not mixed in.
    return CheckpointInfo(uri=uri if storage.is_remote(uri) else str(local), sha256=ck.weights_sha256(use_ema),
                          step=ck.step, num_classes=ck.spec.num_classes, shape=ck.shape, timesteps=ck.timesteps,
                          alphas_cumprod=ck.schedule().alphas_cumprod, data_root=ck.data_root,
                          condition=ck.spec.condition, label_names=tuple(ck.label_names),
                          tokenizer_json=ck.tokenizer_json if ck.spec.condition == "text" else None,
                          has_image=ck.spec.has_image,
                          cond_shape=(ck.spec.cond_channels, ck.spec.cond_height, ck.spec.cond_width))


def point_key(p: GridPoint, ck: CheckpointInfo, cfg: SweepConfig, ev: Evaluator, data_root: str) -> dict:
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
    if p.prompt is not None:
        key["prompt"], key["negative_prompt"] = p.prompt, p.negative_prompt
    return key
