"""Conditions beyond class labels, without Ray: condition dropout per kind, guidance with a
negative prompt against its closed form (per row, mixed with label rows), the text model's
checkpoint sampling in a fresh process from the checkpoint alone, prompts encoded once per
batch, batch invariance, and the refusals that name the field."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cfgd.diffusion.guidance import GuidedDenoiser
from cfgd.diffusion.plan import Condition, Guidance, SamplingPlan, Solver
from cfgd.diffusion.process import make_schedule
from cfgd.io.checkpoint import CheckpointError, read_checkpoint
from cfgd.model.conditioning import drop_condition
from cfgd.sampling.checkpoint_sampler import CheckpointSampler
from cfgd.spec import ModelSpec
from builders import tiny_text_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TEXT = ModelSpec("tiny", 8, 1, 10, condition="text", vocab_size=20, max_tokens=6)
EMB = ModelSpec("tiny", 8, 1, 10, condition="embedding", embedding_tokens=2, embedding_dim=4)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_empties_captions_and_flags_embeddings_at_p_uncond(p):
    B, g = 20_000, torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 20, (B, 6))
    dropped = drop_condition({"tokens": tokens}, p, TEXT, g)["tokens"]
    empty = (dropped == 0).all(dim=1)
    kept = ~empty
    assert torch.equal(dropped[kept], tokens[kept])  # a kept caption is untouched; a dropped one is "" (all [PAD])
    sd = (p * (1 - p) / B) ** 0.5
    assert abs(empty.float().mean().item() - p) < 4 * sd
    emb = {"embedding": torch.randn(B, 2, 4), "null": torch.zeros(B, dtype=torch.bool)}
    out = drop_condition(emb, p, EMB, torch.Generator().manual_seed(1))
    assert abs(out["null"].float().mean().item() - p) < 4 * sd and out["embedding"] is emb["embedding"]
    assert drop_condition({"tokens": tokens}, 0.0, TEXT)["tokens"].equal(tokens)


def test_the_embedding_model_uses_its_learned_null_vector_for_null_rows():
    from cfgd.model.unet import build_model

    torch.manual_seed(0)
    model = build_model(EMB).eval()
    with torch.no_grad():
        model.cond.null.copy_(torch.randn(2, 4))
        e = torch.randn(3, 2, 4)
        flagged = model.encode({"embedding": e, "null": torch.tensor([True, False, True])})
        as_null = model.encode({"embedding": model.cond.null.expand(3, 2, 4), "null": torch.zeros(3, dtype=torch.bool)})
    torch.testing.assert_close(flagged["pooled"][[0, 2]], as_null["pooled"][[0, 2]])
    assert not torch.allclose(flagged["pooled"][1], as_null["pooled"][1])


def _net(x, t, c):
    """An analytic 'network' over a mixed batch: ε = code·1 for a prompt code, label/10 for a label."""
    code = torch.where(c["is_label"], c["label"].double() / 10, c["code"].double())
    return (torch.ones_like(x) * code.reshape(-1, 1, 1, 1)).to(x.dtype) + 0 * x


def test_a_negative_prompt_takes_the_null_condition_s_place_per_row_mixed_with_label_rows():
    s = make_schedule("cosine", 100)
    # Rows 0, 1: prompts (codes 0.3, 0.5) with negatives (codes -0.2, 0.1); row 2: prompt, no negative (∅, code 0);
    # rows 3, 4: labels 4 and 7 with the null label (10 → 1.0).
    cond = {"code": torch.tensor([0.3, 0.5, 0.7, 0, 0]), "label": torch.tensor([0, 0, 0, 4, 7]),
            "is_label": torch.tensor([False, False, False, True, True])}
    uncond = {"code": torch.tensor([-0.2, 0.1, 0.0, 0, 0]), "label": torch.tensor([0, 0, 0, 10, 10]),
              "is_label": cond["is_label"]}
    ws = [2.0, 1.0, 3.0, 0.5, -1.0]
    plan = SamplingPlan(rows=tuple(Guidance(w=w, clip=False) for w in ws))
    x = torch.randn(5, 1, 4, 4, dtype=torch.float64)
    eps = GuidedDenoiser(_net, s, cond, plan, uncond)(x, 40).eps
    e_c = torch.tensor([0.3, 0.5, 0.7, 0.4, 0.7], dtype=torch.float64)
    e_u = torch.tensor([-0.2, 0.1, 0.0, 1.0, 1.0], dtype=torch.float64)
    want = (1 + torch.tensor(ws, dtype=torch.float64)) * e_c - torch.tensor(ws, dtype=torch.float64) * e_u
    torch.testing.assert_close(eps[:, 0, 0, 0], want)


def _plan(n, w=2.0, steps=4):
    return SamplingPlan(solver=Solver(steps=steps), rows=(Guidance(w=w),) * n)


def test_prompts_are_encoded_once_per_batch_and_a_row_is_the_same_alone_or_in_a_mixed_batch(tmp_path):
    gen = CheckpointSampler.load(tiny_text_checkpoint(tmp_path / "ck"))
    calls = []
    encode = gen.model.encode_y
    gen.model.encode_y = lambda y: calls.append(y["tokens"].shape[0]) or encode(y)
    rows = [Condition(prompt="a dark 3"), Condition(prompt="a dark 3", negative_prompt="light"),
            Condition(prompt="a light 7"), Condition(prompt="a dark 3"), Condition(prompt="")]
    images = gen.sample(rows, [5, 6, 7, 8, 9], _plan(5))
    # Distinct token rows: the two prompts, "light" and "" (∅, also row 4's prompt): one call of 4 rows.
    assert calls == [4]
    alone = gen.sample([rows[1]], [6], _plan(1))
    torch.testing.assert_close(alone[0], images[1], atol=1e-5, rtol=0)
    # The negative prompt changes the guided sample; at w = 0 it cannot (ε_u has weight 0).
    assert not torch.allclose(images[0], images[1], atol=1e-4)
    w0 = gen.sample(rows[:2], [1, 1], _plan(2, w=0.0))
    torch.testing.assert_close(w0[0], w0[1], atol=1e-6, rtol=0)


def test_a_text_checkpoint_samples_in_a_fresh_process_from_the_checkpoint_alone(tmp_path):
    ck = tiny_text_checkpoint(tmp_path / "ck")
    assert json.loads((ck / "meta.json").read_text())["model"]["condition"] == "text"
    here = CheckpointSampler.load(ck).sample([Condition(prompt="a light 7", negative_prompt="dark")], [3], _plan(1))
    code = ("import sys, torch; sys.path.insert(0, 'platform');"
            "from cfgd.sampling.checkpoint_sampler import CheckpointSampler;"
            "from cfgd.diffusion.plan import Condition, Guidance, SamplingPlan, Solver;"
            f"g = CheckpointSampler.load({str(ck)!r});"
            "x = g.sample([Condition(prompt='a light 7', negative_prompt='dark')], [3],"
            " SamplingPlan(solver=Solver(steps=4), rows=(Guidance(w=2.0),)));"
            f"torch.save(x, {str(tmp_path / 'x.pt')!r})")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT / "platform")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    torch.testing.assert_close(torch.load(tmp_path / "x.pt", weights_only=True), here, atol=1e-6, rtol=0)


def test_bad_conditions_are_refused_naming_the_field_and_row(tmp_path):
    gen = CheckpointSampler.load(tiny_text_checkpoint(tmp_path / "ck"))
    with pytest.raises(ValueError, match=r"label\[1\]: this checkpoint is conditioned on text \(give 'prompt'"):
        gen.sample([Condition(prompt="a 3"), 4], [0, 1], _plan(2))
    with pytest.raises(ValueError, match=r"prompt\[0\] has 9 tokens \(words and punctuation\), at most 8"):
        gen.sample([Condition(prompt="a dark 3 , small , plain , light")], [0], _plan(1))
    with pytest.raises(ValueError, match=r"negative_prompt\[0\] has 9 tokens"):
        gen.sample([Condition(prompt="a 3", negative_prompt="a dark 3 , small , plain , light")], [0], _plan(1))
    with pytest.raises(ValueError, match="give one condition per row, not label and prompt"):
        Condition(label=3, prompt="a 3")
    with pytest.raises(ValueError, match="must be finite"):
        Condition(embedding=[0.0, float("inf")])
    # Unknown words are [UNK] (the tokenizer's rule), not an error.
    gen.sample([Condition(prompt="a purple 3")], [0], _plan(1))


def test_a_text_checkpoint_without_its_tokenizer_is_refused(tmp_path):
    ck = tiny_text_checkpoint(tmp_path / "ck")
    meta = json.loads((ck / "meta.json").read_text())
    del meta["tokenizer"]
    (ck / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="a text model without its tokenizer"):
        read_checkpoint(ck)


def test_specs_of_older_checkpoints_read_as_label_models_and_bad_conditions_are_refused():
    old = {"size": "tiny", "image_size": 8, "in_channels": 1, "num_classes": 10}
    assert ModelSpec.from_dict(old).condition == "label"
    with pytest.raises(ValueError, match="model condition 'audio' is not valid"):
        ModelSpec.from_dict({**old, "condition": "audio"})
    with pytest.raises(ValueError, match=r"vocab_size=0 is not valid for condition 'text'"):
        ModelSpec.from_dict({**old, "condition": "text", "max_tokens": 8})
    with pytest.raises(ValueError, match=r"embedding_dim=10000000 is not valid"):
        ModelSpec.from_dict({**old, "condition": "embedding", "embedding_tokens": 1, "embedding_dim": 10**7})


# ------------------------------------------------------------ the HTTP edge, without Serve


def _core(tmp_path):
    from cfgd.serving.sampler import SamplerCore
    from cfgd.serving.settings import ServeSettings
    from builders import tiny_checkpoint

    core = SamplerCore()
    core.apply(ServeSettings.from_dict({
        "checkpoints": {"text": str(tiny_text_checkpoint(tmp_path / "text")),
                        "digits": str(tiny_checkpoint(tmp_path / "digits", overrides=["diffusion.timesteps=100"]))},
        "default_checkpoint": "text", "default_steps": 2, "max_embedding_values": 64}))
    return core


def test_request_conditions_fuzzed_are_sampled_or_refused_with_a_4xx_naming_a_field(tmp_path):
    """Any prompt, negative prompt or embedding a client can send: a 4xx naming the field, or images."""
    from hypothesis import HealthCheck, given, settings, strategies as st

    from cfgd.serving.schemas import RequestError

    core = _core(tmp_path)
    fields = {"prompt", "negative_prompt", "embedding", "class_label", "class_name"}
    text = st.text(max_size=60) | st.sampled_from(["a dark 3", "", "a 5 , small", "ünïcødé 3", "a\x00b"])
    emb = st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), max_size=70) | \
        st.text(max_size=40) | st.binary(max_size=300).map(lambda b: __import__("base64").b64encode(b).decode())

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.fixed_dictionaries({}, optional={"prompt": text, "negative_prompt": text, "embedding": emb,
                                              "class_label": st.integers(-2, 12),
                                              "checkpoint": st.sampled_from(["text", "digits"])}))
    def check(body):
        try:
            spec = core.prepare({**body, "steps": 2})
        except RequestError as err:
            assert 400 <= err.status < 500 and err.field.split(".")[0] in fields | {"checkpoint", "body"}, err
            return
        (images,) = core.sample([spec])
        assert isinstance(images, torch.Tensor) and torch.isfinite(images).all(), images

    check()


def test_a_base64_embedding_is_decoded_and_checked_against_the_checkpoint_shape():
    import base64

    import numpy as np

    from cfgd.serving.request_conditions import decode_embedding
    from cfgd.serving.schemas import RequestError

    v = np.array([0.5, -1.25, 3.0], dtype="<f4")
    assert decode_embedding(base64.b64encode(v.tobytes()).decode(), 3, 10) == (0.5, -1.25, 3.0)
    assert decode_embedding([1, 2.5, 3], 3, 10) == (1.0, 2.5, 3.0)
    for value, words in [("not base64!", "not base64"), (base64.b64encode(b"abcde").decode(), "whole number"),
                         ([1.0, 2.0], "this checkpoint takes 3"), ([0.0] * 11, "the limit is 10"),
                         (base64.b64encode(np.array([1, np.nan, 2], "<f4").tobytes()).decode(), "finite")]:
        with pytest.raises(RequestError, match=words) as err:
            decode_embedding(value, 3, 10)
        assert err.value.status == 422 and err.value.field == "embedding"
