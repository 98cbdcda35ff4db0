"""Image conditions and guidance over two conditions (issue 25): the transforms, the
model's image input and dropout, the sequential (InstructPix2Pix) and independent
(Composable Diffusion) rules against their formulas per row, mixed in one batch with plain
rows, their reduction identities and their cost in network rows."""

import numpy as np
import pytest
import torch

from cfgd.data.image_condition import low_res, make_cond_images, masked
from cfgd.data.images import encode_png, PNG_MODES
from cfgd.diffusion.guidance import GuidedDenoiser, plan_cost
from cfgd.diffusion.plan import Condition, Guidance, PlanError, SamplingPlan, Solver
from cfgd.diffusion.process import make_schedule
from cfgd.model.conditioning import drop_conditions, image_input
from cfgd.model.unet import build_model
from cfgd.spec import ModelSpec

T = 100


def test_low_res_is_the_block_mean_and_masked_keeps_one_half_with_its_mask():
    img = np.arange(2 * 8 * 8, dtype=np.uint8).reshape(2, 8, 8, 1)
    small = low_res(img, 4)
    assert small.shape == (2, 2, 2, 1) and small[0, 0, 0, 0] == round(img[0, :4, :4, 0].mean())
    m = masked(img, "top")
    assert m.shape == (2, 8, 8, 2) and (m[:, :4, :, 0] == img[:, :4, :, 0]).all() and (m[:, 4:, :, 0] == 0).all()
    assert (m[:, :4, :, 1] == 255).all() and (m[:, 4:, :, 1] == 0).all()
    out, desc = make_cond_images(img, "low_res", factor=2)
    assert desc == {"transform": "low_res", "factor": 2, "height": 4, "width": 4, "channels": 1}
    for bad in [dict(transform="blur"), dict(transform="low_res", factor=3), dict(transform="masked", keep="middle")]:
        with pytest.raises(ValueError, match="valid|divide"):
            make_cond_images(img, **bad)


def test_the_image_enters_resized_with_a_presence_channel_and_dropout_is_three_exclusive_events():
    img = torch.rand(3, 1, 2, 2) * 2 - 1
    x = image_input(img, torch.tensor([False, True, False]), (8, 8))
    assert x.shape == (3, 2, 8, 8) and (x[1] == 0).all() and (x[0, 1] == 1).all()
    spec = ModelSpec("tiny", 8, 1, 10, cond_channels=1, cond_height=2, cond_width=2)
    n = 40_000
    y = {"y": torch.zeros(n, dtype=torch.long), "image": torch.zeros(n, 1, 2, 2),
         "image_null": torch.zeros(n, dtype=torch.bool)}
    d = drop_conditions(y, 0.1, spec, torch.Generator().manual_seed(0), p_image=0.05, p_both=0.2)
    lab, im = d["y"] == spec.null_label, d["image_null"]
    rates = [float(v.float().mean()) for v in (lab & im, lab & ~im, ~lab & im)]
    assert rates == pytest.approx([0.2, 0.1, 0.05], abs=0.01)
    net = build_model(spec).eval()
    out = net(torch.randn(3, 1, 8, 8), torch.full((3,), 10), {"y": torch.arange(3), "image": img,
                                                              "image_null": torch.tensor([False, True, False])})
    assert out.shape == (3, 1, 8, 8)


# -- the rules against their formulas, with an analytic ε over condition values ----------

U = [torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(i)) for i in range(3)]


def analytic_eps(x, t, c):
    """ε(x, t, (y, I)) = 0.1·x + y·u0 + I·u1 + y·I·u2: y and I interact, so the rules differ."""
    y, i = c["y"].reshape(-1, 1, 1, 1), c["img"].reshape(-1, 1, 1, 1)
    return 0.1 * x + y * U[0] + i * U[1] + y * i * U[2]


def _conds(yv, iv):
    z = torch.zeros_like(yv)
    return {"y": yv, "img": iv}, {"y": z, "img": iv}, ({"y": yv, "img": z}, {"y": z, "img": z})


def test_sequential_and_independent_rows_match_their_formulas_mixed_with_plain_rows():
    schedule = make_schedule("cosine", T)
    rows = (Guidance(w=2.0, clip=False), Guidance(w=2.0, image_scale=1.5, clip=False),
            Guidance(w=1.0, image_scale=3.0, combine="independent", clip=False),
            Guidance(w=0.0, image_scale=0.0, clip=False), Guidance(w=2.0, image_scale=3.0, clip=False))
    yv, iv = torch.tensor([1.0, 2.0, -1.0, 0.5, 1.5]), torch.tensor([0.5, 1.0, 2.0, -1.0, 0.7])
    cond, uncond, no_image = _conds(yv, iv)
    plan = SamplingPlan(solver=Solver(steps=10), rows=rows)
    den = GuidedDenoiser(analytic_eps, schedule, cond, plan, uncond, no_image=no_image)
    x, t = torch.randn(5, 1, 4, 4), 60
    got = den(x, t).eps

    def e(y, i):
        return analytic_eps(x, t, {"y": y, "img": i})

    z = torch.zeros(5)
    e11, e10, e01, e00 = e(yv, iv), e(z, iv), e(yv, z), e(z, z)
    s = torch.tensor([3.0, 3.0, 2.0, 1.0, 3.0]).reshape(-1, 1, 1, 1)
    s_i = torch.tensor([1.0, 1.5, 3.0, 0.0, 3.0]).reshape(-1, 1, 1, 1)
    want = e00 + s_i * (e10 - e00) + s * (e11 - e10)  # sequential (InstructPix2Pix), image first
    want[2] = (e00 + s_i * (e10 - e00) + s * (e01 - e00))[2]  # independent (Composable Diffusion)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # Row 0 (s_I = 1) is plain CFG between ε(I,y) and ε(I,∅).
    torch.testing.assert_close(got[0], (e10 + 3 * (e11 - e10))[0], rtol=1e-5, atol=1e-5)
    # s = 0 (w = −1) drops y's term: CFG on the image alone, y at ∅, at two network rows.
    drop_y = SamplingPlan(solver=Solver(steps=10), rows=(Guidance(w=-1.0, image_scale=2.5, clip=False),))
    c1, u1, n1 = _conds(yv[:1], iv[:1])
    one = GuidedDenoiser(analytic_eps, schedule, c1, drop_y, u1, no_image=n1)
    torch.testing.assert_close(one(x[:1], t).eps, (e00 + 2.5 * (e10 - e00))[:1], rtol=1e-5, atol=1e-5)
    assert one.rows_evaluated == 2
    # Rows pay for the subsets with a weight: row 0 needs no ε(∅,∅), row 4 (s_I = s) no ε(I,∅).
    assert den.rows_evaluated == 2 + 3 + 3 + 3 + 2
    assert plan_cost(plan, T, [t]) == [2, 3, 3, 3, 2]


def test_a_model_that_ignores_y_reduces_both_rules_to_cfg_on_the_image():
    schedule = make_schedule("cosine", T)

    def eps(x, t, c):  # no y at all
        return 0.1 * x + c["img"].reshape(-1, 1, 1, 1) * U[1] + c["img"].reshape(-1, 1, 1, 1) ** 2 * U[2]

    yv, iv = torch.tensor([1.0, 1.0]), torch.tensor([0.8, 0.8])
    cond, uncond, no_image = _conds(yv, iv)
    plan = SamplingPlan(solver=Solver(steps=10), rows=(Guidance(w=0.0, image_scale=2.5, clip=False),
                                                       Guidance(w=-1.0, image_scale=2.5, combine="independent",
                                                                clip=False)))
    x = torch.randn(2, 1, 4, 4)
    got = GuidedDenoiser(eps, schedule, cond, plan, uncond, no_image=no_image)(x, 50).eps
    e_i, e_0 = eps(x, 50, {"img": iv}), eps(x, 50, {"img": torch.zeros(2)})
    torch.testing.assert_close(got, e_0 + 2.5 * (e_i - e_0), rtol=1e-5, atol=1e-5)


def test_outside_its_interval_a_two_condition_row_is_fully_conditional_at_one_network_row():
    schedule = make_schedule("cosine", T)
    yv, iv = torch.tensor([1.0]), torch.tensor([0.5])
    cond, uncond, no_image = _conds(yv, iv)
    plan = SamplingPlan(solver=Solver(steps=10), rows=(Guidance(w=3.0, image_scale=2.0, interval=(10, 40),
                                                                clip=False),))
    den = GuidedDenoiser(analytic_eps, schedule, cond, plan, uncond, no_image=no_image)
    x = torch.randn(1, 1, 4, 4)
    torch.testing.assert_close(den(x, 80).eps, analytic_eps(x, 80, cond), rtol=1e-6, atol=1e-6)
    assert den.rows_evaluated == 1 and plan_cost(plan, T, [80, 30]) == [1 + 3]


def test_two_condition_rows_are_refused_where_they_cannot_apply():
    with pytest.raises(ValueError, match="cfg rule"):
        Guidance(rule="apg", image_scale=2.0)
    with pytest.raises(ValueError, match="rescale"):
        Guidance(w=1.0, combine="independent", rescale=0.5)
    with pytest.raises(PlanError, match="image_scale=2.0: this checkpoint has no image condition"):
        SamplingPlan(rows=(Guidance(image_scale=2.0),)).check_image(False)


def test_a_tiny_image_model_samples_rows_with_and_without_images_and_names_a_bad_one(tmp_path):
    from builders import tiny_image_checkpoint
    from cfgd.sampling.checkpoint_sampler import CheckpointSampler

    gen = CheckpointSampler.load(tiny_image_checkpoint(tmp_path / "ck"))
    img = np.random.default_rng(0).integers(0, 256, (2, 2, 1), dtype=np.uint8)
    png = encode_png(img, PNG_MODES)
    rows = [Condition(label=3, image=png), Condition(label=3), Condition(label=5, image=png)]
    plan = SamplingPlan(solver=Solver(steps=3), rows=(Guidance(w=1.0), Guidance(w=1.0),
                                                      Guidance(w=1.0, image_scale=2.0)))
    out = gen.sample(rows, [0, 0, 1], plan)
    assert out.shape == (3, 1, 8, 8) and torch.isfinite(out).all()
    assert not torch.equal(out[0], out[1])  # the image is a condition
    # A row sampled alone is the same image (the rows of a batch do not interact).
    alone = gen.sample(rows[2:], [1], SamplingPlan(solver=Solver(steps=3), rows=plan.rows[2:]))
    torch.testing.assert_close(alone[0], out[2], atol=1e-5, rtol=0)
    wrong = encode_png(np.zeros((3, 3, 1), np.uint8), PNG_MODES)
    with pytest.raises(ValueError, match=r"image\[1\] decodes to \(h, w, c\) = \(3, 3, 1\); this checkpoint takes "
                                         r"\(2, 2, 1\)"):
        gen.sample([rows[0], Condition(label=1, image=wrong)], [0, 1], SamplingPlan.uniform(2, solver=Solver(steps=2)))
    with pytest.raises(ValueError, match=r"image\[0\]: cannot decode"):
        gen.sample([Condition(label=1, image=b"not a png")], [0], SamplingPlan.uniform(1, solver=Solver(steps=2)))


def test_an_http_image_may_be_a_uri_under_the_servers_image_prefix_and_nowhere_else(tmp_path):
    import base64

    from builders import tiny_image_checkpoint
    from cfgd.sampling.checkpoint_sampler import CheckpointSampler
    from cfgd.serving.request_conditions import request_image
    from cfgd.serving.schemas import RequestError
    from cfgd.serving.settings import ServeSettings

    gen = CheckpointSampler.load(tiny_image_checkpoint(tmp_path / "ck"))
    png = encode_png(np.full((2, 2, 1), 7, np.uint8), PNG_MODES)
    (tmp_path / "images" / "a").mkdir(parents=True)
    (tmp_path / "images" / "a" / "x.png").write_bytes(png)
    (tmp_path / "secret.png").write_bytes(png)
    (tmp_path / "images" / "link.png").symlink_to(tmp_path / "secret.png")
    s = ServeSettings.from_dict({"checkpoints": {"a": "x"}, "default_checkpoint": "a",
                                 "image_prefix": str(tmp_path / "images")})
    assert request_image(str(tmp_path / "images" / "a" / "x.png"), gen, s) == png
    assert request_image(base64.b64encode(png).decode(), gen, s) == png
    for uri, words in [(str(tmp_path / "secret.png"), "sub-path of the image_prefix"),
                       (str(tmp_path / "images" / "link.png"), "sub-path"),
                       (str(tmp_path / "images" / ".." / "secret.png"), "'..'"),
                       (str(tmp_path / "images" / "a" / "none.png"), "does not exist")]:
        with pytest.raises(RequestError, match=words) as err:
            request_image(uri, gen, s)
        assert err.value.status == 422 and err.value.field == "image"
    plain = ServeSettings.from_dict({"checkpoints": {"a": "x"}, "default_checkpoint": "a"})
    with pytest.raises(RequestError, match="base64 PNG only"):
        request_image(str(tmp_path / "images" / "a" / "x.png"), gen, plain)
