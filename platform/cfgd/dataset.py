"""Reading the Parquet shards (:mod:`cfgd.shards`) as decoded rows.

Two readers, one decode (:func:`decode_batch`):

* :func:`read_dataset`: a lazy, streaming Ray Dataset for training, rows
  {"image": float32 (C, H, W) in [-1, 1], "label": int64}.
* :func:`load_split`: a whole split in this process as one tensor, for the
  evaluator and the sweeps' real data.

torch is imported only inside :func:`load_split`: Ray Data's decode tasks import
this module for :func:`decode_batch` and need numpy only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import fsspec
import numpy as np
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from cfgd.images import decode_png, uint8_to_unit
from cfgd.shards import DatasetMeta, local_or, read_meta, split_path
from cfgd.storage import StorageOptions, fsspec_fs

if TYPE_CHECKING:
    import torch


def decode_batch(batch: dict, height: int, width: int, channels: int) -> dict:
    """Decode a Ray Data numpy batch of PNG rows into model-ready arrays.

    Args:
        batch: {"image": object array (B,) of PNG bytes, "label": int (B,),
            optionally "path": str (B,) from read_parquet(include_paths=True)}.
        height, width, channels: expected decoded image shape (H, W, C).

    Returns:
        {"image": float32 (B, C, H, W) in [-1, 1], "label": int64 (B,)}.
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
    return {"image": uint8_to_unit(out), "label": np.asarray(batch["label"], dtype=np.int64)}


def _arrow_fs(filesystem: fsspec.AbstractFileSystem | None):
    """pyarrow filesystem for Ray: None (Ray's native local) or a wrapped fsspec one."""
    if filesystem is None or isinstance(filesystem, LocalFileSystem):
        return None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return PyFileSystem(FSSpecHandler(filesystem))


def read_dataset(
    root: str, split: str, meta: DatasetMeta,
    filesystem: fsspec.AbstractFileSystem | None = None,
    arrow_filesystem=None,
    seed: int | None = None,
):
    """Lazy Ray Dataset of decoded rows of ``<root>/<split>``.

    Rows are {"image": float32 (C, H, W) in [-1, 1], "label": int64}; decoding
    happens in map_batches because Ray cannot hand binary columns to
    iter_torch_batches. The shard files are read in a shuffled order, a new one for
    each epoch (``seed`` makes the sequence of orders repeatable); consumers mix rows
    further with a local shuffle buffer.

    Why not ``randomize_block_order``: it is an all-to-all barrier, so the first batch
    of every epoch waited until the whole split was read and decoded. A file-order
    shuffle streams: batches flow as soon as the first shard is decoded.
    """
    import ray.data

    fs = local_or(filesystem)
    split_dir = split_path(root, split, fs)
    # A native pyarrow filesystem (cfgd.storage.arrow_fs) reads S3 faster than a wrapped fsspec one.
    arrow = arrow_filesystem if arrow_filesystem is not None else _arrow_fs(filesystem)
    shuffle = ray.data.FileShuffleConfig(seed=seed) if seed is not None else "files"
    ds = ray.data.read_parquet(split_dir, filesystem=arrow, include_paths=True, shuffle=shuffle)
    return ds.map_batches(
        decode_batch,
        fn_kwargs={"height": meta.height, "width": meta.width, "channels": meta.channels},
        batch_format="numpy",
    )


def load_split(root: str, split: str, storage_options: StorageOptions | None = None,
               limit: int = 0) -> tuple[torch.Tensor, np.ndarray, DatasetMeta]:
    """All rows of ``<root>/<split>`` read in-process with pyarrow.

    Returns images float32 (N, C, H, W) in [-1, 1], labels int64 (N,), and the meta.
    ``limit`` > 0 keeps the first rows only.
    """
    import torch

    fs = fsspec_fs(root, storage_options)
    meta = read_meta(root, split, filesystem=fs)
    images, labels, n = [], [], 0
    for path in meta.files:
        with fs.open(path, "rb") as f:
            table = pq.read_table(f, columns=["image", "label"])
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
