"""Training's input pipeline: the Parquet shards of a split as a lazy, streaming Ray Dataset.

Rows are decoded by :func:`cfgd.data.split_loader.decode_batch` (the same decode as the
in-process reader) inside Ray Data's ``map_batches`` tasks.
"""

from __future__ import annotations

import fsspec
from fsspec.implementations.local import LocalFileSystem

from cfgd.data.shards import DatasetMeta, local_or, split_path
from cfgd.data.split_loader import decode_batch


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
    tokenizer: str | None = None,
    embedding_shape: tuple[int, int] | None = None,
    cond_image_shape: tuple[int, int, int] | None = None,
):
    """Lazy Ray Dataset of decoded rows of ``<root>/<split>``.

    Rows are {"image": float32 (C, H, W) in [-1, 1], "label": int64} and, given a
    tokenizer's JSON, "tokens": int64 (L,) of the row's caption; given an embedding shape,
    "embedding": float32 (L, D); given a conditioning image's (h, w, c), "cond_image":
    float32 (c, h, w); decoding
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
    # A native pyarrow filesystem (cfgd.io.storage.arrow_fs) reads S3 faster than a wrapped fsspec one.
    arrow = arrow_filesystem if arrow_filesystem is not None else _arrow_fs(filesystem)
    shuffle = ray.data.FileShuffleConfig(seed=seed) if seed is not None else "files"
    ds = ray.data.read_parquet(split_dir, filesystem=arrow, include_paths=True, shuffle=shuffle)
    return ds.map_batches(
        decode_batch,
        fn_kwargs={"height": meta.height, "width": meta.width, "channels": meta.channels, "tokenizer": tokenizer,
                   "embedding_shape": embedding_shape, "cond_image_shape": cond_image_shape},
        batch_format="numpy",
    )
