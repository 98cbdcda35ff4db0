"""The evaluation networks: a small CNN (EvalNet, the default evaluator) and a ResNet (JudgeNet,
a second judge); the penultimate layer of each is its metrics' feature space."""

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


class _Residual(nn.Module):
    """Pre-activation residual block (He et al. 2016): BN-ReLU-conv-BN-ReLU-conv, stride on the first."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.skip = None if stride == 1 and cin == cout else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(x))
        skip = x if self.skip is None else self.skip(h)
        return skip + self.conv2(torch.relu(self.bn2(self.conv1(h))))


class JudgeNet(nn.Module):
    """A second classifier of another design, for judging a recipe with a network it was not
    tuned on: a pre-activation ResNet (stem conv, one residual block per width, stride 2
    from the second on), global average pooling → Linear(feature_dim) (the features) →
    Linear(classes). No max-pooling, no fixed 4×4 grid: its features are not EvalNet's.

    x: (B, C, H, W) in [-1, 1] → logits (B, num_classes).
    """

    def __init__(self, in_channels: int, num_classes: int, widths: Sequence[int] = (32, 64, 128),
                 feature_dim: int = 128):
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)]
        cin = widths[0]
        for i, w in enumerate(widths):
            blocks.append(_Residual(cin, w, 1 if i == 0 else 2))
            cin = w
        blocks += [nn.BatchNorm2d(cin), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.body = nn.Sequential(*blocks)
        self.embed = nn.Sequential(nn.Linear(cin, feature_dim), nn.ReLU(inplace=True))
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) → (B, feature_dim)."""
        return self.embed(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.features(x)))

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x)
        return f, self.head(f)


ARCHS = {"evalnet": EvalNet, "judgenet": JudgeNet}


def build_classifier(arch: dict) -> nn.Module:
    """The network an evaluator's meta.json ``arch`` describes (name EvalNet or JudgeNet)."""
    cls = {c.__name__: c for c in ARCHS.values()}.get(arch["name"])
    if cls is None:
        raise ValueError(f"unknown evaluator architecture {arch['name']!r}; known: {sorted(c.__name__ for c in ARCHS.values())}")
    return cls(arch["in_channels"], arch["num_classes"], arch["widths"], arch["feature_dim"])


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels in x and y (edge-replicated padding,
    then a random crop): the augmentation the judge trains with. x: (B, C, H, W)."""
    if max_shift <= 0:
        return x
    b, _, h, w = x.shape
    padded = nn.functional.pad(x, (max_shift,) * 4, mode="replicate")
    dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(b, x.shape[1], h, w + 2 * max_shift)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(b, x.shape[1], h, w)
    return out.gather(3, cols)
