"""Image representations and the conversions between them, each written once.

* PNG bytes ↔ uint8 (H, W, C), C ∈ {1, 3}: what the Parquet shards, the sweep tables
  and the HTTP API store.
* uint8 (N, H, W, C) ↔ float (N, C, H, W) in [-1, 1]: what the networks (the diffusion
  model and the evaluator) read and the sampler returns.
* a matplotlib figure → PNG bytes (:func:`figure_png`): the sweep's and the training
  curve's plots.

The forward map is v ↦ v · float32(2/255) − 1, computed in float32; the inverse is
round((clamp(x, −1, 1) + 1) · 127.5). Both stay exactly as they were when each caller
had its own copy, so decoded data and stored samples are byte-for-byte unchanged.

This module does not import torch at load time: the Ray Data decode tasks import it
(through :func:`cfgd.data.split_loader.decode_batch`) and need numpy only, so each of their worker
processes is spared torch's import time and memory. The two torch functions import it
when called; their callers have torch loaded already.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

if TYPE_CHECKING:
    import torch

# PIL mode of each channel count the project stores: grayscale or RGB (no alpha).
MODE_FOR_CHANNELS = {1: "L", 3: "RGB"}
# A conditioning image may carry one more channel, its mask (cfgd.data.image_condition).
PNG_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}

_TO_UNIT = np.float32(2.0 / 255.0)


# --------------------------------------------------------------------------- PNG


def encode_png(img: np.ndarray, modes: dict[int, str] = MODE_FOR_CHANNELS) -> bytes:
    """Encode one image as PNG.

    Args:
        img: uint8 array (H, W, C) with C == 1 (stored as mode L) or C == 3 (RGB);
            with ``modes=PNG_MODES`` also 2 (LA) and 4 (RGBA).

    Returns:
        PNG file bytes.
    """
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] not in modes:
        raise ValueError(
            f"encode_png expects uint8 (H, W, C) with C in {tuple(modes)}; "
            f"got dtype {img.dtype}, shape {img.shape}"
        )
    mode = modes[img.shape[2]]
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


# ------------------------------------------------------------- uint8 <-> [-1, 1]


def uint8_to_unit(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, C) → float32 (N, C, H, W) in [-1, 1], as numpy.

    The result is a channels-first view of channels-last memory (no copy beyond the
    float conversion); torch and Ray accept such strides.
    """
    # Affine map 0..255 -> -1..1 in float32; transpose to channels-first for torch.
    scaled = images.transpose(0, 3, 1, 2).astype(np.float32) * _TO_UNIT
    scaled -= np.float32(1.0)
    return scaled


def uint8_to_model(images: np.ndarray) -> "torch.Tensor":
    """uint8 (N, H, W, C) → float32 tensor (N, C, H, W) in [-1, 1] (shares the numpy memory)."""
    import torch

    return torch.from_numpy(uint8_to_unit(np.asarray(images)))


def to_uint8(images: "torch.Tensor") -> np.ndarray:
    """Float tensor (N, C, H, W), nominally in [-1, 1], on the CPU → uint8 (N, H, W, C).

    Values outside [-1, 1] are clamped; halves round to even (torch.round).
    """
    import torch

    x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def figure_png(fig, dpi: int = 100) -> bytes:
    """A matplotlib ``Figure`` (made without pyplot: no GUI backend) rendered as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()
