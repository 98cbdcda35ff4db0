"""The evaluator artifact: loading it, embedding images, and the real data it scores against.

Evaluator checkpoint (a directory, local or ``s3://``)::

    model.safetensors   weights (no pickle)
    meta.json           kind, format version, architecture, image shape, class names,
                        test accuracy, training settings, size + sha256 of the weights

Written and verified through :mod:`cfgd.io.artifact`; the network is
:class:`cfgd.evaluate.evalnet.EvalNet` or ``JudgeNet`` (meta.json names it), the metrics :mod:`cfgd.evaluate.metrics`,
training it :mod:`cfgd.evaluate.evaluator_training`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from cfgd.data.images import uint8_to_model
from cfgd.data.split_loader import load_split
from cfgd.evaluate.evalnet import build_classifier
from cfgd.evaluate.metrics import Embedding, compute_metrics
from cfgd.io import artifact
from cfgd.io.storage import StorageOptions

KIND = "cfgd-evaluator"
WEIGHTS = "model.safetensors"


@dataclass
class Evaluator:
    """A loaded evaluation network (eval mode, CPU) and its meta.json."""

    net: torch.nn.Module  # EvalNet or JudgeNet (cfgd.evaluate.evalnet)
    meta: dict[str, Any]
    path: str = ""

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images it was trained on."""
        return tuple(self.meta["image_shape"])

    @property
    def test_accuracy(self) -> float:
        return float(self.meta["test_accuracy"])

    @property
    def sha256(self) -> str:
        """Identity of the weights: results of different evaluators are not comparable."""
        return self.meta["files"][WEIGHTS]["sha256"]

    @classmethod
    def load(cls, uri: str | Path, storage_options: StorageOptions | None = None) -> "Evaluator":
        """An evaluator checkpoint directory, local or ``s3://`` (downloaded to a cache and verified)."""
        local, meta = artifact.fetch(str(uri), KIND, [WEIGHTS], storage_options)
        net = build_classifier(meta["arch"])
        net.load_state_dict(load_file(local / WEIGHTS))
        return cls(net.eval(), meta, str(uri))

    @torch.inference_mode()
    def embed(self, images: torch.Tensor | np.ndarray, batch_size: int = 500) -> Embedding:
        """images: float (N, C, H, W) in [-1, 1], or uint8 (N, H, W, C) → Embedding."""
        if isinstance(images, np.ndarray) and images.dtype == np.uint8:
            images = uint8_to_model(images)
        images = torch.as_tensor(images, dtype=torch.float32)
        if tuple(images.shape[1:]) != self.image_shape:
            raise ValueError(f"evaluator {self.path} expects images (N, C, H, W) with (C, H, W) = "
                             f"{self.image_shape}, got {tuple(images.shape)}")
        feats, probs = [], []
        for lo in range(0, len(images), batch_size):
            f, logits = self.net.features_and_logits(images[lo:lo + batch_size])
            feats.append(f.double())
            probs.append(torch.softmax(logits.double(), dim=1))
        d, k = self.net.head.in_features, self.net.head.out_features
        return Embedding(torch.cat(feats).numpy() if feats else np.zeros((0, d)),
                         torch.cat(probs).numpy() if probs else np.zeros((0, k)))


@dataclass
class RealSplit:
    """A real test set cut in two halves: ``held_out`` plays the samples, ``reference`` the data.

    The floor compares ``n`` held-out images with the reference exactly as a sweep
    compares n samples, so finite-sample bias (FID grows as n shrinks) is the same on
    both sides of the comparison.
    """

    held_out: Embedding
    held_out_labels: np.ndarray
    reference: Embedding
    held_out_index: np.ndarray | None = None  # the held-out rows' positions in the split

    @classmethod
    def of(cls, emb: Embedding, labels: np.ndarray, seed: int = 0) -> "RealSplit":
        perm = np.random.default_rng(seed).permutation(len(emb))
        half = len(emb) // 2
        a, b = perm[:half], perm[half:]
        return cls(emb.take(a), np.asarray(labels)[a], emb.take(b), a)

    @classmethod
    def load(cls, evaluator: "Evaluator", data_root: str, split: str = "test",
             storage_options: StorageOptions | None = None, seed: int = 0) -> "RealSplit":
        """The real ``<data_root>/<split>`` embedded by ``evaluator`` and cut in two (see of)."""
        images, labels, _ = load_split(data_root, split, storage_options)
        return cls.of(evaluator.embed(images), labels, seed=seed)

    def pr_reference(self, n: int) -> Embedding:
        """The first n reference rows (already shuffled): a size-matched set for precision/recall."""
        return self.reference.take(slice(0, min(n, len(self.reference))))

    def floor(self, n: int, k: int = 3, is_splits: int = 1) -> dict[str, float]:
        """The metrics of n real held-out images: the best a generator can score at size n."""
        if n > len(self.held_out):
            raise ValueError(f"floor needs n <= {len(self.held_out)} held-out real images, got {n}")
        return compute_metrics(self.held_out.take(slice(0, n)), self.held_out_labels[:n], self.reference,
                               self.pr_reference(n), k, is_splits)


def write_evaluator(out: str, net: torch.nn.Module, meta: dict[str, Any], storage_options: StorageOptions | None = None,
                    overwrite: bool = False) -> str:
    """Write weights + meta.json to ``out``, local or ``s3://``, atomically (cfgd.io.artifact)."""
    def stage(tmp: Path) -> list[str]:
        save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, tmp / WEIGHTS)
        return [WEIGHTS]

    fields = {k: v for k, v in meta.items() if k not in ("kind", "format_version", "files")}
    return artifact.write(out, KIND, stage, fields, storage_options, overwrite)
