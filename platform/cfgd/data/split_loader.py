"""Reading the Parquet shards (:mod:`cfgd.data.shards`) as decoded rows, without Ray.

Two readers share one decode (:func:`decode_batch`):

* :func:`load_split`: a whole split in this process as one tensor, for the
  evaluator and the sweeps' real data (here);
* :func:`cfgd.train.input_pipeline.read_dataset`: a lazy, streaming Ray Dataset for
  training, which runs :func:`decode_batch` in Ray Data's tasks.

torch is imported only inside :func:`load_split`: Ray Data's decode tasks import
this module for :func:`decode_batch` and need numpy only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pyarrow.parquet as pq

from cfgd.data import tokenizer as tokenizers
from cfgd.data.embedding_column import EMBEDDING, embedding_array
from cfgd.data.image_condition import COND_IMAGE, cond_image_array
from cfgd.data.images import decode_png, uint8_to_unit
from cfgd.data.shards import DatasetMeta, read_split_meta
from cfgd.io.storage import StorageOptions, fsspec_fs

if TYPE_CHECKING:
    import torch


def decode_batch(batch: dict, height: int, width: int, channels: int, tokenizer: str | None = None,
                 embedding_shape: tuple[int, int] | None = None,
                 cond_image_shape: tuple[int, int, int] | None = None) -> dict:
    """Decode a Ray Data numpy batch of PNG rows into model-ready arrays.

    Args:
        batch: {"image": object array (B,) of PNG bytes, "label": int (B,),
            optionally "caption": str (B,) and "path": str (B,) from
            read_parquet(include_paths=True)}.
        height, width, channels: expected decoded image shape (H, W, C).
        tokenizer: a caption tokenizer's JSON (cfgd.data.tokenizer): captions become token ids.
        embedding_shape: (L, D) of the ``embedding`` column, to read it.
        cond_image_shape: (h, w, c) of the ``cond_image`` column, to decode it.

    Returns:
        {"image": float32 (B, C, H, W) in [-1, 1], "label": int64 (B,)}, with a
        tokenizer "tokens": int64 (B, L), with an embedding shape "embedding": float32 (B, L, D),
        with a conditioning image's shape "cond_image": float32 (B, c, h, w) in [-1, 1].
    """
    images = batch["image"]
    paths = batch.get("path")
    expected = (height, width, channels)
    out = np.empty((len(images), height, width, channels), dtype=np.uint8)
    for i, b in enumerate(images):
        where = str(paths[i]) if paths is not None else "<unknown file>"
        try:
            arr = decode_png(b)
        except ValueError as e:
            raise ValueError(f"{where}: batch row {i}: {e}; expected a PNG of shape "
                             f"(H, W, C) = {expected}") from e
        if arr.shape != expected:
            raise ValueError(f"{where}: batch row {i}: image decodes to shape {arr.shape}, "
                             f"expected (H, W, C) = {expected}")
        out[i] = arr
    decoded = {"image": uint8_to_unit(out), "label": np.asarray(batch["label"], dtype=np.int64)}
    if tokenizer is not None:
        if "caption" not in batch:
            raise ValueError(f"{paths[0] if paths is not None else '<unknown file>'}: no caption column to tokenize")
        decoded["tokens"] = tokenizers.cached(tokenizer).encode([str(c) for c in batch["caption"]], field="caption").ids
    if embedding_shape is not None:
        decoded["embedding"] = embedding_array(batch["embedding"], tuple(embedding_shape))
    if cond_image_shape is not None:
        where = str(paths[0]) if paths is not None else "<unknown file>"
        decoded["cond_image"] = cond_image_array(batch[COND_IMAGE], tuple(cond_image_shape), where)
    return decoded


def load_split(root: str, split: str, storage_options: StorageOptions | None = None,
               limit: int = 0) -> tuple[torch.Tensor, np.ndarray, DatasetMeta]:
    """All rows of ``<root>/<split>`` read in-process with pyarrow.

    Returns images float32 (N, C, H, W) in [-1, 1], labels int64 (N,), and the meta.
    ``limit`` > 0 keeps the first rows only.
    """
    import torch

    fs = fsspec_fs(root, storage_options)
    meta = read_split_meta(root, split, filesystem=fs)
    images, labels, n = [], [], 0
    for path in meta.files:
        with fs.open(path, "rb") as f:
            table = pq.ParquetFile(f).read(columns=["image", "label"])
        if limit:
            table = table.slice(0, limit - n)
        batch = {"image": np.asarray(table.column("image").to_pylist(), dtype=object),
                 "label": table.column("label").to_numpy()}
        out = decode_batch(batch, meta.height, meta.width, meta.channels)
        images.append(out["image"])
        labels.append(out["label"])
        n += len(out["label"])
        if limit and n >= limit:
            break
    return torch.from_numpy(np.concatenate(images)), np.concatenate(labels), meta


def read_rows(root: str, split: str, rows: list[int], storage_options: StorageOptions | None = None) -> dict:
    """Rows ``rows`` (indices into the split, in shard order) read in-process with pyarrow;
    only the shards holding them are read. IndexError naming a row past the end.

    Returns {"image": float32 (n, C, H, W) in [-1, 1], "label": int64 (n,), "meta": DatasetMeta},
    plus "embedding": float32 (n, L, D) when the split has that column, and "cond_image":
    float32 (n, c, h, w) with "cond_png" (its PNG bytes) when it has conditioning images.
    """
    fs = fsspec_fs(root, storage_options)
    meta = read_split_meta(root, split, filesystem=fs)
    bad = [r for r in rows if not 0 <= r < meta.num_rows]
    if bad:
        raise IndexError(f"rows {bad} are outside {root}/{split}'s [0, {meta.num_rows})")
    shape = meta.conditions.get(EMBEDDING, {}).get("shape")
    cond = meta.conditions.get(COND_IMAGE)
    cond_shape = (cond["height"], cond["width"], cond["channels"]) if cond else None
    columns = ["image", "label"] + ([EMBEDDING] if shape else []) + ([COND_IMAGE] if cond else [])
    found: dict[int, dict] = {}
    start = 0
    for path in meta.files:
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            n = pf.metadata.num_rows
            local = [r - start for r in rows if start <= r < start + n]
            table = pf.read(columns=columns).take(local) if local else None
        if local:
            batch = {c: np.asarray(table.column(c).to_pylist(), dtype=object) for c in columns}
            out = decode_batch(batch, meta.height, meta.width, meta.channels,
                               embedding_shape=tuple(shape) if shape else None, cond_image_shape=cond_shape)
            if cond:  # the conditioning images' own bytes too: a plan row carries its image as PNG
                out["cond_png"] = np.asarray(batch[COND_IMAGE])
            for i, r in enumerate(r + start for r in local):
                found[r] = {k: v[i] for k, v in out.items()}
        start += n
    picked = {k: np.stack([found[r][k] for r in rows]) for k in found[rows[0]]} if rows else {}
    return {**picked, "meta": meta}
