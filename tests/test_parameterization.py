"""Parameterisations (ε, v, x0), min-SNR loss weights and zero terminal SNR: the conversions
against closed forms, the sampler with analytic models in every parameterisation, tiny
networks trained on each, and checkpoints that record what their network predicts."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

from cfgd.config import Config, ConfigError, load_config, to_dict
from cfgd.diffusion.guidance import GuidedDenoiser
from cfgd.diffusion.plan import Guidance, SamplingPlan, Solver
from cfgd.diffusion.process import Predictor, as_eps_fn, loss_weights, make_schedule, q_sample, target, to_eps, to_x0, training_loss
from cfgd.diffusion.solvers import sample
from cfgd.io.checkpoint import CheckpointError, load_checkpoint, write_checkpoint
from cfgd.model.unet import ModelSpec, build_model
from cfgd.sampling.checkpoint_sampler import CPU_ROWS_PER_CALL, CheckpointSampler, eps_fn_of
from builders import digits_batch, tiny_net

NULL = 10
SHAPE = (1, 2, 2)
PARAMS = ("eps", "v", "x0")


def _sa(a, x):
    return a.sqrt().to(x.dtype).reshape(-1, *([1] * (x.dim() - 1))), \
        (1 - a).sqrt().to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


# ---------------------------------------------------------------- conversions


def test_conversions_match_the_closed_forms():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 1, 3, 3, generator=g, dtype=torch.float64)
    noise = torch.randn(6, 1, 3, 3, generator=g, dtype=torch.float64)
    a = torch.tensor([0.999, 0.9, 0.5, 0.1, 1e-4, 0.0], dtype=torch.float64)
    sa, s1a = _sa(a, x0)
    x_t = sa * x0 + s1a * noise
    v = sa * noise - s1a * x0  # Salimans & Ho 2022
    assert torch.equal(target("v", x0, noise, a), v)
    assert target("eps", x0, noise, a) is noise and target("x0", x0, noise, a) is x0
    # v → ε and v → x0 are exact everywhere, ᾱ = 0 included (no division).
    torch.testing.assert_close(to_eps(v, x_t, a, "v"), noise, rtol=0, atol=1e-12)
    torch.testing.assert_close(to_x0(v, x_t, a, "v"), x0, rtol=0, atol=1e-12)
    torch.testing.assert_close(to_x0(v, x_t, a, "v")[-1], -v[-1], rtol=0, atol=0)  # x0 = −v at ᾱ = 0
    torch.testing.assert_close(to_eps(v, x_t, a, "v")[-1], x_t[-1], rtol=0, atol=0)  # x_T = ε
    torch.testing.assert_close(to_eps(x0, x_t, a, "x0"), noise, rtol=0, atol=1e-9)
    assert to_x0(x0, x_t, a, "x0") is x0 and to_eps(noise, x_t, a, "eps") is noise
    # ε → x0 divides by √ᾱ: exact where ᾱ > 0.
    torch.testing.assert_close(to_x0(noise, x_t, a, "eps")[:-1], x0[:-1], rtol=0, atol=1e-9)


def test_eps_networks_are_passed_through_untouched_and_bad_names_are_refused():
    s = make_schedule("cosine", 100)
    net = lambda x, t, y: x  # noqa: E731
    assert as_eps_fn(net, s, "eps") is net  # the ε path is bit-identical by construction
    assert isinstance(as_eps_fn(net, s, "v"), Predictor)
    with pytest.raises(ValueError, match=r"'eps', 'v', 'x0'"):
        as_eps_fn(net, s, "score")
    with pytest.raises(ValueError, match=r"'uniform', 'min_snr'"):
        loss_weights(torch.tensor([0.5]), "v", "snr")


# ---------------------------------------------------------------- loss weights


@pytest.mark.parametrize("param", PARAMS)
def test_min_snr_weights_match_the_formula_at_chosen_t(param):
    s, gamma = make_schedule("cosine", 1000), 5.0
    ts = [1, 50, 200, 500, 900, 1000]
    got = loss_weights(s.alpha_bar(torch.tensor(ts)), param, "min_snr", gamma)
    for t, w in zip(ts, got.tolist()):
        ab = float(s.alphas_cumprod[t - 1])
        snr = ab / (1 - ab)
        want = {"eps": min(snr, gamma) / snr, "v": min(snr, gamma) / (snr + 1), "x0": min(snr, gamma)}[param]
        assert w == pytest.approx(want, rel=1e-12), (t, param)
    # High SNR (t = 1) is clipped at γ; low SNR keeps ε's weight at 1.
    if param == "eps":
        assert got[0] < 0.01 and got[-1] == pytest.approx(1.0)
    assert torch.equal(loss_weights(s.alpha_bar(torch.tensor(ts)), param, "uniform"), torch.ones(len(ts),
                                                                                                  dtype=torch.float64))


@pytest.mark.parametrize("param", ["v", "x0"])
def test_min_snr_offset_keeps_a_high_noise_weight_and_the_low_noise_cap(param):
    s, gamma = make_schedule("cosine", 1000), 5.0
    ts = [1, 50, 200, 500, 900, 1000]
    a = s.alpha_bar(torch.tensor(ts))
    for offset in (0.3, 1.0):
        got = loss_weights(a, param, "min_snr", gamma, offset)
        for t, w in zip(ts, got.tolist()):
            ab = float(s.alphas_cumprod[t - 1])
            snr = ab / (1 - ab)
            want = {"v": min(snr + offset, gamma) / (snr + 1), "x0": min(snr + offset, gamma)}[param]
            assert w == pytest.approx(want, rel=1e-12), (t, param, offset)
        # t = T: δ in x0 terms where plain min-SNR has ~0; t = 1: both capped at γ.
        lam_T = got[-1].item() * (1.0 if param == "x0" else 1 + float(a[-1] / (1 - a[-1])))
        assert lam_T == pytest.approx(offset, rel=1e-6)
        assert loss_weights(a, param, "min_snr", gamma)[-1].item() < 1e-6
        assert got[0].item() == pytest.approx(loss_weights(a, param, "min_snr", gamma)[0].item(), rel=1e-12)
    with pytest.raises(ValueError, match=r"min-SNR offset \(0.3\) needs parameterization v or x0"):
        loss_weights(a, "eps", "min_snr", gamma, 0.3)


def _replay(s, x0, seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(1, s.T + 1, (x0.shape[0],), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    return t, noise, q_sample(s, x0, t, noise)


def test_training_loss_eps_uniform_is_the_old_mse_bit_for_bit_and_min_snr_weights_per_sample():
    s = make_schedule("linear", 100)
    x0 = torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    y = torch.zeros(8, dtype=torch.long)
    net = lambda x, t, c: 0.3 * x + 0.01 * t[:, None, None, None]  # noqa: E731
    t, noise, x_t = _replay(s, x0, 0)
    old = torch.nn.functional.mse_loss(net(x_t, t, y).float(), noise.float())
    assert torch.equal(training_loss(net, s, x0, y, torch.Generator().manual_seed(0)), old)
    for param in PARAMS:
        got = training_loss(net, s, x0, y, torch.Generator().manual_seed(0), param, "min_snr", 2.0)
        a = s.alpha_bar(t)
        per = (net(x_t, t, y) - target(param, x0, noise, a)).pow(2).mean(dim=(1, 2, 3)).double()
        want = (loss_weights(a, param, "min_snr", 2.0) * per).mean()
        assert got.item() == pytest.approx(want.item(), rel=1e-5), param


# ---------------------------------------------------------------- zero terminal SNR


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_zero_terminal_snr_schedule(name):
    plain, zt = make_schedule(name, 1000), make_schedule(name, 1000, zero_terminal_snr=True)
    ab = zt.alphas_cumprod
    assert ab[-1] == 0.0 and np.all(ab[:-1] > 0)
    snr = ab / (1 - ab)
    assert np.all(np.diff(snr) < 0)
    assert ab[0] == pytest.approx(plain.alphas_cumprod[0], rel=1e-12)
    assert zt.betas[-1] == 1.0
    np.testing.assert_allclose(np.cumprod(1 - zt.betas), ab, rtol=1e-9, atol=1e-15)
    diffusers = pytest.importorskip("diffusers.schedulers.scheduling_ddim")
    ref = diffusers.rescale_zero_terminal_snr(torch.tensor(plain.betas, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(zt.betas, ref, rtol=1e-9, atol=1e-12)


def test_zero_terminal_snr_with_eps_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"diffusion\.zero_terminal_snr=True is not valid.*parameterization"):
        load_config(None, ["diffusion.zero_terminal_snr=true", "diffusion.parameterization=eps"])
    cfg = load_config(None, ["diffusion.zero_terminal_snr=true", "diffusion.parameterization=v",
                             "train.loss_weighting=min_snr"])
    assert cfg.diffusion.parameterization == "v" and cfg.train.min_snr_gamma == 5.0
    with pytest.raises(ConfigError, match=r"diffusion\.parameterization='score'.*\['eps', 'v', 'x0'\]"):
        load_config(None, ["diffusion.parameterization=score"])
    with pytest.raises(ConfigError, match=r"train\.min_snr_gamma=0\.0 is not valid; it must be > 0"):
        load_config(None, ["train.min_snr_gamma=0"])
    with pytest.raises(ConfigError, match=r"train\.loss_weighting"):
        load_config(None, ["train.loss_weighting=p2"])
    with pytest.raises(ConfigError, match=r"train\.min_snr_offset=1\.0 is not valid.*needs parameterization v or x0"):
        load_config(None, ["train.min_snr_offset=1", "diffusion.parameterization=eps"])
    with pytest.raises(ConfigError, match=r"train\.min_snr_offset=-0\.5 is not valid; it must be >= 0"):
        load_config(None, ["train.min_snr_offset=-0.5"])


# ---------------------------------------------------------------- analytic models


def gaussian_model(mu: float, std: float, schedule, param: str):
    """The exact predictor of ``param`` for data ~ N(mu, std²), in closed form (float64
    inside, no division by √ᾱ): x̂0 = E[x0 | x_t], ε̂ = E[ε | x_t], v̂ = √ᾱ·ε̂ − √(1−ᾱ)·x̂0."""

    def net(x, t, y):
        a = schedule.alpha_bar(t).reshape(-1, 1, 1, 1)
        xd = x.double()
        den = a * std**2 + 1 - a
        eps = (1 - a).sqrt() * (xd - a.sqrt() * mu) / den
        x0 = mu + a.sqrt() * std**2 * (xd - a.sqrt() * mu) / den
        out = {"eps": eps, "x0": x0, "v": a.sqrt() * eps - (1 - a).sqrt() * x0}[param]
        return out.to(x.dtype)

    return net


def labelled(schedule, param):
    """Class rows ~ N(0.6 + 0.01·y, 0.4²), the null row ~ N(0, 1): CFG has something to do."""
    uncond = gaussian_model(0.0, 1.0, schedule, param)
    conds = [gaussian_model(0.6 + 0.01 * c, 0.4, schedule, param) for c in range(3)]

    def net(x, t, y):
        out = uncond(x, t, y)
        for c, f in enumerate(conds):
            out = torch.where((y == c)[:, None, None, None], f(x, t, y), out)
        return out

    return net


ROWS = (Guidance(w=0.0, clip=False), Guidance(w=2.0, clip=False), Guidance(w=3.0),
        Guidance(rule="cfg++", lam=0.6, clip=False), Guidance(rule="apg", w=2.0, apg_beta=-0.5, apg_r=5.0),
        Guidance(rule="cfg_zero_star", w=1.5, clip=False), Guidance(w=2.0, rescale=0.7, clip=False))


def _run(schedule, param, solver, spacing="trailing", steps=10):
    rows = tuple(r for r in ROWS if solver == "ddim" or r.rule != "cfg++")  # CFG++ is DDIM's only
    plan = SamplingPlan(solver=Solver(name=solver, steps=steps, spacing=spacing), rows=rows)
    labels = torch.arange(len(rows)) % 3
    net = as_eps_fn(labelled(schedule, param), schedule, param)
    return sample(net, schedule, labels, list(range(len(rows))), SHAPE, plan, null_label=NULL)


@pytest.mark.parametrize("solver", ["ddim", "dpm++2m"])
def test_every_parameterisation_gives_the_same_samples_with_an_analytic_model(solver):
    s = make_schedule("linear", 1000)
    ref = _run(s, "eps", solver)
    # float32: the ε path's first x̂0 divides by √ᾱ_T (6e-3), scaling rounding by as much.
    tol = 1e-5 + 8 * torch.finfo(torch.float32).eps / math.sqrt(s.alphas_cumprod[-1])
    for param in ("v", "x0"):
        got = _run(s, param, solver)
        assert (got - ref).abs().max().item() < tol, (param, (got - ref).abs().max().item(), tol)
    assert not torch.allclose(ref[0], ref[1], atol=1e-3)  # guidance changed the rows


@pytest.mark.parametrize("solver,spacing", [("ddim", "trailing"), ("ddim", "linspace"), ("dpm++2m", "trailing"),
                                            ("dpm++2m", "logsnr")])
def test_zero_terminal_snr_trajectory_is_finite_in_float32_and_v_equals_x0(solver, spacing):
    s = make_schedule("cosine", 1000, zero_terminal_snr=True)
    v = _run(s, "v", solver, spacing)
    x0 = _run(s, "x0", solver, spacing)
    assert v.dtype == torch.float32 and torch.isfinite(v).all() and torch.isfinite(x0).all()
    assert (v - x0).abs().max().item() < 1e-4
    with pytest.raises(ValueError, match="ε-prediction.*v or x0"):
        _run(s, "eps", solver, spacing)


def test_terminal_step_guides_the_networks_x0_and_renoises_with_x_t():
    s = make_schedule("cosine", 100, zero_terminal_snr=True)
    net = labelled(s, "v")
    labels, x = torch.tensor([0, 1, 2]), torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(0))
    plan = SamplingPlan(solver=Solver(steps=5), rows=(Guidance(w=0.0, clip=False), Guidance(w=2.0, clip=False),
                                                      Guidance(w=4.0)))
    d = GuidedDenoiser(as_eps_fn(net, s, "v"), s, labels, plan, NULL)(x, 100)
    tt = torch.full((3,), 100)
    x0_c, x0_u = -net(x, tt, labels), -net(x, tt, torch.full_like(labels, NULL))  # x0 = −v at ᾱ = 0
    w = torch.tensor([0.0, 2.0, 4.0]).reshape(-1, 1, 1, 1)
    want = x0_c + w * (x0_c - x0_u)
    torch.testing.assert_close(d.x0[:2], want[:2], rtol=0, atol=1e-6)
    torch.testing.assert_close(d.x0[2], want[2].clamp(-1, 1), rtol=0, atol=1e-6)
    assert torch.equal(d.eps, x)


def test_zero_terminal_snr_sampling_recovers_gaussian_data():
    s = make_schedule("cosine", 1000, zero_terminal_snr=True)
    mu, std, B = 0.5, 0.3, 2000
    net = as_eps_fn(gaussian_model(mu, std, s, "v"), s, "v")
    # 200 steps: DDIM's discretisation bias on the std is < 2% there (as with ᾱ_T > 0).
    plan = SamplingPlan(solver=Solver(steps=200, spacing="trailing"), rows=(Guidance(w=0.0, clip=False),) * B)
    x = sample(net, s, torch.zeros(B, dtype=torch.long), list(range(B)), SHAPE, plan, null_label=NULL)
    assert torch.isfinite(x).all()
    assert x.mean().item() == pytest.approx(mu, abs=0.01)
    assert x.std().item() == pytest.approx(std, rel=0.03)


# ---------------------------------------------------------------- tiny networks


# ε with uniform weights: tests/test_model_checkpoint.py::test_tiny_model_overfits_one_batch.
@pytest.mark.parametrize("param,weighting,zts,offset", [("eps", "min_snr", False, 0.0), ("v", "min_snr", True, 0.0),
                                                        ("x0", "min_snr", False, 0.0), ("v", "min_snr", False, 1.0)])
def test_tiny_model_overfits_one_batch(param, weighting, zts, offset):
    torch.manual_seed(0)
    x0, y = digits_batch(16)
    model = build_model(ModelSpec("tiny", 8, 1, 10))
    s = make_schedule("cosine", 100, zero_terminal_snr=zts)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):  # the same t and noise every step: one batch
        loss = training_loss(model, s, x0, y, torch.Generator().manual_seed(0), param, weighting, offset=offset)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], (losses[0], losses[-1])


@pytest.fixture(scope="module")
def tiny():
    return tiny_net(0)


def _save(tmp_path, model, config):
    return write_checkpoint(tmp_path / "ckpt", model_state=model.state_dict(), ema_state=model.state_dict(),
                            optimizer_state=None, spec=model.spec, label_names=[str(i) for i in range(10)],
                            step=3, epoch=0, config=config)


@pytest.mark.parametrize("param,zts", [("v", True), ("x0", False), ("eps", False)])
def test_checkpoint_records_the_parameterisation_and_reproduces_samples(tmp_path, tiny, param, zts):
    cfg = load_config(None, [f"diffusion.parameterization={param}", f"diffusion.zero_terminal_snr={zts}"])
    path = _save(tmp_path, tiny, to_dict(cfg))
    meta = json.loads((path / "meta.json").read_text())
    assert meta["config"]["diffusion"]["parameterization"] == param
    gen = CheckpointSampler.load(path)
    assert gen.checkpoint.parameterization == param and gen.checkpoint.zero_terminal_snr is zts
    assert bool(gen.schedule().alphas_cumprod[-1] == 0.0) is zts
    plan = SamplingPlan(solver=Solver(steps=8), rows=(Guidance(w=0.0), Guidance(w=2.0), Guidance(rule="apg", w=2.0)))
    a = gen.sample([1, 2, 3], [5, 6, 7], plan)
    assert torch.isfinite(a).all()
    same = copy.deepcopy(tiny).to(memory_format=torch.channels_last)
    b = CheckpointSampler(gen.checkpoint, same, torch.device("cpu"), CPU_ROWS_PER_CALL, True).sample([1, 2, 3], [5, 6, 7],
                                                                                               plan)
    assert torch.equal(a, b)
    # The same network behind the seam by hand: the conversion is the only difference.
    s = make_schedule("cosine", 1000, zero_terminal_snr=zts)
    direct = sample(as_eps_fn(eps_fn_of(tiny), s, param), s, torch.tensor([1, 2, 3]), [5, 6, 7], (1, 8, 8), plan,
                    null_label=NULL)
    torch.testing.assert_close(a, direct, rtol=0, atol=1e-4)
    if param != "eps":  # read as ε, the same weights give other images
        as_eps = sample(eps_fn_of(tiny), make_schedule("cosine", 1000), torch.tensor([1, 2, 3]), [5, 6, 7],
                        (1, 8, 8), plan, null_label=NULL)
        assert (as_eps - a).abs().max().item() > 0.05


def test_old_checkpoints_default_to_eps_and_bad_values_are_refused(tmp_path, tiny):
    config = to_dict(Config())
    for key in ("parameterization", "zero_terminal_snr"):
        del config["diffusion"][key]
    path = _save(tmp_path, tiny, config)
    ck = load_checkpoint(path)
    assert ck.parameterization == "eps" and ck.zero_terminal_snr is False
    ck.meta["config"]["diffusion"]["parameterization"] = "score"
    with pytest.raises(CheckpointError, match=r"parameterization 'score', expected one of \['eps', 'v', 'x0'\]"):
        ck.parameterization  # noqa: B018
    ck.meta["config"]["diffusion"].update(parameterization="eps", zero_terminal_snr=True)
    with pytest.raises(CheckpointError, match="zero_terminal_snr=True"):
        ck.schedule()
