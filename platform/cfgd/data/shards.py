"""Parquet shards: the one on-disk format training and evaluation read.

Layout: ``<root>/<split>/part-00000.parquet``, ``part-00001.parquet``, ...
One row per image with columns ``image`` (binary, PNG bytes) and ``label``
(int64), and optionally ``caption`` (string: a text condition), ``embedding`` (a
fixed-size list of float32: a precomputed condition vector, cfgd.data.embedding_column) and
``cond_image`` (PNG bytes: a conditioning image, cfgd.data.image_condition). The Arrow schema
metadata key ``b"cfgd"`` holds JSON::

    {"class_names": [...], "height": H, "width": W, "channels": C,
     "format_version": 1, "conditions": {"caption": {...}}}

``conditions`` (absent in label-only data sets) names each condition column beyond the
label with what describes it (for captions measured from pixels: the attribute
thresholds and held-out combinations, cfgd.data.captions).

Here: the writer (:func:`write_shards`; from a source: cfgd.data.prepare), the
footer-only metadata read and cross-check (:func:`read_split_meta` → :class:`DatasetMeta`)
and the label check (:func:`validate_labels`). Reading rows is :mod:`cfgd.data.split_loader`
(in-process) and :mod:`cfgd.train.input_pipeline` (Ray Data).
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cfgd.data.embedding_column import EMBEDDING, embedding_shape, is_embedding_type
from cfgd.data.image_condition import COND_IMAGE, cond_image_shape
from cfgd.data.images import MODE_FOR_CHANNELS, PNG_MODES, encode_png
from cfgd.data.sources import check_labels
from cfgd.io.atomic import staged_dir
from cfgd.io.storage import StorageOptions, fsspec_fs

FORMAT_VERSION = 1
METADATA_KEY = b"cfgd"


# ----------------------------------------------------------------------- paths


def local_or(filesystem: fsspec.AbstractFileSystem | None) -> fsspec.AbstractFileSystem:
    """The given fsspec filesystem, or the local one."""
    return filesystem if filesystem is not None else fsspec.filesystem("file")


def split_path(root: str, split: str, fs: fsspec.AbstractFileSystem) -> str:
    """``<root>/<split>`` in the filesystem's path convention (posix, no protocol)."""
    return posixpath.join(fs._strip_protocol(root).rstrip("/"), split)


# ----------------------------------------------------------------- shard writer


def _check_write_inputs(images: Any, labels: Any, class_names: list[str]) -> None:
    """Validate images uint8 (N, H, W, C), labels int (N,), labels < len(class_names)."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 \
            or images.shape[3] not in MODE_FOR_CHANNELS:
        raise ValueError(
            "images must be a uint8 ndarray (N, H, W, C) with C in (1, 3); got "
            f"{getattr(images, 'dtype', type(images).__name__)} {getattr(images, 'shape', '')}"
        )
    if len(images) == 0:
        raise ValueError("images is empty; need at least one row")
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer) or labels.shape != (len(images),):
        raise ValueError(
            f"labels must be integers of shape ({len(images)},); got {labels.dtype} {labels.shape}"
        )
    if not class_names or not all(isinstance(c, str) for c in class_names):
        raise ValueError(f"class_names must be a non-empty list of str; got {class_names!r}")
    check_labels(labels, len(class_names), "labels")


MAX_CAPTION_CHARS = 1000  # a caption longer than this is refused at prepare time


def check_captions(captions: Any, n: int, where: str) -> None:
    """Each caption a non-empty str of at most MAX_CAPTION_CHARS; ValueError naming the row.

    The empty caption is the null condition ∅ (dropout writes it), so data may not hold it.
    """
    if not isinstance(captions, (list, tuple)) or len(captions) != n:
        raise ValueError(f"{where}: captions must be a list of {n} str (one per image); "
                         f"got {type(captions).__name__} of {len(captions) if hasattr(captions, '__len__') else '?'}")
    for i, c in enumerate(captions):
        if not isinstance(c, str):
            raise ValueError(f"{where}: row {i}: caption {c!r} is {type(c).__name__}, not str")
        if not c.strip():
            raise ValueError(f"{where}: row {i}: caption is empty; the empty caption is the null condition ∅, "
                             "give every image a caption")
        if len(c) > MAX_CAPTION_CHARS:
            raise ValueError(f"{where}: row {i}: caption has {len(c)} characters, at most {MAX_CAPTION_CHARS}")


def _shard_table(images: np.ndarray, labels: np.ndarray, metadata: bytes,
                 captions: list[str] | None = None, cond_images: np.ndarray | None = None) -> pa.Table:
    """Arrow table of PNG-encoded images (binary), int64 labels and optional captions and
    conditioning images (PNG), with cfgd metadata."""
    fields = [("image", pa.binary()), ("label", pa.int64())]
    columns = [pa.array([encode_png(img) for img in images], type=pa.binary()), pa.array(labels.astype(np.int64))]
    if captions:
        fields.append(("caption", pa.string()))
        columns.append(pa.array(captions, type=pa.string()))
    if cond_images is not None:
        fields.append((COND_IMAGE, pa.binary()))
        columns.append(pa.array([encode_png(c, PNG_MODES) for c in cond_images], type=pa.binary()))
    return pa.Table.from_arrays(columns, schema=pa.schema(fields, metadata={METADATA_KEY: metadata}))


def write_shards(
    out_root: str,
    split: str,
    images: np.ndarray,
    labels: np.ndarray,
    class_names: list[str],
    rows_per_shard: int = 10000,
    filesystem: fsspec.AbstractFileSystem | None = None,
    captions: list[str] | None = None,
    conditions: dict | None = None,
    cond_images: np.ndarray | None = None,
) -> list[str]:
    """Write one split as PNG-in-Parquet shards ``<out_root>/<split>/part-NNNNN.parquet``.

    The shards go to a hidden temporary sibling directory first, which then
    replaces ``<out_root>/<split>`` (:func:`cfgd.io.atomic.staged_dir`); an
    interrupted write leaves only the temporary directory, never a partial split.

    Args:
        images: uint8 (N, H, W, C), C == 1 (PNG mode L) or 3 (RGB).
        labels: integer (N,), each in [0, len(class_names)).
        class_names: class names, index == label.
        rows_per_shard: maximum rows per Parquet file.
        filesystem: fsspec filesystem (default: local).
        captions: one non-empty str per image (the ``caption`` column), or None.
        conditions: JSON-able description of the condition columns (metadata ``conditions``).
        cond_images: uint8 (N, h, w, c) conditioning images (the ``cond_image`` column, described
            under ``conditions["cond_image"]``: cfgd.data.image_condition), or None.

    Returns:
        Paths of the written files (in their final location), in order.
    """
    _check_write_inputs(images, labels, class_names)
    if captions is not None:
        check_captions(captions, len(images), f"split {split!r}")
    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
    if not split or "/" in split or split.startswith("."):
        raise ValueError(f"invalid split name {split!r}; use e.g. 'train' or 'test'")
    fs = local_or(filesystem)
    final_dir = split_path(out_root, split, fs)
    _, height, width, channels = images.shape
    declared = {k: v for k, v in (conditions or {}).items()
                if (k == "caption" and captions is not None) or (k == COND_IMAGE and cond_images is not None)}
    if captions is not None:
        declared.setdefault("caption", {})
    if cond_images is not None:
        if len(cond_images) != len(images) or cond_images.shape[1:] != cond_image_shape(declared.get(COND_IMAGE),
                                                                                         f"split {split!r}"):
            raise ValueError(f"split {split!r}: cond_images {cond_images.shape} do not match {len(images)} rows of "
                             f"the declared shape")
    metadata = json.dumps({
        "class_names": list(class_names), "height": int(height), "width": int(width),
        "channels": int(channels), "format_version": FORMAT_VERSION,
        **({"conditions": declared} if declared else {}),
    }).encode()
    labels = np.asarray(labels)
    names = []
    with staged_dir(final_dir, fs) as tmp_dir:
        for shard, start in enumerate(range(0, len(images), rows_per_shard)):
            stop = start + rows_per_shard
            name = f"part-{shard:05d}.parquet"
            with fs.open(posixpath.join(tmp_dir, name), "wb") as f:
                pq.write_table(_shard_table(images[start:stop], labels[start:stop], metadata,
                                            None if captions is None else list(captions[start:stop]),
                                            None if cond_images is None else cond_images[start:stop]), f)
            names.append(name)
    return [posixpath.join(final_dir, n) for n in names]


# ------------------------------------------------------------------ metadata


@dataclass
class DatasetMeta:
    """Shape and class information of one split, read from its shard schemas.

    Rows decode to images (height, width, channels); labels are in
    [0, num_classes).
    """

    class_names: list[str]
    height: int
    width: int
    channels: int
    num_rows: int
    files: list[str] = field(default_factory=list)
    conditions: dict = field(default_factory=dict)  # condition columns beyond the label: {"caption": {...}}

    @property
    def num_classes(self) -> int:
        """Number of classes, len(class_names)."""
        return len(self.class_names)


def _list_shards(split_dir: str, fs: fsspec.AbstractFileSystem) -> list[str]:
    """Sorted ``*.parquet`` files in split_dir; ValueError "empty dataset" if none."""
    files = sorted(fs.glob(posixpath.join(split_dir, "*.parquet"))) if fs.isdir(split_dir) else []
    if not files:
        raise ValueError(f"empty dataset: no *.parquet files in {split_dir}")
    return files


def _parse_cfgd_metadata(schema: pa.Schema, path: str) -> dict:
    """Decode and validate the JSON stored under schema metadata key b"cfgd"."""
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise ValueError(f"{path}: schema metadata key 'cfgd' is missing (not written by cfgd?)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: schema metadata 'cfgd' is not valid JSON: {e}") from e
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: unsupported cfgd format_version "
            f"{meta.get('format_version') if isinstance(meta, dict) else None!r}, "
            f"expected {FORMAT_VERSION}"
        )
    names = meta.get("class_names")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{path}: cfgd metadata class_names must be a non-empty list of str")
    for key in ("height", "width"):
        if not isinstance(meta.get(key), int) or meta[key] < 1:
            raise ValueError(f"{path}: cfgd metadata {key} must be a positive int, "
                             f"got {meta.get(key)!r}")
    if meta.get("channels") not in MODE_FOR_CHANNELS:
        raise ValueError(f"{path}: cfgd metadata channels must be 1 or 3, "
                         f"got {meta.get('channels')!r}")
    conditions = meta.get("conditions", {})
    if not isinstance(conditions, dict) or not set(conditions) <= set(CONDITION_COLUMNS):
        raise ValueError(f"{path}: cfgd metadata conditions must map condition columns "
                         f"{list(CONDITION_COLUMNS)} to their description, got {conditions!r}")
    if EMBEDDING in conditions:
        embedding_shape(conditions[EMBEDDING], path)
    if COND_IMAGE in conditions:
        cond_image_shape(conditions[COND_IMAGE], path)
    return meta


CONDITION_COLUMNS = {"caption": (pa.types.is_string, "string"),  # beyond the label
                     EMBEDDING: (is_embedding_type, "fixed_size_list<float32>[tokens·dim]"),
                     COND_IMAGE: (pa.types.is_binary, "binary (PNG)")}


def _check_columns(schema: pa.Schema, path: str, conditions: dict) -> None:
    """Require ``image`` binary and ``label`` integer columns, and each declared condition column."""
    for name in conditions:
        ok, want = CONDITION_COLUMNS[name]
        if name not in schema.names or not ok(schema.field(name).type):
            raise ValueError(f"{path}: metadata declares condition {name!r} but the column is "
                             f"{'missing' if name not in schema.names else schema.field(name).type}; "
                             f"expected {want}")
        if name == EMBEDDING:
            L, D = embedding_shape(conditions[name], path)
            if schema.field(name).type.list_size != L * D:
                raise ValueError(f"{path}: column 'embedding' holds {schema.field(name).type.list_size} values per "
                                 f"row but the metadata declares shape [{L}, {D}]")
    for name, ok, want in (
        ("image", lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t), "binary"),
        ("label", pa.types.is_integer, "integer"),
    ):
        if name not in schema.names:
            raise ValueError(f"{path}: missing column {name!r} ({want}); "
                             f"columns are {schema.names}")
        typ = schema.field(name).type
        if not ok(typ):
            raise ValueError(f"{path}: column {name!r} has type {typ}, expected {want}")


def read_split_meta(
    root: str, split: str, filesystem: fsspec.AbstractFileSystem | None = None
) -> DatasetMeta:
    """Read and cross-check the schema of every shard of ``<root>/<split>``.

    Only Parquet footers are read, so this is cheap even for large datasets.

    Returns:
        DatasetMeta with images (height, width, channels), total num_rows and
        the sorted shard paths.
    """
    fs = local_or(filesystem)
    split_dir = split_path(root, split, fs)
    files = _list_shards(split_dir, fs)
    reference, ref_path, num_rows = None, None, 0
    for path in files:
        with fs.open(path, "rb") as f:
            try:
                pf = pq.ParquetFile(f)
            except (pa.ArrowInvalid, OSError) as e:
                raise ValueError(f"{path}: not a readable Parquet file: {e}") from e
            schema, rows = pf.schema_arrow, pf.metadata.num_rows
        meta = _parse_cfgd_metadata(schema, path)
        _check_columns(schema, path, meta.get("conditions", {}))
        if reference is None:
            reference, ref_path = meta, path
        elif meta != reference:
            raise ValueError(
                f"{path}: cfgd metadata {meta} differs from {reference} in {ref_path}; "
                "all shards of a split must share it"
            )
        num_rows += rows
    if num_rows == 0:
        raise ValueError(f"empty dataset: {split_dir} has {len(files)} files but zero rows")
    return DatasetMeta(
        class_names=list(reference["class_names"]), height=reference["height"],
        width=reference["width"], channels=reference["channels"],
        num_rows=num_rows, files=files, conditions=dict(reference.get("conditions", {})),
    )


def validate_labels(
    root: str, split: str, meta: DatasetMeta,
    filesystem: fsspec.AbstractFileSystem | None = None,
) -> None:
    """Check every label of every shard is in [0, meta.num_classes).

    Reads only the ``label`` column. ``root``/``split`` are used for messages;
    the files checked are ``meta.files``.
    """
    fs = local_or(filesystem)
    for path in meta.files:
        with fs.open(path, "rb") as f:
            column = pq.ParquetFile(f).read(columns=["label"]).column("label")
        if column.null_count:
            raise ValueError(f"{path}: {column.null_count} null labels in {root}/{split}; "
                             "every row needs a label")
        labels = column.to_numpy()
        bad = np.flatnonzero((labels < 0) | (labels >= meta.num_classes))
        if bad.size:
            row = int(bad[0])
            raise ValueError(
                f"{path}: row {row} has label {int(labels[row])}, valid labels are "
                f"[0, {meta.num_classes}) ({bad.size} invalid rows in this file)"
            )




def read_captions(root: str, split: str, storage: StorageOptions | None = None) -> list[str]:
    """Every caption of ``<root>/<split>`` in shard order (only the ``caption`` column is read)."""
    fs = fsspec_fs(root, storage)
    meta = read_split_meta(root, split, fs)
    if "caption" not in meta.conditions:
        raise ValueError(f"{root}/{split} has no captions (prepare it with data.captions=attributes)")
    out: list[str] = []
    for path in meta.files:
        with fs.open(path, "rb") as f:
            out.extend(pq.ParquetFile(f).read(columns=["caption"]).column("caption").to_pylist())
    return out


# ---------------------------------------------------------------- from a source
