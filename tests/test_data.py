"""Tests for the data pipeline: cfgd.data.sources, cfgd.data.shards (writer, metadata checks),
cfgd.data.split_loader and cfgd.train.input_pipeline (decode, Ray loading), plus the PNG codec of cfgd.data.images."""

from __future__ import annotations

import gzip
import json
import os
import struct

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from builders import digits_uint8
from cfgd.data import sources
from cfgd.data.images import decode_png, encode_png
from cfgd.data.shards import read_split_meta, validate_labels, write_shards
from cfgd.data.sources import load_fashion_mnist, load_idx, load_idx_dir, load_image_folder, load_npz, load_source
from cfgd.data.split_loader import decode_batch
from cfgd.train.input_pipeline import read_dataset

DIGIT_CLASSES = [str(i) for i in range(10)]


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    """sklearn digits as uint8 (1797, 8, 8, 1) scaled 0..16 -> 0..255, labels int64."""
    return digits_uint8()


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory, digits) -> str:
    """Digits written as train shards of 500 rows (4 files)."""
    root = str(tmp_path_factory.mktemp("digits"))
    write_shards(root, "train", *digits, DIGIT_CLASSES, rows_per_shard=500)
    return root


def _numpy_batch(path: str) -> dict:
    """One shard as a Ray-style numpy batch, including the path column."""
    table = pq.read_table(path)
    n = table.num_rows
    return {
        "image": np.array(table.column("image").to_pylist(), dtype=object),
        "label": table.column("label").to_numpy(),
        "path": np.array([path] * n),
    }


def _cfgd_schema_metadata(**overrides) -> dict:
    meta = {"class_names": DIGIT_CLASSES, "height": 8, "width": 8, "channels": 1,
            "format_version": 1}
    meta.update(overrides)
    return {b"cfgd": json.dumps(meta).encode()}


# ------------------------------------------------------------------ round trip


def test_png_round_trip_gray_and_rgb():
    rng = np.random.default_rng(0)
    for c in (1, 3):
        img = rng.integers(0, 256, size=(5, 7, c), dtype=np.uint8)
        assert np.array_equal(decode_png(encode_png(img)), img)


def test_write_read_round_trip(digits, digits_root):
    images, labels = digits
    meta = read_split_meta(digits_root, "train")
    assert (meta.height, meta.width, meta.channels) == (8, 8, 1)
    assert meta.class_names == DIGIT_CLASSES and meta.num_classes == 10
    assert meta.num_rows == len(images) == 1797
    assert [os.path.basename(f) for f in meta.files] == [
        f"part-{i:05d}.parquet" for i in range(4)
    ]
    validate_labels(digits_root, "train", meta)

    decoded = [decode_batch(_numpy_batch(f), 8, 8, 1) for f in meta.files]
    got_images = np.concatenate([b["image"] for b in decoded])
    got_labels = np.concatenate([b["label"] for b in decoded])
    assert got_images.dtype == np.float32 and got_images.shape == (1797, 1, 8, 8)
    assert got_labels.dtype == np.int64
    expected = images.transpose(0, 3, 1, 2).astype(np.float64) / 127.5 - 1.0
    np.testing.assert_allclose(got_images, expected, atol=1e-6)
    assert np.array_equal(got_labels, labels)


def test_write_shards_replaces_split_and_leaves_no_temp(tmp_path, digits):
    images, labels = digits
    write_shards(str(tmp_path), "train", images[:300], labels[:300], DIGIT_CLASSES,
                 rows_per_shard=100)
    files = write_shards(str(tmp_path), "train", images[:50], labels[:50], DIGIT_CLASSES)
    assert len(files) == 1 and all(os.path.isfile(f) for f in files)
    assert sorted(os.listdir(tmp_path)) == ["train"]
    assert read_split_meta(str(tmp_path), "train").num_rows == 50


def test_write_shards_rejects_bad_inputs(tmp_path, digits):
    images, labels = digits
    bad = labels[:10].copy()
    bad[3] = 10
    with pytest.raises(ValueError, match=r"label 10 at row 3 .*\[0, 10\)"):
        write_shards(str(tmp_path), "train", images[:10], bad, DIGIT_CLASSES)
    with pytest.raises(ValueError, match="uint8 ndarray"):
        write_shards(str(tmp_path), "train", images[:10, :, :, 0], labels[:10], DIGIT_CLASSES)
    with pytest.raises(ValueError, match="empty"):
        write_shards(str(tmp_path), "train", images[:0], labels[:0], DIGIT_CLASSES)
    assert not os.path.exists(tmp_path / "train")


# ------------------------------------------------------------------ IDX sources


def _idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    """Serialize a uint8 array as IDX (magic 0x0000 08 <ndim> + big-endian dims)."""
    magic = magic if magic is not None else 0x0800 | array.ndim
    return struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) \
        + array.tobytes()


def _write_idx(path, array: np.ndarray, gz: bool, magic: int | None = None) -> str:
    raw = _idx_bytes(array, magic)
    with open(path, "wb") as f:
        f.write(gzip.compress(raw) if gz else raw)
    return str(path)


@pytest.mark.parametrize("gz", [True, False])
def test_load_idx(tmp_path, gz):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, size=(6, 4, 5), dtype=np.uint8)
    y = np.array([0, 1, 2, 3, 4, 5], dtype=np.uint8)
    suffix = ".gz" if gz else ""
    images, labels = load_idx(_write_idx(tmp_path / f"img{suffix}", x, gz),
                              _write_idx(tmp_path / f"lbl{suffix}", y, gz))
    assert images.shape == (6, 4, 5, 1) and images.dtype == np.uint8
    assert np.array_equal(images[..., 0], x)
    assert labels.dtype == np.int64 and np.array_equal(labels, y)


def test_load_idx_bad_magic_and_size(tmp_path):
    x = np.zeros((2, 3, 3), dtype=np.uint8)
    y = np.zeros(2, dtype=np.uint8)
    bad = _write_idx(tmp_path / "bad-images", x, gz=False, magic=0x0000_0901)
    good_labels = _write_idx(tmp_path / "labels", y, gz=False)
    with pytest.raises(ValueError, match=r"bad-images: bad IDX magic number 0x00000901"):
        load_idx(bad, good_labels)

    truncated = tmp_path / "short-images"
    truncated.write_bytes(_idx_bytes(x)[:-1])
    with pytest.raises(ValueError, match=r"short-images: IDX size mismatch"):
        load_idx(str(truncated), good_labels)

    three_labels = _write_idx(tmp_path / "three", np.zeros(3, dtype=np.uint8), gz=False)
    with pytest.raises(ValueError, match="counts must match"):
        load_idx(_write_idx(tmp_path / "ok-images", x, gz=False), three_labels)


def test_load_idx_dir_with_classes_txt(tmp_path):
    x = np.zeros((4, 2, 2), dtype=np.uint8)
    y = np.array([0, 1, 2, 1], dtype=np.uint8)
    for split_files in sources.IDX_FILES.values():
        _write_idx(tmp_path / (split_files[0] + ".gz"), x, gz=True)
        _write_idx(tmp_path / split_files[1], y, gz=False)
    (tmp_path / "classes.txt").write_text("cat\ndog\nbird\n")
    splits, names = load_idx_dir(str(tmp_path))
    assert names == ["cat", "dog", "bird"]
    assert splits["test"][0].shape == (4, 2, 2, 1)
    assert load_source("idx", str(tmp_path))[1] == names

    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte: label 2 at row 2"):
        load_idx_dir(str(tmp_path))


def test_load_fashion_mnist_missing_dir_hint(tmp_path):
    with pytest.raises(ValueError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(str(tmp_path / "nope"))


@pytest.mark.skipif(not os.path.isdir(sources.FASHION_MNIST_ROOT),
                    reason="Fashion-MNIST not installed")
def test_load_fashion_mnist():
    splits, names = load_fashion_mnist()
    assert splits["train"][0].shape == (60000, 28, 28, 1)
    assert splits["test"][0].shape == (10000, 28, 28, 1)
    assert splits["train"][1].shape == (60000,) and splits["train"][1].dtype == np.int64
    assert len(names) == 10 and names[0] == "T-shirt/top" and names[9] == "Ankle boot"


# --------------------------------------------------------------- folder source


def _save_png(path, size=(6, 5), mode="L", value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)


def test_load_image_folder(tmp_path):
    for cls, value in (("b_dogs", 200), ("a_cats", 50)):
        for i in range(10):
            _save_png(tmp_path / cls / f"{i}.png", value=value)
    (tmp_path / "a_cats" / "notes.txt").write_text("ignored")
    splits, names = load_image_folder(str(tmp_path), test_fraction=0.2, seed=0)
    assert names == ["a_cats", "b_dogs"]
    train_x, train_y = splits["train"]
    test_x, test_y = splits["test"]
    assert train_x.shape == (16, 5, 6, 1) and test_x.shape == (4, 5, 6, 1)
    assert np.bincount(test_y).tolist() == [2, 2]
    # Pixel value identifies the class, so labels must line up with images.
    assert np.array_equal(train_x[:, 0, 0, 0], np.where(train_y == 0, 50, 200))


def test_load_image_folder_mixed_modes_become_rgb(tmp_path):
    _save_png(tmp_path / "train" / "x" / "0.png", mode="L", value=9)
    _save_png(tmp_path / "test" / "x" / "0.png", mode="RGB", value=(1, 2, 3))
    splits, names = load_image_folder(str(tmp_path))
    assert names == ["x"]
    assert splits["train"][0].shape == (1, 5, 6, 3)
    assert splits["test"][0][0, 0, 0].tolist() == [1, 2, 3]


def test_load_image_folder_wrong_size(tmp_path):
    for i in range(3):
        _save_png(tmp_path / "a" / f"{i}.png")
        _save_png(tmp_path / "b" / f"{i}.png")
    _save_png(tmp_path / "b" / "big.png", size=(7, 5))
    with pytest.raises(ValueError, match=r"big\.png: image size 7x5 .*same size"):
        load_image_folder(str(tmp_path))


# ------------------------------------------------------------------ npz source


def test_load_npz_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    x_train = rng.integers(0, 256, size=(5, 4, 4), dtype=np.uint8)
    x_test = rng.integers(0, 256, size=(3, 4, 4), dtype=np.uint8)
    path = str(tmp_path / "d.npz")
    np.savez(path, x_train=x_train, y_train=np.array([0, 1, 2, 0, 1]),
             x_test=x_test, y_test=np.array([2, 2, 0]), class_names=np.array(["a", "b", "c"]))
    splits, names = load_source("npz", path)
    assert names == ["a", "b", "c"]
    assert np.array_equal(splits["train"][0][..., 0], x_train)
    assert np.array_equal(splits["test"][1], [2, 2, 0])
    assert splits["test"][1].dtype == np.int64

    np.savez(path, x_train=x_train, y_train=np.zeros(5, int), x_test=x_test)
    with pytest.raises(ValueError, match=r"d\.npz: missing keys \['y_test'\]"):
        load_npz(path)


def test_load_source_unknown():
    with pytest.raises(ValueError, match=r"unknown source 'hf'.*fashion_mnist.*npz"):
        load_source("hf", None)


# -------------------------------------------------------------- read_split_meta errors


def _write_table(path, columns: dict, metadata: dict | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table(columns)
    pq.write_table(table.replace_schema_metadata(metadata), path)


def test_read_meta_missing_label_column(tmp_path):
    bad = tmp_path / "train" / "part-00000.parquet"
    _write_table(bad, {"image": pa.array([b"x"], pa.binary())}, _cfgd_schema_metadata())
    with pytest.raises(ValueError, match=r"part-00000\.parquet: missing column 'label'"):
        read_split_meta(str(tmp_path), "train")


def test_read_meta_wrong_image_type(tmp_path):
    bad = tmp_path / "train" / "part-00000.parquet"
    _write_table(bad, {"image": pa.array(["png"]), "label": pa.array([1])},
                 _cfgd_schema_metadata())
    expected = r"part-00000\.parquet: column 'image' has type string, expected binary"
    with pytest.raises(ValueError, match=expected):
        read_split_meta(str(tmp_path), "train")


def test_read_meta_missing_metadata_and_mismatch(tmp_path):
    cols = {"image": pa.array([b"x"], pa.binary()), "label": pa.array([1])}
    _write_table(tmp_path / "a" / "part-00000.parquet", cols, None)
    with pytest.raises(ValueError, match=r"part-00000\.parquet: schema metadata key 'cfgd'"):
        read_split_meta(str(tmp_path), "a")

    _write_table(tmp_path / "b" / "part-00000.parquet", cols, _cfgd_schema_metadata())
    _write_table(tmp_path / "b" / "part-00001.parquet", cols, _cfgd_schema_metadata(height=9))
    with pytest.raises(ValueError, match=r"part-00001\.parquet: cfgd metadata .* differs"):
        read_split_meta(str(tmp_path), "b")


def test_read_meta_empty(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(ValueError, match=r"empty dataset: .*train"):
        read_split_meta(str(tmp_path), "train")
    with pytest.raises(ValueError, match=r"empty dataset: .*test"):
        read_split_meta(str(tmp_path), "test")

    empty = {"image": pa.array([], pa.binary()), "label": pa.array([], pa.int64())}
    _write_table(tmp_path / "train" / "part-00000.parquet", empty, _cfgd_schema_metadata())
    with pytest.raises(ValueError, match=r"empty dataset: .*train has 1 files but zero rows"):
        read_split_meta(str(tmp_path), "train")


# ------------------------------------------------------------- validate_labels


def test_validate_labels_out_of_range(tmp_path):
    png = encode_png(np.zeros((8, 8, 1), np.uint8))
    split = tmp_path / "train"
    _write_table(split / "part-00000.parquet",
                 {"image": pa.array([png] * 3, pa.binary()), "label": pa.array([0, 1, 2])},
                 _cfgd_schema_metadata())
    _write_table(split / "part-00001.parquet",
                 {"image": pa.array([png] * 3, pa.binary()), "label": pa.array([3, 12, 4])},
                 _cfgd_schema_metadata())
    meta = read_split_meta(str(tmp_path), "train")
    expected = r"part-00001\.parquet: row 1 has label 12, valid labels are \[0, 10\)"
    with pytest.raises(ValueError, match=expected):
        validate_labels(str(tmp_path), "train", meta)


# ---------------------------------------------------------------- decode_batch


def test_decode_batch_not_png():
    png = encode_png(np.zeros((8, 8, 1), np.uint8))
    batch = {"image": np.array([png, b"not a png"], dtype=object),
             "label": np.array([0, 1]), "path": np.array(["/d/part-00007.parquet"] * 2)}
    with pytest.raises(ValueError, match=r"/d/part-00007\.parquet: batch row 1: cannot decode"):
        decode_batch(batch, 8, 8, 1)


def test_decode_batch_wrong_shape():
    rgb = encode_png(np.zeros((8, 8, 3), np.uint8))
    small = encode_png(np.zeros((4, 8, 1), np.uint8))
    for png, got in ((rgb, r"\(8, 8, 3\)"), (small, r"\(4, 8, 1\)")):
        batch = {"image": np.array([png], dtype=object), "label": np.array([0]),
                 "path": np.array(["/d/part-00003.parquet"])}
        with pytest.raises(ValueError, match=rf"part-00003\.parquet: .*{got}, "
                                             r"expected \(H, W, C\) = \(8, 8, 1\)"):
            decode_batch(batch, 8, 8, 1)


# ------------------------------------------------------------------- Ray Data


def test_read_dataset_iter_torch_batches(ray_local, digits_root):
    import torch

    meta = read_split_meta(digits_root, "train")
    ds = read_dataset(digits_root, "train", meta)
    total = 0
    labels = []
    for batch in ds.iter_torch_batches(batch_size=32):
        assert set(batch) == {"image", "label"}
        assert batch["image"].dtype == torch.float32
        assert batch["image"].shape[1:] == (1, 8, 8)
        assert batch["label"].dtype == torch.int64
        assert float(batch["image"].min()) >= -1.0 and float(batch["image"].max()) <= 1.0
        total += len(batch["label"])
        labels.append(batch["label"])
    assert total == meta.num_rows == 1797
    assert torch.cat(labels).bincount().sum() == 1797
