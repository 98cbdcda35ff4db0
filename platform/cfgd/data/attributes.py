"""Attributes measured from an image's pixels: the captions' vocabulary and their judge.

A captioned data set (``data.captions``) describes each training image by its class and
by three attributes read off its pixels, never from a label file:

- ``brightness``: the mean intensity of the object's pixels (those above ``OBJECT_LEVEL``):
  dark / medium / light.
- ``size``: the share of the frame the object covers: small / medium / large.
- ``texture``: the spread of intensity inside the object: plain / medium / patterned.

Each raw value is cut into terciles *per class*, fitted on the training split
(:func:`fit_thresholds`) and stored with the shards, so "a large sandal" means large for
a sandal and every class × level combination holds about a ninth of the class. The same
functions and thresholds judge samples (:func:`levels`): attribute adherence is the share
of samples whose measured level is the one the prompt asked for.
"""

from __future__ import annotations

import numpy as np

OBJECT_LEVEL = 0.1  # intensity (0..1) above which a pixel belongs to the object
ATTRIBUTES = {
    "brightness": ("dark", "medium", "light"),
    "size": ("small", "medium", "large"),
    "texture": ("plain", "medium", "patterned"),
}


def measure(images: np.ndarray) -> dict[str, np.ndarray]:
    """Raw attribute values per image. images: uint8 (N, H, W, C) → {name: float64 (N,)}."""
    x = np.asarray(images, dtype=np.float64).mean(axis=-1) / 255.0  # (N, H, W) grey
    x = x.reshape(len(x), -1)
    obj = x > OBJECT_LEVEL
    count = np.maximum(obj.sum(1), 1)
    mean = (x * obj).sum(1) / count
    spread = np.sqrt((((x - mean[:, None]) ** 2) * obj).sum(1) / count)
    return {"brightness": mean, "size": obj.mean(1), "texture": spread}


def fit_thresholds(images: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, list[list[float]]]:
    """Per attribute and class, the two tercile cuts of the raw value: {name: [[lo, hi] per class]}."""
    raw = measure(images)
    out: dict[str, list[list[float]]] = {}
    for name, values in raw.items():
        cuts = []
        for c in range(num_classes):
            v = values[labels == c]
            if len(v) == 0:
                raise ValueError(f"class {c} has no training images: its attribute thresholds cannot be fitted")
            cuts.append([float(q) for q in np.quantile(v, [1 / 3, 2 / 3])])
        out[name] = cuts
    return out


def levels(images: np.ndarray, labels: np.ndarray, thresholds: dict[str, list[list[float]]]) -> dict[str, np.ndarray]:
    """Each image's level per attribute, 0/1/2 (an index into ATTRIBUTES[name]): {name: int64 (N,)}."""
    raw = measure(images)
    labels = np.asarray(labels, dtype=np.int64)
    out = {}
    for name, values in raw.items():
        cuts = np.asarray(thresholds[name], dtype=np.float64)[labels]  # (N, 2)
        out[name] = (values > cuts[:, 0]).astype(np.int64) + (values > cuts[:, 1])
    return out
