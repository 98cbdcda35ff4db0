"""DDIM sampling with classifier-free guidance over any ``eps_fn`` (cfg-math.md §5).

The sampler never sees a network: it calls ``eps_fn(x_t, t, labels) -> ε``. With
``w`` (or ``guidance_scale``) given, that callable is wrapped by
:class:`cfgd.guidance.GuidedEps`, the one place guidance happens.

Every sample owns a seed: its starting noise and any η-noise come from its own
generator, so a sample is the same image alone or inside any batch.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from cfgd.diffusion import EpsFn, Schedule
from cfgd.guidance import GuidedEps, resolve_w

SPACINGS = ("leading", "trailing", "linspace")


def ddim_timesteps(T: int, steps: int, spacing: str = "trailing") -> list[int]:
    """Strided timesteps in 1..T, strictly decreasing, ``steps`` of them.

    leading: 1, 1+k, 1+2k, … (k = T // steps); trailing: T, T−T/steps, … (always starts
    at the noisiest t = T); linspace: evenly spread over [1, T] including both ends.
    """
    if spacing not in SPACINGS:
        raise ValueError(f"unknown timestep spacing {spacing!r}; choose one of {list(SPACINGS)}")
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in [1, T={T}], got {steps}")
    if spacing == "leading":
        ts = np.arange(steps) * (T // steps) + 1
    elif spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / steps)).astype(np.int64)[:steps]
        ts = ts[::-1]
    else:
        ts = np.round(np.linspace(T, 1, steps)).astype(np.int64)  # from T, so one step starts at T
    ts = sorted({int(v) for v in ts}, reverse=True)
    assert len(ts) == steps, (spacing, T, steps, ts)
    return ts


def ddim_coefficients(schedule: Schedule, ts: Sequence[int], eta: float) -> list[tuple[float, ...]]:
    """Per step (t → t'): (sqrt ᾱ_t, sqrt(1−ᾱ_t), sqrt ᾱ_t', sqrt(1−ᾱ_t'−σ²), σ), from float64.

    The step after the last strided t goes to t' = 0 with ᾱ_0 = 1 (returns x̂_0).
    """
    ab = schedule.alphas_cumprod
    out = []
    for i, t in enumerate(ts):
        a_t = float(ab[t - 1])
        a_p = float(ab[ts[i + 1] - 1]) if i + 1 < len(ts) else 1.0
        sigma = eta * math.sqrt((1 - a_p) / (1 - a_t)) * math.sqrt(1 - a_t / a_p)
        out.append((math.sqrt(a_t), math.sqrt(1 - a_t), math.sqrt(a_p),
                    math.sqrt(max(1 - a_p - sigma**2, 0.0)), sigma))
    return out


def seeded_noise(generators: list[torch.Generator], shape: Sequence[int]) -> torch.Tensor:
    """One N(0, I) draw of ``shape`` per generator, stacked: (B, *shape), float32, CPU."""
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in generators])


@torch.inference_mode()
def ddim_sample(
    eps_fn: EpsFn,
    schedule: Schedule,
    labels: torch.Tensor,
    seeds: Sequence[int],
    shape: Sequence[int],
    steps: int = 50,
    eta: float = 0.0,
    spacing: str = "trailing",
    w=None,
    guidance_scale=None,
    null_label: int | None = None,
    interval: Sequence | None = None,
    rescale: float = 0.0,
    clip_denoised: bool = False,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> torch.Tensor:
    """Guided DDIM from x_T ~ N(0, I) to x_0.

    labels: (B,) int64 class labels; seeds: B ints, one per sample; shape: (C, H, W).
    w / guidance_scale: scalar or (B,) (at most one of them). Without either, ``eps_fn``
    is used unguided. ``null_label`` is required for guidance. ``interval`` = (t_lo, t_hi).
    Returns x_0: (B, C, H, W) float32 on ``device``.
    """
    B = labels.shape[0]
    if len(seeds) != B:
        raise ValueError(f"need one seed per sample: {B} labels but {len(seeds)} seeds")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    device = torch.device(device)
    labels = labels.to(device)
    if w is not None or guidance_scale is not None:
        if null_label is None:
            raise ValueError("guidance needs null_label (cfgd.guidance.null_label(num_classes))")
        eps_fn = GuidedEps(eps_fn, labels, resolve_w(w, guidance_scale, B), null_label, interval, rescale)
    ts = ddim_timesteps(schedule.T, steps, spacing)
    coefs = ddim_coefficients(schedule, ts, eta)
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    x = seeded_noise(generators, shape).to(device)
    for t, (sa, s1a, sa_p, dir_p, sigma) in zip(tqdm(ts, disable=not progress, desc="DDIM"), coefs):
        eps = eps_fn(x, torch.full((B,), t, dtype=torch.long, device=device), labels)
        # x̂_0 = (x_t − sqrt(1−ᾱ_t)·ε̂) / sqrt(ᾱ_t)
        x0 = (x - s1a * eps) / sa
        if clip_denoised:
            # Keep ε̂ consistent with the clipped x̂_0 so both terms below agree.
            x0 = x0.clamp(-1, 1)
            eps = (x - sa * x0) / s1a
        # x_t' = sqrt(ᾱ_t')·x̂_0 + sqrt(1 − ᾱ_t' − σ²)·ε̂ + σ·z
        x = sa_p * x0 + dir_p * eps
        if sigma > 0:
            x = x + sigma * seeded_noise(generators, shape).to(device)
    return x
