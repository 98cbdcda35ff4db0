"""Dataset ingestion, Parquet sharding and Ray Data loading for cfgd.

On-disk format: ``<root>/<split>/part-00000.parquet``, ``part-00001.parquet``, ...
One row per image with columns ``image`` (binary, PNG bytes) and ``label``
(int64). The Arrow schema metadata key ``b"cfgd"`` holds JSON::

    {"class_names": [...], "height": H, "width": W, "channels": C,
     "format_version": 1}

Sources (IDX, Fashion-MNIST, image folders, npz) all produce, per split,
``images`` uint8 (N, H, W, C) with C in {1, 3} and ``labels`` int64 (N,).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import posixpath
import uuid
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem
from PIL import Image, UnidentifiedImageError

FORMAT_VERSION = 1
METADATA_KEY = b"cfgd"
SPLITS = ("train", "test")
SOURCES = ("fashion_mnist", "idx", "folder", "npz")

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
# MNIST-format file stems per split; "t10k" is the historical name of the test set.
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")

Splits = dict[str, tuple[np.ndarray, np.ndarray]]

_GZIP_MAGIC = b"\x1f\x8b"
_IDX_UBYTE = 0x08
_IDX_MAGIC_IMAGES = 0x00000803  # ubyte, 3 dims (N, H, W)
_IDX_MAGIC_LABELS = 0x00000801  # ubyte, 1 dim (N,)
_MODE_FOR_CHANNELS = {1: "L", 3: "RGB"}


# --------------------------------------------------------------------------- PNG


def encode_png(img: np.ndarray) -> bytes:
    """Encode one image as PNG.

    Args:
        img: uint8 array (H, W, C) with C == 1 (stored as mode L) or C == 3 (RGB).

    Returns:
        PNG file bytes.
    """
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] not in _MODE_FOR_CHANNELS:
        raise ValueError(
            f"encode_png expects uint8 (H, W, C) with C in (1, 3); "
            f"got dtype {img.dtype}, shape {img.shape}"
        )
    mode = _MODE_FOR_CHANNELS[img.shape[2]]
    pixels = img[:, :, 0] if mode == "L" else img
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels), mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def decode_png(b: bytes) -> np.ndarray:
    """Decode PNG (or any PIL-readable image) bytes.

    Args:
        b: encoded image bytes.

    Returns:
        uint8 array (H, W, C): C == 1 for grayscale, 3 for RGB, and the native
        channel count (2 or 4) for images with alpha, so callers can reject them.

    Raises:
        ValueError: the bytes are not a decodable image, or the pixel mode is
            not 8-bit.
    """
    try:
        with Image.open(io.BytesIO(b)) as im:
            im.load()
            if im.mode == "1":
                im = im.convert("L")
            elif im.mode == "P":
                im = im.convert("RGB")
            if im.mode not in ("L", "LA", "RGB", "RGBA"):
                raise ValueError(f"unsupported image mode {im.mode!r} (need 8-bit L or RGB)")
            arr = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"cannot decode image bytes: {e}") from e
    return arr[:, :, None] if arr.ndim == 2 else arr


# ------------------------------------------------------------------- IDX sources


def _read_maybe_gzip(path: str) -> bytes:
    """Read a whole file, transparently gunzipping it (detected by magic bytes)."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] != _GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError) as e:
        raise ValueError(f"{path}: corrupt gzip data: {e}") from e


def _parse_idx(path: str, expected_magic: int) -> np.ndarray:
    """Parse an IDX (MNIST format) ubyte file into an array of its declared dims."""
    data = _read_maybe_gzip(path)
    if len(data) < 4:
        raise ValueError(f"{path}: too short to be an IDX file ({len(data)} bytes)")
    magic = int.from_bytes(data[:4], "big")
    if magic != expected_magic:
        raise ValueError(
            f"{path}: bad IDX magic number 0x{magic:08x}, expected 0x{expected_magic:08x} "
            f"(unsigned byte, {expected_magic & 0xFF}-D)"
        )
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(data)} bytes, need {header})")
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(dims)) + header
    if len(data) != expected:
        raise ValueError(
            f"{path}: IDX size mismatch: header declares dims {dims} "
            f"({expected} bytes total) but file has {len(data)} bytes"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def load_idx(images_path: str, labels_path: str) -> tuple[np.ndarray, np.ndarray]:
    """Load one MNIST-format IDX image/label file pair (gzip or raw).

    Args:
        images_path: idx3-ubyte file, magic 0x00000803, dims (N, H, W).
        labels_path: idx1-ubyte file, magic 0x00000801, dims (N,).

    Returns:
        images uint8 (N, H, W, 1), labels int64 (N,).
    """
    images = _parse_idx(images_path, _IDX_MAGIC_IMAGES)
    labels = _parse_idx(labels_path, _IDX_MAGIC_LABELS)
    if len(images) != len(labels):
        raise ValueError(
            f"{images_path} has {len(images)} images but {labels_path} has "
            f"{len(labels)} labels; counts must match"
        )
    return images[..., None].copy(), labels.astype(np.int64)


def _find_idx_file(root: str, stem: str) -> str | None:
    """Return ``root/stem`` or ``root/stem.gz``, whichever exists."""
    for name in (stem, stem + ".gz"):
        path = os.path.join(root, name)
        if os.path.isfile(path):
            return path
    return None


def _check_source_labels(labels: np.ndarray, num_classes: int, where: str) -> None:
    """Reject labels outside [0, num_classes) with the first offending row."""
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"{where}: label {int(labels[i])} at row {i} is outside "
            f"[0, {num_classes}) ({bad.size} bad labels in total)"
        )


def _read_classes_txt(root: str) -> list[str] | None:
    """Class names from ``root/classes.txt`` (one per line), or None if absent."""
    path = os.path.join(root, "classes.txt")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        names = [line.strip() for line in f if line.strip()]
    if not names:
        raise ValueError(f"{path}: no class names (expected one name per line)")
    return names


def _load_idx_splits(root: str, class_names: list[str], hint: str = "") -> Splits:
    """Load train/test from a directory holding the four standard IDX files."""
    splits: Splits = {}
    for split, (img_stem, lbl_stem) in IDX_FILES.items():
        img_path = _find_idx_file(root, img_stem)
        lbl_path = _find_idx_file(root, lbl_stem)
        for stem, path in ((img_stem, img_path), (lbl_stem, lbl_path)):
            if path is None:
                raise ValueError(
                    f"missing {os.path.join(root, stem)}[.gz]; expected files "
                    f"{[s for pair in IDX_FILES.values() for s in pair]} (gz or raw){hint}"
                )
        images, labels = load_idx(img_path, lbl_path)
        _check_source_labels(labels, len(class_names), lbl_path)
        splits[split] = (images, labels)
    return splits


def load_idx_dir(root: str) -> tuple[Splits, list[str]]:
    """Load any MNIST-format directory (train-*/t10k-* IDX files, gz or raw).

    Class names come from ``root/classes.txt`` if present, else "0".."9".

    Returns:
        ({"train": (images uint8 (N, H, W, 1), labels int64 (N,)), "test": ...},
         class_names)
    """
    if not os.path.isdir(root):
        raise ValueError(f"IDX directory {root} does not exist")
    class_names = _read_classes_txt(root) or [str(i) for i in range(10)]
    return _load_idx_splits(root, class_names), class_names


def load_fashion_mnist(root: str = FASHION_MNIST_ROOT) -> tuple[Splits, list[str]]:
    """Load Fashion-MNIST from the system dataset directory.

    Returns:
        ({"train": (uint8 (60000, 28, 28, 1), int64 (60000,)),
          "test": (uint8 (10000, 28, 28, 1), int64 (10000,))},
         the 10 Fashion-MNIST class names)
    """
    hint = "; install it with `apt-get install dataset-fashion-mnist`"
    if not os.path.isdir(root):
        raise ValueError(f"Fashion-MNIST directory {root} does not exist{hint}")
    class_names = list(FASHION_MNIST_CLASSES)
    return _load_idx_splits(root, class_names, hint), class_names


# ---------------------------------------------------------------- folder source


def _list_class_dirs(root: str) -> list[str]:
    """Sorted names of non-hidden subdirectories of root."""
    return sorted(
        d for d in os.listdir(root)
        if not d.startswith(".") and os.path.isdir(os.path.join(root, d))
    )


def _list_images(class_dir: str) -> list[str]:
    """Sorted image file paths (by extension) directly inside class_dir."""
    return [
        os.path.join(class_dir, f) for f in sorted(os.listdir(class_dir))
        if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)
    ]


def _scan_folder(root: str, class_names: list[str]) -> tuple[list[str], np.ndarray]:
    """Image paths and int64 labels (N,) for ``root/<class>/*`` over class_names."""
    paths: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(class_names):
        class_dir = os.path.join(root, name)
        if not os.path.isdir(class_dir):
            continue
        files = _list_images(class_dir)
        paths += files
        labels += [label] * len(files)
    if not paths:
        raise ValueError(
            f"{root}: no images found in class folders {class_names} "
            f"(extensions {IMAGE_EXTENSIONS})"
        )
    return paths, np.asarray(labels, dtype=np.int64)


def _probe_images(paths: list[str]) -> str:
    """Check all images share one size (header only, no decode); return target mode.

    Grayscale if every image is L (or 1-bit), else RGB, so a mixed folder is
    converted consistently instead of failing.
    """
    size = None
    gray = True
    for path in paths:
        try:
            with Image.open(path) as im:
                im_size, im_mode = im.size, im.mode
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"{path}: cannot read image: {e}") from e
        if size is None:
            size, first = im_size, path
        elif im_size != size:
            raise ValueError(
                f"{path}: image size {im_size[0]}x{im_size[1]} (WxH) differs from "
                f"{size[0]}x{size[1]} of {first}; all images must have the same size"
            )
        gray = gray and im_mode in ("L", "1")
    return "L" if gray else "RGB"


def _load_images(paths: list[str], mode: str) -> np.ndarray:
    """Decode paths into uint8 (N, H, W, C), converting each to mode (L or RGB)."""
    arrays = []
    for path in paths:
        try:
            with Image.open(path) as im:
                arr = np.asarray(im.convert(mode), dtype=np.uint8)
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"{path}: cannot decode image: {e}") from e
        arrays.append(arr)
    images = np.stack(arrays)
    return images[..., None] if images.ndim == 3 else images


def _stratified_split(
    labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-class random split so every class appears in test; returns index arrays."""
    rng = np.random.default_rng(seed)
    train_idx, test_idx = [], []
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        n_test = int(round(len(idx) * test_fraction))
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    return np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(test_idx))


def load_image_folder(
    root: str, test_fraction: float = 0.1, seed: int = 0
) -> tuple[Splits, list[str]]:
    """Load ``root/<class_name>/*.png|jpg|...`` (class names sorted).

    If ``root/train`` and ``root/test`` both exist they are the splits (each
    with class subfolders); otherwise a seeded per-class random split holds out
    ``test_fraction`` of each class as test.

    Returns:
        ({"train": (uint8 (N, H, W, C), int64 (N,)), "test": ...}, class_names)
        with C == 1 if every image is grayscale, else C == 3.
    """
    if not os.path.isdir(root):
        raise ValueError(f"image folder {root} does not exist")
    split_dirs = {s: os.path.join(root, s) for s in SPLITS}
    presplit = all(os.path.isdir(d) for d in split_dirs.values())
    if presplit:
        class_names = sorted(set(_list_class_dirs(split_dirs["train"]))
                             | set(_list_class_dirs(split_dirs["test"])))
        scanned = {s: _scan_folder(d, class_names) for s, d in split_dirs.items()}
    else:
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
        class_names = _list_class_dirs(root)
        if not class_names:
            raise ValueError(f"{root}: no class subfolders (expected {root}/<class_name>/*.png)")
        paths, labels = _scan_folder(root, class_names)
        train_idx, test_idx = _stratified_split(labels, test_fraction, seed)
        scanned = {
            "train": ([paths[i] for i in train_idx], labels[train_idx]),
            "test": ([paths[i] for i in test_idx], labels[test_idx]),
        }
    mode = _probe_images([p for paths, _ in scanned.values() for p in paths])
    splits: Splits = {}
    for split, (paths, labels) in scanned.items():
        if not paths:
            raise ValueError(f"{root}: split {split!r} has no images; add images "
                             f"or raise test_fraction")
        splits[split] = (_load_images(paths, mode), labels)
    return splits, class_names


# ------------------------------------------------------------------ npz source


def _npz_images(x: np.ndarray, path: str, key: str) -> np.ndarray:
    """Normalize (N, H, W) or (N, H, W, C) uint8 to (N, H, W, C), C in {1, 3}."""
    if x.dtype != np.uint8:
        raise ValueError(f"{path}: {key} must be uint8, got {x.dtype}")
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[3] not in _MODE_FOR_CHANNELS:
        raise ValueError(
            f"{path}: {key} must have shape (N, H, W) or (N, H, W, C) with C in (1, 3), "
            f"got {x.shape}"
        )
    return x


def _npz_labels(y: np.ndarray, n: int, path: str, key: str) -> np.ndarray:
    """Validate integer labels (N,) and convert to int64."""
    if not np.issubdtype(y.dtype, np.integer) or y.shape != (n,):
        raise ValueError(
            f"{path}: {key} must be an integer array of shape ({n},), "
            f"got {y.dtype} {y.shape}"
        )
    return y.astype(np.int64)


def load_npz(path: str) -> tuple[Splits, list[str]]:
    """Load ``x_train, y_train, x_test, y_test`` (+ optional ``class_names``).

    Images are uint8 (N, H, W) or (N, H, W, C); without ``class_names`` the
    classes are "0".."max_label".

    Returns:
        ({"train": (uint8 (N, H, W, C), int64 (N,)), "test": ...}, class_names)
    """
    if not os.path.isfile(path):
        raise ValueError(f"npz file {path} does not exist")
    with np.load(path, allow_pickle=False) as z:
        missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in z]
        if missing:
            raise ValueError(f"{path}: missing keys {missing}; found {sorted(z.files)}")
        splits: Splits = {}
        for split in SPLITS:
            x = _npz_images(z[f"x_{split}"], path, f"x_{split}")
            splits[split] = (x, _npz_labels(z[f"y_{split}"], len(x), path, f"y_{split}"))
        names = [str(n) for n in z["class_names"]] if "class_names" in z else None
    if names is None:
        top = max(int(y.max(initial=-1)) for _, y in splits.values())
        names = [str(i) for i in range(top + 1)]
    for split, (_, y) in splits.items():
        _check_source_labels(y, len(names), f"{path} y_{split}")
    return splits, names


def load_source(source: str, path: str | None = None) -> tuple[Splits, list[str]]:
    """Dispatch to a loader by name: one of ``SOURCES``.

    ``path`` is required except for fashion_mnist (which defaults to the
    system dataset directory).

    Returns:
        ({"train": (uint8 (N, H, W, C), int64 (N,)), "test": ...}, class_names)
    """
    if source == "fashion_mnist":
        return load_fashion_mnist(path) if path else load_fashion_mnist()
    loaders = {"idx": load_idx_dir, "folder": load_image_folder, "npz": load_npz}
    if source not in loaders:
        raise ValueError(f"unknown source {source!r}; valid sources: {list(SOURCES)}")
    if not path:
        raise ValueError(f"source {source!r} needs a path")
    return loaders[source](path)


# ----------------------------------------------------------------- shard writer


def _fs(filesystem: fsspec.AbstractFileSystem | None) -> fsspec.AbstractFileSystem:
    """The given fsspec filesystem, or the local one."""
    return filesystem if filesystem is not None else fsspec.filesystem("file")


def _split_dir(root: str, split: str, fs: fsspec.AbstractFileSystem) -> str:
    """``<root>/<split>`` in the filesystem's path convention (posix, no protocol)."""
    return posixpath.join(fs._strip_protocol(root).rstrip("/"), split)


def _check_write_inputs(images: Any, labels: Any, class_names: list[str]) -> None:
    """Validate images uint8 (N, H, W, C), labels int (N,), labels < len(class_names)."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 \
            or images.shape[3] not in _MODE_FOR_CHANNELS:
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
    _check_source_labels(labels, len(class_names), "labels")


def _shard_table(images: np.ndarray, labels: np.ndarray, metadata: bytes) -> pa.Table:
    """Arrow table of PNG-encoded images (binary) and int64 labels with cfgd metadata."""
    schema = pa.schema(
        [("image", pa.binary()), ("label", pa.int64())], metadata={METADATA_KEY: metadata}
    )
    pngs = [encode_png(img) for img in images]
    return pa.Table.from_arrays(
        [pa.array(pngs, type=pa.binary()), pa.array(labels.astype(np.int64))], schema=schema
    )


def write_shards(
    out_root: str,
    split: str,
    images: np.ndarray,
    labels: np.ndarray,
    class_names: list[str],
    rows_per_shard: int = 10000,
    filesystem: fsspec.AbstractFileSystem | None = None,
) -> list[str]:
    """Write one split as PNG-in-Parquet shards ``<out_root>/<split>/part-NNNNN.parquet``.

    The shards go to a hidden temporary sibling directory first, which then
    replaces ``<out_root>/<split>``; an interrupted write leaves only the
    temporary directory, never a partial split.

    Args:
        images: uint8 (N, H, W, C), C == 1 (PNG mode L) or 3 (RGB).
        labels: integer (N,), each in [0, len(class_names)).
        class_names: class names, index == label.
        rows_per_shard: maximum rows per Parquet file.
        filesystem: fsspec filesystem (default: local).

    Returns:
        Paths of the written files (in their final location), in order.
    """
    _check_write_inputs(images, labels, class_names)
    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
    if not split or "/" in split or split.startswith("."):
        raise ValueError(f"invalid split name {split!r}; use e.g. 'train' or 'test'")
    fs = _fs(filesystem)
    final_dir = _split_dir(out_root, split, fs)
    parent = posixpath.dirname(final_dir)
    tag = uuid.uuid4().hex[:8]
    tmp_dir = posixpath.join(parent, f".{split}.tmp-{tag}")
    _, height, width, channels = images.shape
    metadata = json.dumps({
        "class_names": list(class_names), "height": int(height), "width": int(width),
        "channels": int(channels), "format_version": FORMAT_VERSION,
    }).encode()
    labels = np.asarray(labels)
    names = []
    fs.makedirs(tmp_dir, exist_ok=True)
    try:
        for shard, start in enumerate(range(0, len(images), rows_per_shard)):
            stop = start + rows_per_shard
            name = f"part-{shard:05d}.parquet"
            with fs.open(posixpath.join(tmp_dir, name), "wb") as f:
                pq.write_table(_shard_table(images[start:stop], labels[start:stop], metadata), f)
            names.append(name)
        _replace_dir(fs, tmp_dir, final_dir, posixpath.join(parent, f".{split}.old-{tag}"))
    except BaseException:
        if fs.exists(tmp_dir):
            fs.rm(tmp_dir, recursive=True)
        raise
    return [posixpath.join(final_dir, n) for n in names]


def _move(fs: fsspec.AbstractFileSystem, src: str, dst: str) -> None:
    """Move a directory. Object stores have no directories (only keys, and some
    servers keep empty "directory" markers that a recursive copy trips over), so
    there each file is moved on its own."""
    if isinstance(fs, LocalFileSystem):
        fs.mv(src, dst, recursive=True)
        return
    for path in fs.find(src):
        fs.mv(path, dst + path[len(src):])
    if fs.exists(src):  # leftover directory markers
        fs.rm(src, recursive=True)


def _replace_dir(fs: fsspec.AbstractFileSystem, src: str, dst: str, old: str) -> None:
    """Move src to dst, replacing dst. The old dst is moved aside first (not
    deleted) so a crash in between leaves it recoverable."""
    if fs.exists(dst) and fs.find(dst):
        _move(fs, dst, old)
    _move(fs, src, dst)
    if fs.exists(old):
        fs.rm(old, recursive=True)


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
    if meta.get("channels") not in _MODE_FOR_CHANNELS:
        raise ValueError(f"{path}: cfgd metadata channels must be 1 or 3, "
                         f"got {meta.get('channels')!r}")
    return meta


def _check_columns(schema: pa.Schema, path: str) -> None:
    """Require ``image`` binary and ``label`` integer columns."""
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


def read_meta(
    root: str, split: str, filesystem: fsspec.AbstractFileSystem | None = None
) -> DatasetMeta:
    """Read and cross-check the schema of every shard of ``<root>/<split>``.

    Only Parquet footers are read, so this is cheap even for large datasets.

    Returns:
        DatasetMeta with images (height, width, channels), total num_rows and
        the sorted shard paths.
    """
    fs = _fs(filesystem)
    split_dir = _split_dir(root, split, fs)
    files = _list_shards(split_dir, fs)
    reference, ref_path, num_rows = None, None, 0
    for path in files:
        with fs.open(path, "rb") as f:
            try:
                pf = pq.ParquetFile(f)
            except (pa.ArrowInvalid, OSError) as e:
                raise ValueError(f"{path}: not a readable Parquet file: {e}") from e
            schema, rows = pf.schema_arrow, pf.metadata.num_rows
        _check_columns(schema, path)
        meta = _parse_cfgd_metadata(schema, path)
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
        num_rows=num_rows, files=files,
    )


def validate_labels(
    root: str, split: str, meta: DatasetMeta,
    filesystem: fsspec.AbstractFileSystem | None = None,
) -> None:
    """Check every label of every shard is in [0, meta.num_classes).

    Reads only the ``label`` column. ``root``/``split`` are used for messages;
    the files checked are ``meta.files``.
    """
    fs = _fs(filesystem)
    for path in meta.files:
        with fs.open(path, "rb") as f:
            column = pq.read_table(f, columns=["label"]).column("label")
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


# ---------------------------------------------------------------- Ray loading


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
    # Affine map 0..255 -> -1..1 in float32; transpose to channels-first for torch.
    scaled = out.transpose(0, 3, 1, 2).astype(np.float32) * np.float32(2.0 / 255.0)
    scaled -= np.float32(1.0)
    return {"image": scaled, "label": np.asarray(batch["label"], dtype=np.int64)}


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

    fs = _fs(filesystem)
    split_dir = _split_dir(root, split, fs)
    # A native pyarrow filesystem (cfgd.storage.arrow_fs) reads S3 faster than a wrapped fsspec one.
    arrow = arrow_filesystem if arrow_filesystem is not None else _arrow_fs(filesystem)
    shuffle = ray.data.FileShuffleConfig(seed=seed) if seed is not None else "files"
    ds = ray.data.read_parquet(split_dir, filesystem=arrow, include_paths=True, shuffle=shuffle)
    return ds.map_batches(
        decode_batch,
        fn_kwargs={"height": meta.height, "width": meta.width, "channels": meta.channels},
        batch_format="numpy",
    )


def prepare(source: str, source_path: str | None, root: str, rows_per_shard: int = 10000,
            test_fraction: float = 0.1, overwrite: bool = False, storage=None) -> dict[str, DatasetMeta]:
    """Convert a source into train/test Parquet shards under ``root``; returns each split's meta.

    ``root`` is a local path or an ``s3://`` URI (reached with ``storage``, a
    cfgd.storage.StorageOptions). Splits that already exist and read back cleanly
    are kept unless ``overwrite``, so running the job twice is cheap.
    """
    from cfgd.storage import check_access, fsspec_fs

    check_access(root, storage, write=True)  # a bad endpoint or bucket fails here, in seconds
    fs = fsspec_fs(root, storage)
    if not overwrite:
        try:
            return {s: read_meta(root, s, fs) for s in ("train", "test")}
        except (ValueError, FileNotFoundError):
            pass  # missing or damaged: (re)write below
    if source == "folder":
        splits, names = load_image_folder(source_path or "", test_fraction=test_fraction)
    else:
        splits, names = load_source(source, source_path)
    metas = {}
    for split, (images, labels) in splits.items():
        write_shards(root, split, images, labels, names, rows_per_shard=rows_per_shard, filesystem=fs)
        metas[split] = read_meta(root, split, fs)
        validate_labels(root, split, metas[split], fs)
    return metas
