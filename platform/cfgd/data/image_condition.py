"""The ``cond_image`` condition column: an image per row that the denoiser is conditioned on.

Made at prepare time from a *transform of the image itself* (SR3's and Palette's tasks):

* ``low_res`` (factor k): the image box-downsampled k× (28×28 → 7×7 for k = 4):
  super-resolution;
* ``masked`` (keep ``top``, ``bottom``, ``left`` or ``right``): the image with the other
  half blanked to 0 and one more channel, the mask (255 where kept): completion;

or read from a paired source: ``paired``, a second image folder holding a file at each
image's relative path (cfgd.data.prepare.paired_images).

Stored as PNG bytes of its own size and channels, declared in the shard metadata under
``conditions.cond_image``::

    {"cond_image": {"transform": "low_res", "factor": 4, "height": 7, "width": 7, "channels": 1}}

Here: the transforms (:func:`make_cond_images`), the declaration's check
(:func:`cond_image_shape`) and the decode of a batch's column (:func:`cond_image_array`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cfgd.data.images import decode_png, uint8_to_unit

COND_IMAGE = "cond_image"
TRANSFORMS = ("low_res", "masked", "paired")  # paired: read from a second image folder (cfgd.data.prepare)
KEEP = ("top", "bottom", "left", "right")
MAX_SIDE = 1024
MAX_CHANNELS = 4  # PNG: L, LA, RGB, RGBA


def low_res(images: np.ndarray, factor: int) -> np.ndarray:
    """uint8 (N, H, W, C) → uint8 (N, H/k, W/k, C), the mean of each k×k block (rounded)."""
    n, h, w, c = images.shape
    if factor < 2 or h % factor or w % factor:
        raise ValueError(f"low_res factor {factor} must be >= 2 and divide the image size {h}×{w}")
    blocks = images.reshape(n, h // factor, factor, w // factor, factor, c).astype(np.float64)
    return np.rint(blocks.mean(axis=(2, 4))).astype(np.uint8)


def masked(images: np.ndarray, keep: str) -> np.ndarray:
    """uint8 (N, H, W, C) → uint8 (N, H, W, C + 1): the ``keep`` half as it is, the other half 0,
    and a last channel, the mask: 255 where kept, 0 where blanked."""
    if keep not in KEEP:
        raise ValueError(f"mask keep={keep!r} is not valid; use one of {list(KEEP)}")
    n, h, w, c = images.shape
    mask = np.zeros((h, w), dtype=bool)
    half = {"top": (slice(0, h // 2), slice(None)), "bottom": (slice(h // 2, None), slice(None)),
            "left": (slice(None), slice(0, w // 2)), "right": (slice(None), slice(w // 2, None))}[keep]
    mask[half] = True
    out = np.where(mask[None, :, :, None], images, 0).astype(np.uint8)
    return np.concatenate([out, np.broadcast_to((mask * 255).astype(np.uint8)[None, :, :, None], (n, h, w, 1))],
                          axis=3)


def make_cond_images(images: np.ndarray, transform: str, factor: int = 4, keep: str = "top") -> tuple[np.ndarray,
                                                                                                        dict]:
    """The conditioning images of ``images`` (N, H, W, C) and their metadata description."""
    if transform == "low_res":
        out, desc = low_res(images, factor), {"transform": "low_res", "factor": int(factor)}
    elif transform == "masked":
        out, desc = masked(images, keep), {"transform": "masked", "keep": keep}
    else:
        raise ValueError(f"image condition {transform!r} is not valid; use one of {list(TRANSFORMS)}")
    _, h, w, c = out.shape
    return out, {**desc, "height": int(h), "width": int(w), "channels": int(c)}


def cond_image_shape(desc: Any, where: str) -> tuple[int, int, int]:
    """(height, width, channels) from a ``conditions.cond_image`` description; ValueError naming ``where``."""
    ok = isinstance(desc, dict) and all(isinstance(desc.get(k), int) for k in ("height", "width", "channels"))
    if not ok or not (1 <= desc["height"] <= MAX_SIDE and 1 <= desc["width"] <= MAX_SIDE
                      and 1 <= desc["channels"] <= MAX_CHANNELS):
        raise ValueError(f"{where}: conditions.cond_image must give height and width in [1, {MAX_SIDE}] and "
                         f"channels in [1, {MAX_CHANNELS}]; got {desc!r}")
    return desc["height"], desc["width"], desc["channels"]


def cond_image_array(column: Any, shape: tuple[int, int, int], where: str = "<unknown file>") -> np.ndarray:
    """A batch's ``cond_image`` column (PNG bytes) → float32 (B, C, h, w) in [-1, 1]; ValueError
    naming the row whose PNG does not decode to ``shape`` (h, w, C)."""
    out = np.empty((len(column), *shape), dtype=np.uint8)
    for i, b in enumerate(column):
        try:
            arr = decode_png(b)
        except ValueError as e:
            raise ValueError(f"{where}: cond_image of batch row {i}: {e}") from e
        if arr.shape != tuple(shape):
            raise ValueError(f"{where}: cond_image of batch row {i} decodes to {arr.shape}, expected (h, w, C) = "
                             f"{tuple(shape)}")
        out[i] = arr
    return uint8_to_unit(out)
