"""``jobs/embed.py``: add an ``embedding`` column to existing shards with Ray Data.

Each input shard becomes one output shard with the same rows in the same order and one
more column (cfgd.data.embedding_column). The images go through the encoder in Ray
Data's ``map_batches`` over an actor pool (the encoder is built once per actor, on a GPU
share when ``gpus_per_actor`` > 0), order preserved; the driver checks that every row got
exactly one vector and writes the shard in one object (one PUT, or an atomic local
rename) into a progress directory ``<out>/.<split>.partial/``. A rerun skips the shards
already there, so a killed job, driver or worker, resumes per shard without losing or
repeating rows; when a split's last shard is written the progress directory becomes
``<out>/<split>`` in one move (cfgd.io.atomic.replace_dir), so a half-embedded split is
never read as a data set.
"""

from __future__ import annotations

import importlib
import io
import logging
import posixpath
import time
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow.parquet as pq

from cfgd.data.embedding_column import EMBEDDING, with_embedding
from cfgd.data.shards import read_split_meta, split_path
from cfgd.data.split_loader import decode_batch
from cfgd.embed.embed_config import EmbedConfig
from cfgd.io import access, atomic, transfers
from cfgd.io.storage import fsspec_fs, is_remote, strip_scheme


def import_callable(path: str) -> Callable:
    """'module:callable' → the callable; ValueError naming ``encoder`` when it cannot be imported."""
    module, _, name = path.partition(":")
    try:
        obj = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"encoder={path!r} cannot be imported: {err}") from None
    if not callable(obj):
        raise ValueError(f"encoder={path!r} is not callable")
    return obj


def build_encoder(path: str, args: dict) -> Callable:
    """The encoder named by import path, built with ``args``; ValueError naming what does not fit."""
    make = import_callable(path)
    try:
        return make(**args)
    except TypeError as err:
        raise ValueError(f"encoder_args {dict(args)} do not fit encoder {path!r}: {err}") from None


def as_vectors(out: Any, n: int, encoder: str) -> np.ndarray:
    """An encoder's output for n images → float32 (n, L, D); ValueError naming the encoder."""
    v = np.asarray(out, dtype=np.float32)
    if v.ndim == 2:
        v = v[:, None, :]
    if v.ndim != 3 or v.shape[0] != n:
        raise ValueError(f"encoder {encoder} returned shape {v.shape} for {n} images; expected (n, D) or (n, L, D)")
    return v


class EncodeActor:
    """One actor of the pool: decodes PNG rows and runs the encoder on them."""

    def __init__(self, encoder: str, encoder_args: dict, shape: tuple[int, int, int], threads: int):
        import torch

        torch.set_num_threads(max(1, threads))
        self.name, self.shape = encoder, shape
        self.encode = build_encoder(encoder, encoder_args)

    def __call__(self, batch: dict) -> dict:
        h, w, c = self.shape
        images = decode_batch({"image": batch["image"], "label": np.zeros(len(batch["image"]))}, h, w, c)["image"]
        v = as_vectors(self.encode(images), len(images), self.name)
        return {EMBEDDING: v.reshape(len(v), -1)}


def _shard_done(fs, path: str, rows: int) -> bool:
    """Whether ``path`` is a complete output shard of ``rows`` rows (written in one piece)."""
    if not fs.exists(path):
        return False
    try:
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            return pf.metadata.num_rows == rows and EMBEDDING in pf.schema_arrow.names
    except Exception:  # noqa: BLE001 - unreadable: redo it
        return False


def run(cfg: EmbedConfig, log: Callable[[str], None] = print) -> dict[str, str]:
    """Embed every split of ``cfg.splits``; returns {split: output split directory}."""
    import ray.data

    from cfgd.rayenv import init_ray

    opts = cfg.storage
    access.check_access(cfg.data_root, opts)
    access.check_access(cfg.out, opts, write=True)
    fs_in, fs_out = fsspec_fs(cfg.data_root, opts), fsspec_fs(cfg.out, opts)
    probe_encoder = build_encoder(cfg.encoder, cfg.encoder_args)
    describe = getattr(probe_encoder, "describe", None)
    description = {"encoder": cfg.encoder, "encoder_args": dict(cfg.encoder_args),
                   **(describe() if callable(describe) else {})}
    init_ray(cfg.ray_address, cfg.num_cpus)
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # per-dataset INFO lines: the log file has them
    ray.data.DataContext.get_current().enable_progress_bars = False
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    written = {}
    for split in cfg.splits:
        meta = read_split_meta(cfg.data_root, split, fs_in)
        final = split_path(cfg.out, split, fs_out)
        if not cfg.overwrite and _split_done(cfg.out, split, fs_out, meta.num_rows):
            log(f"{split}: already embedded at {final} ({meta.num_rows} rows); overwrite=true recomputes it")
            written[split] = final
            continue
        shape = (meta.height, meta.width, meta.channels)
        probe = decode_batch(_read(fs_in, meta.files[0]).slice(0, 2).to_pydict() | {"label": [0, 0]}, *shape)
        dims = as_vectors(probe_encoder(probe["image"]), len(probe["image"]), cfg.encoder).shape[1:]
        log(f"{split}: {meta.num_rows} rows in {len(meta.files)} shard(s) → {dims[0]}×{dims[1]} embeddings "
            f"by {cfg.encoder}, {cfg.num_actors} actor(s)")
        progress = posixpath.join(posixpath.dirname(final), f".{split}.partial")
        fs_out.makedirs(progress, exist_ok=True)
        pending = []
        for path in meta.files:
            target = posixpath.join(progress, posixpath.basename(path))
            if _shard_done(fs_out, target, _num_rows(fs_in, path)):
                log(f"{split}/{posixpath.basename(path)}: done in an earlier run, kept")
            else:
                pending.append((target, _read(fs_in, path)))
        t0 = time.perf_counter()
        for (target, table), vectors in zip(pending, _encode(cfg, [t for _, t in pending], shape)):
            out = with_embedding(table, vectors.reshape(table.num_rows, *dims), description)
            buf = io.BytesIO()
            pq.write_table(out, buf)
            transfers.write_bytes_atomic(f"s3://{target}" if is_remote(cfg.out) else target, buf.getvalue(), opts)
            dt = time.perf_counter() - t0
            log(f"{split}/{posixpath.basename(target)}: {table.num_rows} rows written ({dt:.1f} s into the split)")
        atomic.replace_dir(progress, final, fs_out)
        written[split] = final
        log(f"{split}: {final}")
    _copy_tokenizer(cfg)
    return written


def _read(fs, path: str):
    with fs.open(path, "rb") as f:
        return pq.ParquetFile(f).read()


def _num_rows(fs, path: str) -> int:
    with fs.open(path, "rb") as f:
        return pq.ParquetFile(f).metadata.num_rows


def _split_done(root: str, split: str, fs, rows: int) -> bool:
    try:
        meta = read_split_meta(root, split, fs)
    except ValueError:
        return False
    return meta.num_rows == rows and EMBEDDING in meta.conditions


def _encode(cfg: EmbedConfig, tables: list, shape) -> Iterator[np.ndarray]:
    """Each table's images through one actor pool, in row order: per table (N, L·D) float32,
    yielded as soon as its last row is back, so shards are written while the pool runs on."""
    import ray.data

    if not tables:
        return
    sizes = [t.num_rows for t in tables]
    ds = ray.data.from_arrow([t.select(["image"]) for t in tables])  # a block per shard: written as each completes
    threads = max(1, int(cfg.cpus_per_actor))
    ds = ds.map_batches(EncodeActor, batch_size=cfg.batch_size, batch_format="numpy",
                        fn_constructor_kwargs={"encoder": cfg.encoder, "encoder_args": dict(cfg.encoder_args),
                                               "shape": shape, "threads": threads},
                        compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
                        num_cpus=cfg.cpus_per_actor, num_gpus=cfg.gpus_per_actor or None,
                        max_restarts=-1, max_task_retries=-1)
    buffered, k = [], 0
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        buffered.append(batch[EMBEDDING])
        have = sum(len(b) for b in buffered)
        while k < len(sizes) and have >= sizes[k]:
            rows = np.concatenate(buffered)
            yield rows[:sizes[k]]
            buffered, have, k = [rows[sizes[k]:]], have - sizes[k], k + 1
    left = sum(len(b) for b in buffered)
    if k != len(sizes) or left:  # never write a shard with lost or repeated rows
        raise RuntimeError(f"the encoder pool returned {sum(sizes[:k]) + left} vectors for {sum(sizes)} rows")


def _copy_tokenizer(cfg: EmbedConfig) -> None:
    """A captioned data set's tokenizer.json goes along (the captions are kept too)."""
    from cfgd.data.tokenizer import TOKENIZER_FILE

    src = f"{cfg.data_root.rstrip('/')}/{TOKENIZER_FILE}"
    if fsspec_fs(cfg.data_root, cfg.storage).exists(strip_scheme(src)):
        transfers.write_bytes_atomic(f"{cfg.out.rstrip('/')}/{TOKENIZER_FILE}",
                                     transfers.read_bytes(src, cfg.storage), cfg.storage)
