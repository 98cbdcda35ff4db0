"""Every formula of docs/cfg-math.md, pinned against closed forms."""

import math

import numpy as np
import pytest
import torch

from cfgd.diffusion.process import drop_labels, make_schedule, q_sample, training_loss
from pydantic import ValidationError

from cfgd.diffusion.guidance import GuidedDenoiser, combine
from cfgd.diffusion.plan import Guidance, SamplingPlan, Solver
from cfgd.diffusion.solvers import ddim_coefficients, ddim_timesteps, sample
from builders import gaussian_eps
from cfgd.spec import null_label


def ddim_sample(eps_fn, schedule, labels, seeds, shape, steps=50, eta=0.0, spacing="trailing", w=0.0,
                null_label=None, interval=None, rescale=0.0, clip=False):
    """DDIM through the sampling plan: per-row w (a number or one per row), no clipping by default."""
    B = labels.shape[0]
    ws = [float(v) for v in (w.tolist() if torch.is_tensor(w) else w if isinstance(w, (list, tuple)) else [w] * B)]
    rows = tuple(Guidance(w=v, interval=interval, rescale=rescale, clip=clip) for v in ws)
    plan = SamplingPlan(solver=Solver(name="ddim", steps=steps, eta=eta, spacing=spacing), rows=rows)
    return sample(eps_fn, schedule, labels, seeds, shape, plan, null_label=null_label)


def guided_eps(f, schedule, y, w, null, x, t):
    """ε̂ of GuidedDenoiser at one timestep (no clipping, so ε̂ is what re-noises)."""
    plan = SamplingPlan(rows=tuple(Guidance(w=float(v), clip=False) for v in w))
    return GuidedDenoiser(f, schedule, y, plan, null)(x, t).eps


# §1 schedules -----------------------------------------------------------------

@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("T", [1000, 50])
def test_schedule_inside_unit_interval_and_decreasing(name, T):
    s = make_schedule(name, T)
    ab = s.alphas_cumprod
    assert ab.dtype == np.float64 and ab.shape == (T,)
    assert np.all(ab > 0) and np.all(ab < 1)
    assert np.all(np.diff(ab) < 0), "ᾱ_t must fall strictly with t"
    assert ab[0] > 0.98 and ab[-1] < 0.01  # nearly clean at t = 1, nearly pure noise at t = T


def test_linear_schedule_endpoints_match_ho_et_al():
    s = make_schedule("linear", 1000)
    assert s.betas[0] == pytest.approx(1e-4) and s.betas[-1] == pytest.approx(0.02)
    assert np.allclose(s.alphas_cumprod, np.cumprod(1 - s.betas))


def test_cosine_schedule_follows_its_closed_form():
    T, s_ = 1000, 0.008
    f = lambda t: math.cos((t / T + s_) / (1 + s_) * math.pi / 2) ** 2  # noqa: E731
    ab = make_schedule("cosine", T).alphas_cumprod
    for t in (1, 10, 250, 500, 900):
        assert ab[t - 1] == pytest.approx(f(t) / f(0), rel=1e-9)


def test_unknown_schedule_names_the_valid_ones():
    with pytest.raises(ValueError, match="cosine"):
        make_schedule("quadratic")


def test_q_sample_moments():
    s = make_schedule("cosine", 1000)
    g = torch.Generator().manual_seed(0)
    n, t_val, x0_val = 200_000, 300, 0.7
    x0 = torch.full((n, 1), x0_val, dtype=torch.float64)
    t = torch.full((n,), t_val)
    xt = q_sample(s, x0, t, torch.randn(n, 1, generator=g, dtype=torch.float64))
    a = s.alphas_cumprod[t_val - 1]
    # 5 standard errors of the mean / of the variance
    assert xt.mean().item() == pytest.approx(math.sqrt(a) * x0_val, abs=5 * math.sqrt((1 - a) / n))
    assert xt.var().item() == pytest.approx(1 - a, abs=5 * (1 - a) * math.sqrt(2 / n))


# §3 guidance ---------------------------------------------------------------------

def _eps_pair(B=4, shape=(1, 4, 4)):
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, *shape, generator=g), torch.randn(B, *shape, generator=g)


def test_w_zero_gives_conditional_and_minus_one_gives_unconditional():
    ec, eu = _eps_pair()
    assert torch.equal(combine(ec, eu, torch.zeros(4)), ec)
    assert torch.allclose(combine(ec, eu, -torch.ones(4)), eu)


def test_paper_form_equals_guidance_scale_form():
    ec, eu = _eps_pair()
    w = torch.tensor([0.3, 1.0, 2.5, 4.0])
    s = 1 + w
    paper = combine(ec, eu, torch.tensor([Guidance(w=float(v)).w for v in w]))
    hf = combine(ec, eu, torch.tensor([Guidance(guidance_scale=float(v)).w for v in s]))
    expected = (1 - s)[:, None, None, None] * eu + s[:, None, None, None] * ec
    assert torch.allclose(paper, expected, atol=1e-6) and torch.allclose(hf, expected, atol=1e-6)


def test_w_and_guidance_scale_together_is_an_error():
    with pytest.raises(ValidationError, match="not both"):
        Guidance(w=1.0, guidance_scale=2.0)


def test_non_finite_w_is_refused():
    for bad in (float("nan"), float("inf"), 1e300):
        with pytest.raises(ValidationError, match="w"):
            Guidance(w=bad)


def test_rescale_matches_conditional_std():
    ec, eu = _eps_pair()
    w = torch.full((4,), 3.0)
    out = combine(ec, eu, w, rescale=1.0)
    assert torch.allclose(out.std(dim=(1, 2, 3)), ec.std(dim=(1, 2, 3)), rtol=1e-5)
    half = combine(ec, eu, w, rescale=0.5)
    assert torch.allclose(half, 0.5 * out + 0.5 * combine(ec, eu, w), atol=1e-6)


class CountingEps:
    """A deterministic, label-dependent stand-in for a network that counts rows and calls."""

    def __init__(self):
        self.rows, self.calls = 0, 0

    def __call__(self, x, t, y):
        self.rows += x.shape[0]
        self.calls += 1
        return 0.3 * x + 0.01 * t.to(x.dtype)[:, None, None, None] / 1000 + 0.1 * (y.to(x.dtype) - 2)[:, None, None, None]


def test_batched_2b_forward_equals_two_separate_calls():
    f = CountingEps()
    x = torch.randn(5, 1, 4, 4)
    t = torch.full((5,), 500)
    y = torch.tensor([0, 1, 2, 3, 1])
    w = torch.tensor([1.0, 2.0, 0.5, 3.0, 4.0], dtype=torch.float64)
    guided = guided_eps(f, make_schedule("linear", 1000), y, w, 10, x, 500)
    assert f.calls == 1 and f.rows == 10  # one forward of 2B rows
    ec, eu = f(x, t, y), f(x, t, torch.full_like(y, 10))
    assert torch.allclose(guided, combine(ec, eu, w), atol=1e-6)


def test_rows_that_need_one_half_pay_for_one_half():
    f = CountingEps()
    x = torch.randn(4, 1, 4, 4)
    t = torch.full((4,), 500)
    y = torch.tensor([0, 1, 2, 3])
    w = torch.tensor([0.0, -1.0, 2.0, 0.0], dtype=torch.float64)
    s = make_schedule("linear", 1000)
    out = guided_eps(f, s, y, w, 10, x, 500)
    assert f.calls == 1 and f.rows == 5  # cond for rows 0, 2, 3; uncond for rows 1, 2
    ec, eu = f(x, t, y), f(x, t, torch.full_like(y, 10))
    assert torch.allclose(out[[0, 3]], ec[[0, 3]], atol=1e-6)
    assert torch.allclose(out[1], eu[1], atol=1e-6)
    assert torch.allclose(out[2], 3 * ec[2] - 2 * eu[2], atol=1e-6)
    f2 = CountingEps()
    guided_eps(f2, s, y, torch.zeros(4, dtype=torch.float64), 10, x, 500)
    assert f2.rows == 4  # w = 0 everywhere: the conditional half only


def test_condition_dropout_rate_matches_p_uncond():
    # n = 200k draws: the binomial standard error is sqrt(p(1-p)/n) ≈ 6.7e-4; allow 5 of them.
    n, p = 200_000, 0.1
    y = torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(0))
    dropped = drop_labels(y, p, null_label(10), torch.Generator().manual_seed(1))
    rate = (dropped == 10).double().mean().item()
    assert abs(rate - p) < 5 * math.sqrt(p * (1 - p) / n)
    assert torch.equal(dropped[dropped != 10], y[dropped != 10])
    assert torch.equal(drop_labels(y, 0.0, 10), y)


def test_training_loss_is_mse_of_the_noise():
    s = make_schedule("linear", 100)
    x0 = torch.randn(8, 1, 4, 4)
    y = torch.zeros(8, dtype=torch.long)
    zero = training_loss(lambda x, t, c: torch.zeros_like(x), s, x0, y, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    torch.randint(1, 101, (8,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    assert zero.item() == pytest.approx(noise.pow(2).mean().item(), rel=1e-6)


# §5 DDIM -------------------------------------------------------------------------

@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 7, 50, 1000])
def test_timesteps_are_strided_decreasing_and_in_range(spacing, steps):
    ts = ddim_timesteps(1000, steps, spacing)
    assert len(ts) == steps and all(1 <= t <= 1000 for t in ts)
    assert all(a > b for a, b in zip(ts, ts[1:]))
    if spacing != "leading":
        assert ts[0] == 1000


def test_timestep_spacings_match_their_definitions():
    assert ddim_timesteps(1000, 4, "leading") == [751, 501, 251, 1]
    assert ddim_timesteps(1000, 4, "trailing") == [1000, 750, 500, 250]
    assert ddim_timesteps(1000, 4, "linspace") == [1000, 667, 334, 1]
    with pytest.raises(ValueError, match="steps"):
        ddim_timesteps(10, 11)
    with pytest.raises(ValueError, match="trailing"):
        ddim_timesteps(10, 5, "cubic")


def test_ddim_sigma_is_zero_at_eta_zero_and_ddpm_at_eta_one():
    s = make_schedule("linear", 1000)
    ts = ddim_timesteps(1000, 1000, "trailing")
    assert all(c[4] == 0 for c in ddim_coefficients(s, ts, 0.0))
    coefs = ddim_coefficients(s, ts, 1.0)
    # η = 1 with every timestep: σ_t² equals the DDPM posterior variance β̃_t.
    t = 500
    ab_t, ab_p = s.alphas_cumprod[t - 1], s.alphas_cumprod[t - 2]
    beta_tilde = (1 - ab_p) / (1 - ab_t) * s.betas[t - 1]
    assert coefs[1000 - t][4] ** 2 == pytest.approx(beta_tilde, rel=1e-9)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_ddim_eta0_recovers_gaussian_data_mean_and_std(name):
    s = make_schedule(name, 1000)
    mu, std = 0.5, 0.3
    B = 4000
    x = ddim_sample(gaussian_eps(mu, std, s), s, torch.zeros(B, dtype=torch.long), list(range(B)), (1, 2, 2),
                    steps=200, eta=0.0)
    # 4·B·... samples: standard errors ≈ std/sqrt(16000) ≈ 0.0024 for the mean
    assert x.mean().item() == pytest.approx(mu, abs=0.01)
    assert x.std().item() == pytest.approx(std, rel=0.03)


def test_ddim_eta1_with_every_step_is_ddpm_and_recovers_gaussian_data():
    # Stochastic sampling with large strides is biased (std ≈ 0.44 at 50 steps), so use all T steps.
    s = make_schedule("linear", 1000)
    B = 256
    x = ddim_sample(gaussian_eps(-0.2, 0.5, s), s, torch.zeros(B, dtype=torch.long), list(range(B)), (1, 4, 4),
                    steps=1000, eta=1.0)
    assert x.mean().item() == pytest.approx(-0.2, abs=0.015)
    assert x.std().item() == pytest.approx(0.5, rel=0.03)


def test_guidance_sharpens_toward_the_condition():
    """ε_c for N(1, 0.5²), ε_u for N(0, 1). w = 0 samples the condition; w = 2 tilts toward
    p(x|y)³/p(x)² = N(1.2, 0.316²): the mean moves past the class mean and the spread shrinks."""
    s = make_schedule("cosine", 1000)
    cond, uncond = gaussian_eps(1.0, 0.5, s), gaussian_eps(0.0, 1.0, s)

    def eps(x, t, y):
        return torch.where((y == 1)[:, None, None, None], cond(x, t, y), uncond(x, t, y))

    B = 256
    labels = torch.ones(B, dtype=torch.long)
    plain, guided = (ddim_sample(eps, s, labels, list(range(B)), (1, 4, 4), steps=100, w=w, null_label=2)
                     for w in (0.0, 2.0))
    assert plain.mean().item() == pytest.approx(1.0, abs=0.03)
    assert plain.std().item() == pytest.approx(0.5, rel=0.05)
    assert guided.mean().item() > 1.1
    assert guided.std().item() < 0.4


def test_guidance_interval_skips_exactly_the_expected_evaluations():
    s = make_schedule("linear", 1000)
    f = CountingEps()
    B, steps = 6, 20
    ts = ddim_timesteps(1000, steps, "trailing")
    lo, hi = 300, 700
    inside = sum(lo <= t <= hi for t in ts)
    ddim_sample(f, s, torch.zeros(B, dtype=torch.long), list(range(B)), (1, 4, 4), steps=steps, w=2.0,
                null_label=10, interval=(lo, hi))
    assert f.calls == steps
    assert f.rows == B * steps + B * inside  # the unconditional half only inside [lo, hi]
    assert 0 < inside < steps


def test_per_sample_w_equals_separate_runs_row_by_row():
    s = make_schedule("cosine", 1000)
    f = CountingEps()
    labels = torch.tensor([0, 1, 2, 3, 4, 1])
    ws = [0.0, -1.0, 0.5, 2.0, 4.0, 1.0]
    seeds = [11, 12, 13, 14, 15, 16]
    mixed = ddim_sample(f, s, labels, seeds, (1, 4, 4), steps=10, eta=0.5, w=torch.tensor(ws), null_label=10)
    for i in range(6):
        alone = ddim_sample(f, s, labels[i:i + 1], seeds[i:i + 1], (1, 4, 4), steps=10, eta=0.5, w=ws[i],
                            null_label=10)
        assert torch.allclose(mixed[i], alone[0], atol=1e-5), i


def test_seed_fixes_the_sample():
    s = make_schedule("cosine", 100)
    f = CountingEps()
    a = ddim_sample(f, s, torch.tensor([1, 2]), [5, 6], (1, 3, 3), steps=5, eta=1.0, w=1.0, null_label=10)
    b = ddim_sample(f, s, torch.tensor([1, 2]), [5, 6], (1, 3, 3), steps=5, eta=1.0, w=1.0, null_label=10)
    c = ddim_sample(f, s, torch.tensor([1, 2]), [5, 7], (1, 3, 3), steps=5, eta=1.0, w=1.0, null_label=10)
    assert torch.equal(a, b) and torch.equal(a[0], c[0]) and not torch.equal(a[1], c[1])


def test_guidance_without_null_label_is_an_error():
    s = make_schedule("cosine", 100)
    with pytest.raises(ValueError, match="null label"):
        ddim_sample(CountingEps(), s, torch.tensor([1]), [0], (1, 2, 2), steps=2, w=1.0)
