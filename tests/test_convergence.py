"""Convergence order of the solvers on data whose probability-flow ODE has a closed form.

Data x_0 ~ N(μ, diag(s²)) (docs/cfg-math.md, "A closed-form probability-flow ODE"): the
exact ε-predictor is E[ε | x_t] = σ_t·(x_t − α_t μ)/(α_t² s² + σ_t²), and the ODE keeps
z = (x_t − α_t μ)/√(α_t² s² + σ_t²) fixed, so the exact x_0 of a start x_T is μ + s·z_T.
A first-order solver's error halves per doubling of steps, a second-order one's quarters.
"""

import math

import numpy as np
import pytest
import torch

from cfgd.diffusion.plan import DEFAULT_SPACING, Guidance, SamplingPlan, Solver
from cfgd.diffusion.process import make_schedule
from cfgd.diffusion.solvers import LAMBDA_MIN, check_timesteps, ddim_timesteps, log_snr, sample

SHAPE = (1, 4, 4)
MU = torch.linspace(-0.5, 0.5, 16, dtype=torch.float64).reshape(SHAPE)
SD = torch.logspace(math.log10(0.05), 0, 16, dtype=torch.float64).reshape(SHAPE)  # 0.05 … 1: sharp and broad
B = 32


def solver_error(schedule_name: str, solver: str, steps: int, spacing: str | None = None) -> float:
    """RMS distance of the solver's x_0 from the exact ODE solution, same x_T."""
    s = make_schedule(schedule_name, 1000)
    ab = torch.tensor(s.alphas_cumprod, dtype=torch.float64)

    def eps(x, t, y):  # exact, in float64 (only the solver's own arithmetic is float32)
        a = ab[t - 1][:, None, None, None]
        return ((1 - a).sqrt() * (x.double() - a.sqrt() * MU) / (a * SD**2 + 1 - a)).float()

    plan = SamplingPlan(solver=Solver(name=solver, steps=steps, spacing=spacing),
                        rows=(Guidance(w=0.0, clip=False),) * B)
    x0 = sample(eps, s, torch.zeros(B, dtype=torch.long), list(range(B)), SHAPE, plan, null_label=1).double()
    x_T = torch.stack([torch.randn(SHAPE, generator=torch.Generator().manual_seed(i)) for i in range(B)]).double()
    a_T = ab[-1]
    exact = MU + SD * (x_T - a_T.sqrt() * MU) / (a_T * SD**2 + 1 - a_T).sqrt()
    return (x0 - exact).pow(2).mean().sqrt().item()


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
@pytest.mark.parametrize("solver,order", [("ddim", 1), ("dpm++2m", 2)])
def test_default_spacing_converges_at_the_solvers_order(schedule, solver, order):
    errors = [solver_error(schedule, solver, n) for n in (5, 10, 20, 40)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors  # more steps never hurt
    ratio_10_20, ratio_20_40 = errors[1] / errors[2], errors[2] / errors[3]
    if order == 1:
        assert 1.7 < ratio_10_20 < 2.3 and 1.8 < ratio_20_40 < 2.2, errors
    else:
        # 10 → 20 is still pre-asymptotic (the first and the final step are first order):
        # measured 2.75 on both schedules; 20 → 40 is 3.95 (cosine) and 4.08 (linear).
        assert ratio_10_20 > 2.5 and 3.5 < ratio_20_40 < 4.6, errors


def test_the_old_logsnr_grid_lost_steps_in_the_cosine_plunge():
    """The λ-uniform grid of λ_T..λ_1 put 8 of 20 steps in t ∈ [992, 1000]; the clamped
    one puts exactly one step (t = T) below λ = LAMBDA_MIN."""
    ab = make_schedule("cosine", 1000).alphas_cumprod
    lam = log_snr(ab)
    for steps in (5, 10, 20, 50, 100):
        ts = ddim_timesteps(1000, steps, "logsnr", ab)
        assert ts[0] == 1000 and ts[-1] == 1
        assert sum(lam[t - 1] < LAMBDA_MIN - 0.05 for t in ts) == 1, ts
    assert DEFAULT_SPACING["dpm++2m"] == "logsnr"


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace", "logsnr"])
def test_every_grid_has_distinct_noise_levels(schedule, spacing):
    ab = make_schedule(schedule, 1000).alphas_cumprod
    for steps in (1, 7, 20, 333, 1000):
        ts = ddim_timesteps(1000, steps, spacing, ab)  # checked inside; this re-checks
        check_timesteps(ts, ab)
        assert len(ts) == steps and np.all(np.diff(ts) < 0)


def test_a_grid_with_one_noise_level_twice_is_refused():
    ab = np.array([0.999, 0.9, 0.5, 0.5, 0.1])  # t = 3 and t = 4: the same ᾱ
    with pytest.raises(ValueError, match="timesteps 4 and 3 .* one noise level"):
        check_timesteps([5, 4, 3, 1], ab, "trailing")
    check_timesteps([5, 4, 2, 1], ab)
