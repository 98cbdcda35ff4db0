"""Encoders the project ships for ``jobs/embed.py`` (a user names their own by import path).

An encoder is a callable that, called with the job's ``encoder_args``, returns a function
``images float32 (B, C, H, W) in [-1, 1] -> numpy float32 (B, D) or (B, L, D)``; it is
built once per actor. Each also says what it is (``describe``), stored in the shards'
metadata.
"""

from __future__ import annotations

import numpy as np
import torch


class EvaluatorFeatures:
    """The platform's evaluator's penultimate features (the space FID is measured in): image
    embeddings, so a model trained on them makes "image variations" (unCLIP's decoder)."""

    def __init__(self, evaluator: str = "outputs/evaluators/fashion_mnist", storage: dict | None = None):
        from cfgd.evaluate.evaluator import Evaluator
        from cfgd.io.storage import StorageOptions

        self.evaluator = Evaluator.load(evaluator, StorageOptions(**(storage or {})))
        self.source = evaluator

    def describe(self) -> dict:
        return {"evaluator": self.source, "evaluator_sha256": self.evaluator.sha256,
                "feature": "evaluator penultimate features"}

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.evaluator.embed(torch.as_tensor(images)).features.astype(np.float32)


class RandomProjection:
    """A fixed, seeded random projection of the pixels to ``dim`` values (``tokens`` rows of
    them): a tiny, deterministic encoder for tests and for trying the pipeline out."""

    def __init__(self, dim: int = 16, tokens: int = 1, seed: int = 0):
        self.dim, self.tokens, self.seed = int(dim), int(tokens), int(seed)
        self._weights: dict[int, np.ndarray] = {}

    def describe(self) -> dict:
        return {"dim": self.dim, "tokens": self.tokens, "seed": self.seed}

    def __call__(self, images: np.ndarray) -> np.ndarray:
        x = np.asarray(images, dtype=np.float32).reshape(len(images), -1)
        n = x.shape[1]
        if n not in self._weights:
            rng = np.random.default_rng(self.seed)
            self._weights[n] = (rng.standard_normal((n, self.tokens * self.dim)) / np.sqrt(n)).astype(np.float32)
        return (x @ self._weights[n]).reshape(len(x), self.tokens, self.dim)
