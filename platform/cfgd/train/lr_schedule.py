"""The learning rate of each optimizer step: warm-up, then constant or cosine."""

from __future__ import annotations

import math

from cfgd.config import TrainConfig


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """The rate of optimizer step ``step`` (0-based): linear warm-up over ``warmup_steps``, then
    ``constant``, or ``cosine``: half a cosine from ``lr`` down to 0 at ``steps`` (a short run
    ends on small steps, which lowers its final loss; a run resumed past ``steps`` stays at 0)."""
    warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    if cfg.lr_schedule == "constant" or step < cfg.warmup_steps:
        return cfg.lr * warm
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
