"""Tests for cfgd.data.images: the uint8 <-> [-1, 1] maps every reader and writer shares."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import torch

from cfgd.data.images import encode_png, to_uint8, uint8_to_model, uint8_to_unit
from cfgd.data.split_loader import decode_batch

LEVELS = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)  # every uint8 value once


def test_forward_map_is_float32_affine_on_every_level():
    x = uint8_to_model(LEVELS)
    assert x.dtype == torch.float32 and tuple(x.shape) == (1, 1, 16, 16)
    # v * float32(2/255) - 1, each step rounded to float32: the map the stored data was
    # always decoded with. A float64 computation would differ in the last bit for some v.
    want = (np.arange(256, dtype=np.float32) * np.float32(2.0 / 255.0)) - np.float32(1.0)
    assert np.array_equal(x.numpy().ravel(), want)
    assert x.min() == -1.0 and x.max() == 1.0


def test_forward_map_is_channels_first():
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    x = uint8_to_unit(u8)
    assert x.shape == (2, 3, 5, 7)
    assert np.array_equal(x[1, 2, 4, 6], uint8_to_unit(u8[1:2, 4:5, 6:7, 2:3]).ravel()[0])
    assert np.array_equal(uint8_to_model(u8).numpy(), x)


def test_inverse_round_trips_every_level_and_clamps():
    assert np.array_equal(to_uint8(uint8_to_model(LEVELS)), LEVELS)
    out = to_uint8(torch.tensor([[[[-3.0, -1.0, 0.0, 1.0, 7.0]]]]))
    assert out.dtype == np.uint8 and out.shape == (1, 1, 5, 1)
    # 0.0 -> 127.5 rounds half to even: 128.
    assert out.ravel().tolist() == [0, 0, 128, 255, 255]


def test_decode_batch_uses_the_same_map():
    rng = np.random.default_rng(1)
    u8 = rng.integers(0, 256, (4, 6, 6, 1), dtype=np.uint8)
    batch = {"image": np.array([encode_png(im) for im in u8], dtype=object), "label": np.arange(4)}
    out = decode_batch(batch, 6, 6, 1)
    assert np.array_equal(out["image"], uint8_to_model(u8).numpy())


def test_data_modules_do_not_import_torch():
    """Ray Data decode tasks and cfgd.config import these; torch would cost each of them
    seconds and hundreds of MB."""
    code = ("import sys; import cfgd.data.images, cfgd.data.sources, cfgd.data.shards, cfgd.data.split_loader; "
            "print('torch' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
