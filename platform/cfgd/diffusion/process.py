"""Forward process and training loss (docs/cfg-math.md §1, §4).

Timesteps follow the spec: ``t`` runs over ``1..T`` and ``ᾱ_t = ∏_{s≤t} α_s``.
Arrays are stored 0-based (``alphas_cumprod[t - 1]`` is ``ᾱ_t``), computed once
in float64 and cast where used. The network is only seen through the seam
``eps_fn(x_t, t, labels) -> eps``; a network that predicts v or x0 (cfgd.spec.
PARAMETERIZATIONS) is put behind that seam by :func:`as_eps_fn`, the one place a
parameterisation is turned into ε, so every solver and guidance rule works unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from cfgd.spec import LOSS_WEIGHTINGS, PARAMETERIZATIONS, SCHEDULES

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

    ``alphas_cumprod[t - 1] = ᾱ_t`` for t in 1..T, inside (0, 1); with zero terminal SNR
    ᾱ_T = 0 exactly (x_T is pure noise).
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


def rescale_zero_terminal_snr(alphas_cumprod: np.ndarray) -> np.ndarray:
    """Lin et al. 2023 (arXiv 2305.08891), Algorithm 1: shift and scale √ᾱ so that the last
    is 0 and the first unchanged. (T,) → (T,), float64; needs T >= 2."""
    s = np.sqrt(alphas_cumprod)
    first, last = s[0], s[-1]
    s = (s - last) * (first / (first - last))
    return s**2


def make_schedule(name: str, T: int = 1000, zero_terminal_snr: bool = False) -> Schedule:
    """Build a named schedule; ``name`` is one of SCHEDULES.

    ``zero_terminal_snr`` rescales it so that ᾱ_T = 0 (rescale_zero_terminal_snr); the
    betas are re-derived from the rescaled ᾱ (β_T = 1), and ᾱ is kept as rescaled, not
    re-multiplied, so that ᾱ_T is exactly 0.
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown noise schedule {name!r}; choose one of {list(SCHEDULES)}")
    if T < 1 or (zero_terminal_snr and T < 2):
        raise ValueError(f"timesteps must be >= {2 if zero_terminal_snr else 1}, got {T}")
    betas = linear_betas(T) if name == "linear" else cosine_betas(T)
    alphas_cumprod = np.cumprod(1.0 - betas)
    if zero_terminal_snr:
        alphas_cumprod = rescale_zero_terminal_snr(alphas_cumprod)
        betas = 1.0 - alphas_cumprod / np.concatenate([[1.0], alphas_cumprod[:-1]])
    inner = alphas_cumprod[:-1] if zero_terminal_snr else alphas_cumprod
    assert np.all(inner > 0) and np.all(alphas_cumprod < 1) and alphas_cumprod[-1] >= 0, "ᾱ_t must lie in (0, 1)"
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


# ------------------------------------------------------------- parameterisations
# With a = ᾱ_t, x_t = √a·x0 + √(1−a)·ε and v = √a·ε − √(1−a)·x0 (Salimans & Ho 2022):
#   from v:  ε = √(1−a)·x_t + √a·v,   x0 = √a·x_t − √(1−a)·v   (no division: finite at a = 0)
#   from x0: ε = (x_t − √a·x0) / √(1−a)                       (√(1−a) > 0 for every t)
#   from ε:  x0 = (x_t − √(1−a)·ε) / √a                        (undefined at a = 0)


def check_parameterization(parameterization: str) -> str:
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"unknown parameterization {parameterization!r}; choose one of {list(PARAMETERIZATIONS)}")
    return parameterization


def to_eps(out: torch.Tensor, x_t: torch.Tensor, a: torch.Tensor, parameterization: str) -> torch.Tensor:
    """ε from a network output ``out`` at x_t; a: ᾱ_t (B,) float64. out, x_t: (B, ...)."""
    if parameterization == "eps":
        return out
    sa, s1a = bcast(a.sqrt(), x_t), bcast((1 - a).sqrt(), x_t)
    if parameterization == "v":
        return s1a * x_t + sa * out
    return (x_t - sa * out) / s1a


def to_x0(out: torch.Tensor, x_t: torch.Tensor, a: torch.Tensor, parameterization: str) -> torch.Tensor:
    """x0 from a network output ``out`` at x_t; a: ᾱ_t (B,) float64. out, x_t: (B, ...)."""
    if parameterization == "x0":
        return out
    sa, s1a = bcast(a.sqrt(), x_t), bcast((1 - a).sqrt(), x_t)
    if parameterization == "v":
        return sa * x_t - s1a * out
    return (x_t - s1a * out) / sa


def target(parameterization: str, x0: torch.Tensor, noise: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """What the network learns to predict: ε, v = √a·ε − √(1−a)·x0, or x0. a: ᾱ_t (B,)."""
    if parameterization == "eps":
        return noise
    if parameterization == "x0":
        return x0
    return bcast(a.sqrt(), x0) * noise - bcast((1 - a).sqrt(), x0) * x0


class Predictor:
    """A network that predicts ``parameterization``, seen as ε (call: the EpsFn seam) and
    as x̂0 (:meth:`x0`, finite where ᾱ_t = 0 for v and x0)."""

    def __init__(self, model_fn: EpsFn, schedule: Schedule, parameterization: str):
        self.model_fn, self.schedule = model_fn, schedule
        self.parameterization = check_parameterization(parameterization)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return to_eps(self.model_fn(x, t, labels), x, self.schedule.alpha_bar(t), self.parameterization)

    def x0(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return to_x0(self.model_fn(x, t, labels), x, self.schedule.alpha_bar(t), self.parameterization)


def as_eps_fn(model_fn: EpsFn, schedule: Schedule, parameterization: str) -> EpsFn:
    """A network ``model_fn(x_t, t, labels) -> output`` predicting ``parameterization``,
    as the sampler's eps_fn. For eps it is ``model_fn`` itself (samples stay bit-identical)."""
    if check_parameterization(parameterization) == "eps":
        return model_fn
    return Predictor(model_fn, schedule, parameterization)


def x0_fn(eps_fn: EpsFn) -> EpsFn:
    """The x̂0 view of an eps_fn, for a timestep with ᾱ_t = 0, where ε says nothing about x0.

    Only a v or x0 network (a :class:`Predictor`) has one; raises ValueError otherwise.
    """
    if isinstance(eps_fn, Predictor):
        return eps_fn.x0
    raise ValueError("ᾱ_t = 0 (zero terminal SNR) leaves x̂0 undefined for an ε-prediction network; "
                     "sample such a schedule with a v or x0 model (diffusion.parameterization)")


def loss_weights(a: torch.Tensor, parameterization: str, weighting: str = "uniform",
                 gamma: float = 5.0, offset: float = 0.0) -> torch.Tensor:
    """Per-sample loss weights (B,) float64 from ᾱ_t (B,).

    Each weighting is a weight λ(SNR) on ‖x0 − x̂0‖², SNR = ᾱ/(1−ᾱ); a network predicting
    ε or v gets λ divided by its target's own x0 factor (SNR for ε, SNR + 1 for v) so that
    all three parameterisations optimise the same thing. min_snr: λ = min(SNR + δ, γ),
    δ = ``offset``. With δ = 0 it is Hang et al. 2023 (arXiv 2303.09556): min(SNR, γ)/SNR
    for ε, min(SNR, γ)/(SNR + 1) for v. That λ → 0 at high noise, where the image's class
    and layout are decided: 0.02 at t = 900 of a 1000-step cosine schedule. δ > 0 keeps
    a weight of δ there (δ = 1: v's uniform weight, λ = SNR + 1, with its low-noise end
    capped at γ). δ > 0 is not for ε: λ/SNR diverges as SNR → 0.
    """
    if weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"unknown loss weighting {weighting!r}; choose one of {list(LOSS_WEIGHTINGS)}")
    check_parameterization(parameterization)
    if offset and parameterization == "eps":
        raise ValueError(f"a min-SNR offset ({offset:g}) needs parameterization v or x0 (its ε weight "
                         "min(SNR + δ, γ)/SNR diverges at high noise); use offset 0 for eps")
    a = a.to(torch.float64)
    if weighting == "uniform":
        return torch.ones_like(a)
    snr = a / (1 - a)
    lam = (snr + offset).clamp(max=gamma)  # the weight on ‖x0 − x̂0‖²
    if parameterization == "v":
        return lam / (snr + 1)
    if parameterization == "x0":
        return lam
    # SNR = 0 only with zero terminal SNR (refused for ε); the weight's limit there is 1.
    return torch.where(snr > 0, lam / snr, torch.ones_like(snr))


def training_loss(eps_fn: EpsFn, schedule: Schedule, x0: torch.Tensor, labels: torch.Tensor,
                  generator: torch.Generator | None = None, parameterization: str = "eps",
                  weighting: str = "uniform", gamma: float = 5.0, offset: float = 0.0) -> torch.Tensor:
    """Loss ‖target − f_θ(x_t, t, ỹ)‖², weighted per sample, with t ~ U{1..T} (§4).

    ``eps_fn`` is the network (it predicts ``parameterization``: ε, v or x0; see
    :func:`target`); ``weighting``/``gamma``: :func:`loss_weights`. ``labels`` are the
    (already dropped-out) conditions ỹ. x0: (B, C, H, W) → scalar.
    """
    B = x0.shape[0]
    t = torch.randint(1, schedule.T + 1, (B,), generator=generator, device=x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x_t = q_sample(schedule, x0, t, noise)
    a = schedule.alpha_bar(t)
    out = eps_fn(x_t, t, labels).float()
    goal = target(check_parameterization(parameterization), x0, noise, a).float()
    if weighting == "uniform":
        return torch.nn.functional.mse_loss(out, goal)
    per_sample = (out - goal).pow(2).flatten(1).mean(dim=1)
    return (loss_weights(a, parameterization, weighting, gamma, offset).to(per_sample) * per_sample).mean()
