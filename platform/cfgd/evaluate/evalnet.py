"""The evaluation network: a small CNN whose penultimate layer is the metrics' feature space."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class EvalNet(nn.Module):
    """Conv (3×3) + BN + ReLU stages, 2×2 max-pool after all but the last, then
    average-pool to 4×4 → Linear(feature_dim) → ReLU (the features) → Linear(classes).

    x: (B, C, H, W) in [-1, 1] → logits (B, num_classes); works for any H, W ≥ 4.
    """

    POOL = 4

    def __init__(self, in_channels: int, num_classes: int, widths: Sequence[int] = (32, 64, 64),
                 feature_dim: int = 128):
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(cin, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            cin = w
        # Adaptive pooling fixes the head's input size whatever the image size
        # (it repeats pixels when the map is smaller than 4×4, e.g. 8×8 digits).
        layers.append(nn.AdaptiveAvgPool2d(self.POOL))
        self.body = nn.Sequential(*layers)
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(cin * self.POOL**2, feature_dim), nn.ReLU(inplace=True))
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) → (B, feature_dim)."""
        return self.embed(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.features(x)))

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x)
        return f, self.head(f)  # dropout is the identity in eval mode
