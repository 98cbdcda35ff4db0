"""Forward process and training loss (shared/docs/cfg-math.md §1, §4).

Timesteps follow the spec: ``t`` runs over ``1..T`` and ``ᾱ_t = ∏_{s≤t} α_s``.
Arrays are stored 0-based (``alphas_cumprod[t - 1]`` is ``ᾱ_t``), computed once
in float64 and cast where used. The network is only seen through the seam
``eps_fn(x_t, t, labels) -> eps``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from cfgd.spec import SCHEDULES

EpsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def linear_betas(T: int) -> np.ndarray:
    """Ho et al. 2020: β from 1e-4 to 0.02 at T = 1000, rescaled so that other T
    give the same total noise (as in improved-diffusion). Shape (T,), float64."""
    scale = 1000.0 / T
    return np.linspace(scale * 1e-4, scale * 0.02, T, dtype=np.float64)


def cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal 2021: ᾱ(t) = f(t)/f(0), f(t) = cos²(((t/T) + s)/(1 + s) · π/2).

    β is clipped at ``max_beta`` so that ᾱ_T stays > 0. Shape (T,), float64.
    """
    f = lambda u: math.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    betas = [min(1 - f(t) / f(t - 1), max_beta) for t in range(1, T + 1)]
    return np.asarray(betas, dtype=np.float64)


@dataclass(frozen=True)
class Schedule:
    """The noise schedule, precomputed once in float64.

    ``alphas_cumprod[t - 1] = ᾱ_t`` for t in 1..T, strictly inside (0, 1).
    """

    betas: np.ndarray  # (T,)
    alphas_cumprod: np.ndarray  # (T,)

    @property
    def T(self) -> int:
        return len(self.betas)

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """ᾱ_t for integer timesteps t in 1..T (any shape); float64, on t's device."""
        table = torch.as_tensor(self.alphas_cumprod, device=t.device)
        return table[t.long() - 1]


def make_schedule(name: str, T: int = 1000) -> Schedule:
    """Build a named schedule; ``name`` is one of SCHEDULES."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown noise schedule {name!r}; choose one of {list(SCHEDULES)}")
    if T < 1:
        raise ValueError(f"timesteps must be >= 1, got {T}")
    betas = linear_betas(T) if name == "linear" else cosine_betas(T)
    alphas_cumprod = np.cumprod(1.0 - betas)
    assert np.all((alphas_cumprod > 0) & (alphas_cumprod < 1)), "ᾱ_t must lie in (0, 1)"
    return Schedule(betas=betas, alphas_cumprod=alphas_cumprod)


def bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-sample values (B,) reshaped to broadcast over x (B, ...), in x's dtype."""
    return v.to(dtype=x.dtype, device=x.device).reshape(-1, *([1] * (x.dim() - 1)))


# forward process q(x_t | x_0) = N(sqrt(ᾱ_t) x_0, (1 − ᾱ_t) I)
def q_sample(schedule: Schedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(ᾱ_t)·x_0 + sqrt(1 − ᾱ_t)·ε.  x0, noise: (B, ...); t: (B,) in 1..T."""
    a = schedule.alpha_bar(t)
    return bcast(a.sqrt(), x0) * x0 + bcast((1 - a).sqrt(), x0) * noise


def drop_labels(labels: torch.Tensor, p_uncond: float, null_label: int,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Condition dropout (§4): each label becomes ``null_label`` with probability p_uncond.

    labels: (B,) int64 → (B,) int64.
    """
    if p_uncond <= 0:
        return labels
    u = torch.rand(labels.shape, generator=generator, device=labels.device)
    return torch.where(u < p_uncond, torch.full_like(labels, null_label), labels)


def training_loss(eps_fn: EpsFn, schedule: Schedule, x0: torch.Tensor, labels: torch.Tensor,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """ε-prediction loss ‖ε − ε_θ(x_t, t, ỹ)‖² with t ~ U{1..T} (§4).

    ``labels`` are the (already dropped-out) conditions ỹ. x0: (B, C, H, W) → scalar.
    """
    B = x0.shape[0]
    t = torch.randint(1, schedule.T + 1, (B,), generator=generator, device=x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x_t = q_sample(schedule, x0, t, noise)
    return torch.nn.functional.mse_loss(eps_fn(x_t, t, labels).float(), noise.float())
