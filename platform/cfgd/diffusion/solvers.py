"""Guided sampling over any ``eps_fn``: the solvers and the one entry point :func:`sample`.

The sampler never sees a network: it calls ``eps_fn(x_t, t, y) -> ε`` through
:class:`cfgd.diffusion.guidance.GuidedDenoiser`, the one place guidance happens. A solver is a
function ``(denoise, schedule, ts, x, generators, solver) -> x_0`` in :data:`SOLVER_FNS`;
a new one (UniPC, DPM-Solver++(3M), an SDE variant) is one more entry.

Every sample owns a seed: its starting noise and any η-noise come from its own
generator, so a sample is the same image alone or inside any batch.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from cfgd.diffusion import conditions as cond_ops
from cfgd.diffusion.conditions import Cond
from cfgd.diffusion.guidance import Denoised, GuidedDenoiser
from cfgd.diffusion.plan import SPACINGS, SamplingPlan, Solver
from cfgd.diffusion.process import EpsFn, Schedule

Denoise = Callable[[torch.Tensor, int], Denoised]  # (x_t, t) -> guided x̂0 and re-noise ε


# The noisiest log-SNR a λ-spaced grid spreads its steps over: σ/α = 80, EDM's σ_max (Karras
# et al. 2022; DPM-Solver stops its cosine schedule at t = 0.9946, λ ≈ −4.8, for the same
# reason). Below it x̂0 is the data mean whatever x_t holds, so the clipped cosine schedule's
# plunge to λ_T ≈ −9.9 (t ∈ [992, 1000]) is crossed in one step instead of eight.
LAMBDA_MIN = -math.log(80.0)
# Consecutive timesteps whose log-SNR differs by less are one noise level twice: a step
# that denoises nothing but costs a network evaluation. Refused (integer timesteps of the
# shipped schedules differ by ≥ 0.01, linear T = 1000 at its noisy end).
MIN_LAMBDA_GAP = 1e-3


def log_snr(alphas_cumprod) -> np.ndarray:
    """λ_t = log(√ᾱ_t / √(1 − ᾱ_t)) for t = 1..T, float64 (−∞ where ᾱ = 0: zero terminal SNR)."""
    ab = np.asarray(alphas_cumprod, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return 0.5 * (np.log(ab) - np.log1p(-ab))


def ddim_timesteps(T: int, steps: int, spacing: str = "trailing", alphas_cumprod=None) -> list[int]:
    """Strided timesteps in 1..T, strictly decreasing, ``steps`` of them.

    leading: 1, 1+k, 1+2k, … (k = T // steps); trailing: T, T−T/steps, … (always starts
    at the noisiest t = T); linspace: evenly spread over [1, T] including both ends;
    logsnr: t = T, then evenly spread in log-SNR λ from max(λ_T, LAMBDA_MIN) to λ_1
    (DPM-Solver's choice for low-resolution images, without spending steps where the
    schedule's λ plunges; needs ``alphas_cumprod``). With ``alphas_cumprod`` every grid is
    checked: two steps at one noise level (|Δλ| < MIN_LAMBDA_GAP) are refused.
    """
    if spacing not in SPACINGS:
        raise ValueError(f"unknown timestep spacing {spacing!r}; choose one of {list(SPACINGS)}")
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in [1, T={T}], got {steps}")
    if spacing == "logsnr":
        if alphas_cumprod is None:
            raise ValueError("logsnr spacing needs the schedule's alphas_cumprod")
        ts = _logsnr_timesteps(log_snr(alphas_cumprod), steps)
    elif spacing == "leading":
        ts = np.arange(steps) * (T // steps) + 1
    elif spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / steps)).astype(np.int64)[:steps]
    else:
        ts = np.round(np.linspace(T, 1, steps)).astype(np.int64)  # from T, so one step starts at T
    ts = sorted({int(v) for v in ts}, reverse=True)
    assert len(ts) == steps, (spacing, T, steps, ts)
    if alphas_cumprod is not None:
        check_timesteps(ts, alphas_cumprod, spacing)
    return ts


def _logsnr_timesteps(lam: np.ndarray, steps: int) -> list[int]:
    """t = T, then the t nearest to each of ``steps − 1`` λ values evenly spread from
    max(λ_T, LAMBDA_MIN) (exclusive) to λ_1, nudged apart where two round to one t."""
    T = len(lam)
    lo = max(float(lam[-1]), LAMBDA_MIN)
    out = [T]
    for i, v in enumerate(np.linspace(lo, lam[0], steps)[1:], start=1):
        t = int(np.argmin(np.abs(lam - v))) + 1
        out.append(min(max(t, steps - i), out[-1] - 1))
    return out


def check_timesteps(ts: Sequence[int], alphas_cumprod, spacing: str = "") -> None:
    """Refuse a grid with two steps at one noise level (|λ_t − λ_t'| < MIN_LAMBDA_GAP)."""
    lam = log_snr(alphas_cumprod)
    for a, b in zip(ts, ts[1:]):
        if not lam[b - 1] - lam[a - 1] >= MIN_LAMBDA_GAP:
            raise ValueError(f"timesteps {a} and {b} of the {spacing or 'given'} spacing are one noise level "
                             f"(log-SNR {lam[a - 1]:.6g} vs {lam[b - 1]:.6g}); use fewer steps")


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


# --------------------------------------------------------------------------- solvers


def ddim(denoise: Denoise, schedule: Schedule, ts: list[int], x: torch.Tensor,
         generators: list[torch.Generator], solver: Solver) -> torch.Tensor:
    """DDIM (Song et al. 2021; cfg-math.md §5): x_t' = √ᾱ_t'·x̂0 + √(1−ᾱ_t'−σ²)·ε + σ·z."""
    shape = x.shape[1:]
    for t, (_, _, sa_p, dir_p, sigma) in zip(ts, ddim_coefficients(schedule, ts, solver.eta)):
        d = denoise(x, t)
        x = sa_p * d.x0 + dir_p * d.eps
        if sigma > 0:
            x = x + sigma * seeded_noise(generators, shape).to(x.device)
    return x


def dpm_solver_pp_2m(denoise: Denoise, schedule: Schedule, ts: list[int], x: torch.Tensor,
                     generators: list[torch.Generator], solver: Solver) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095) in data prediction.

    With α = √ᾱ, σ = √(1−ᾱ), λ = log(α/σ) and h = λ_next − λ_now, a step is
    x ← (σ_next/σ_now)·x − α_next·(e^{−h} − 1)·D, where D is the guided x̂0 (first
    order) or (1 + 1/(2r))·x̂0_now − 1/(2r)·x̂0_prev with r = h_prev/h (second order).
    The first step is first order (no history yet), and so is the last, which lands on
    x̂0 (σ = 0: "lower-order final", as diffusers' DPMSolverMultistepScheduler with
    lower_order_final=True, final_sigmas_type="zero").
    """
    ab = schedule.alphas_cumprod
    alpha = [math.sqrt(float(ab[t - 1])) for t in ts] + [1.0]
    sigma = [math.sqrt(1 - float(ab[t - 1])) for t in ts] + [0.0]
    # λ = ±∞ at the ends: σ = 0 after the last step, α = 0 at t = T with zero terminal SNR
    # (then h = ∞ and the first step lands on σ_next·x_T + α_next·x̂0: DDIM's step).
    lam = [math.log(a / s) if s > 0 and a > 0 else (math.inf if s == 0 else -math.inf)
           for a, s in zip(alpha, sigma)]
    n = len(ts)
    prev, h_prev = None, None
    for i, t in enumerate(ts):
        d0 = denoise(x, t).x0
        h = lam[i + 1] - lam[i]
        c = alpha[i + 1] * math.expm1(-h)  # α_next·(e^{−h} − 1); = −1 on the final step
        first = prev is None or i == n - 1
        x = (sigma[i + 1] / sigma[i]) * x - c * d0
        if not first:
            r = h_prev / h
            x = x - (0.5 * c / r) * (d0 - prev)
        prev, h_prev = d0, h
    return x


SOLVER_FNS: dict[str, Callable] = {"ddim": ddim, "dpm++2m": dpm_solver_pp_2m}


# ------------------------------------------------------------------------ entry point


@torch.inference_mode()
def sample(eps_fn: EpsFn, schedule: Schedule, cond: Cond, seeds: Sequence[int], shape: Sequence[int],
           plan: SamplingPlan, null_label: int | None = None, guides: Mapping[str, EpsFn] | None = None,
           device: str | torch.device = "cpu", progress: bool = False, uncond: Cond | None = None,
           no_image: tuple[Cond, Cond] | None = None) -> torch.Tensor:
    """Sample x_0 from x_T ~ N(0, I) as ``plan`` says.

    cond: each row's condition y, (B,) int64 class labels or a mapping of (B, …) tensors
    (cfgd.diffusion.conditions); seeds: B ints, one per sample; shape: (C, H, W); plan: B
    rows (cfgd.diffusion.plan). A row that uses ε_u evaluates it with ``uncond`` (∅ or a
    negative prompt per row; for labels, ``null_label`` gives it). ``guides`` maps each
    autoguidance row's ``guide`` to its network's eps_fn. ``no_image``: a model with an image
    condition, (y, ε_u's condition) with the image's ∅, for rows guiding both (GuidedDenoiser).
    Returns x_0: (B, C, H, W) float32 on ``device``.
    """
    B = cond_ops.rows(cond)
    if len(seeds) != B or len(plan) != B:
        raise ValueError(f"need one seed and one plan row per sample: {B} conditions, {len(seeds)} seeds, "
                         f"{len(plan)} plan rows")
    plan.check(schedule.T)
    device = torch.device(device)
    cond = cond_ops.to(cond, device)
    if uncond is None:
        uncond = null_label  # GuidedDenoiser turns a label batch's null label into its rows
    elif cond_ops.rows(uncond) != B:
        raise ValueError(f"need one unconditional condition per row: {B} rows, {cond_ops.rows(uncond)} given")
    else:
        uncond = cond_ops.to(uncond, device)
    if no_image is not None:
        no_image = (cond_ops.to(no_image[0], device), cond_ops.to(no_image[1], device))
    denoise = GuidedDenoiser(eps_fn, schedule, cond, plan, uncond, guides, no_image)
    ts = ddim_timesteps(schedule.T, plan.solver.steps, plan.solver.spacing, schedule.alphas_cumprod)
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    x = seeded_noise(generators, shape).to(device)
    if progress:
        bar = tqdm(total=len(ts), desc=plan.solver.name)
        inner = denoise

        def denoise(x, t):  # noqa: F811 - the same denoiser, ticking the bar
            out = inner(x, t)
            bar.update()
            return out
    try:
        return SOLVER_FNS[plan.solver.name](denoise, schedule, ts, x, generators, plan.solver)
    finally:
        if progress:
            bar.close()
