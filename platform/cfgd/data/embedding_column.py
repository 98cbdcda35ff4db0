"""The ``embedding`` condition column: a fixed-size list of float32 per row (L·D values).

Shards may carry a precomputed condition vector per image next to the label: one vector of
D (L = 1) or L×D tokens, flattened row-major into a Parquet ``fixed_size_list<float>``.
The shard metadata declares it under ``conditions.embedding`` with its shape and what
made it (``jobs/embed.py`` writes the encoder's import path and arguments)::

    {"embedding": {"shape": [L, D], "encoder": "module:callable", ...}}

Here: adding the column to a shard table (:func:`with_embedding`), checking its
declaration (:func:`embedding_shape`), and reading it back as (B, L, D) float32
(:func:`embedding_array`).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa

EMBEDDING = "embedding"
METADATA_KEY = b"cfgd"
MAX_VALUES = 1 << 20  # L·D of one row; an embedding job's encoder is refused beyond it


def is_embedding_type(t: pa.DataType) -> bool:
    return pa.types.is_fixed_size_list(t) and pa.types.is_float32(t.value_type)


def embedding_shape(desc: Any, where: str) -> tuple[int, int]:
    """(L, D) from a ``conditions.embedding`` description; ValueError naming ``where``."""
    shape = desc.get("shape") if isinstance(desc, dict) else None
    if (not isinstance(shape, list) or len(shape) != 2 or not all(isinstance(v, int) and v >= 1 for v in shape)
            or shape[0] * shape[1] > MAX_VALUES):
        raise ValueError(f"{where}: conditions.embedding.shape must be [tokens, dim], positive ints with "
                         f"tokens·dim <= {MAX_VALUES}; got {shape!r}")
    return shape[0], shape[1]


def with_embedding(table: pa.Table, vectors: np.ndarray, description: dict) -> pa.Table:
    """``table`` (a shard) with its ``embedding`` column set to ``vectors`` (N, L, D) or (N, D),
    and its metadata's ``conditions.embedding`` to ``description`` plus the shape."""
    v = np.asarray(vectors, dtype=np.float32)
    if v.ndim == 2:
        v = v[:, None, :]
    if v.ndim != 3 or v.shape[0] != table.num_rows:
        raise ValueError(f"embeddings must be (N, D) or (N, L, D) with N = {table.num_rows} rows; got {v.shape}")
    if not np.isfinite(v).all():
        bad = int(np.flatnonzero(~np.isfinite(v).reshape(len(v), -1).all(1))[0])
        raise ValueError(f"embedding of row {bad} has non-finite values")
    L, D = v.shape[1:]
    column = pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), L * D)
    if EMBEDDING in table.column_names:
        table = table.drop_columns([EMBEDDING])
    table = table.append_column(pa.field(EMBEDDING, column.type), column)
    meta = json.loads((table.schema.metadata or {})[METADATA_KEY])
    meta.setdefault("conditions", {})[EMBEDDING] = {**description, "shape": [int(L), int(D)]}
    return table.replace_schema_metadata({**(table.schema.metadata or {}), METADATA_KEY: json.dumps(meta).encode()})


def embedding_array(column: Any, shape: tuple[int, int]) -> np.ndarray:
    """A batch's ``embedding`` column (Ray Data numpy: (B, L·D) or objects of arrays) → float32 (B, L, D)."""
    arr = np.asarray(column)
    if arr.dtype == object:
        arr = np.stack([np.asarray(r, dtype=np.float32) for r in arr]) if len(arr) else np.zeros((0, shape[0] * shape[1]))
    return arr.astype(np.float32, copy=False).reshape(len(arr), *shape)
