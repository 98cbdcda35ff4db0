"""Serving parts without a cluster: the token check, and a failing request inside a batch."""

import pytest
import torch

from cfgd import serving
from cfgd.diffusion.plan import Guidance, Solver
from cfgd.io.checkpoint import load_checkpoint
from cfgd.model.from_checkpoint import build_network
from cfgd.sampling.checkpoint_sampler import CheckpointSampler
from cfgd.serving.guard import authorize, configured_tokens


def test_the_token_check(tmp_path):
    tokens = configured_tokens({"CFGD_API_TOKEN": " new , old ,"})
    assert tokens == (b"new", b"old")
    secret = tmp_path / "token"
    secret.write_text("new\nold\n")
    assert configured_tokens({"CFGD_API_TOKEN_FILE": str(secret)}) == tokens
    remote = "remote-client"  # any caller that is not loopback (no address needed: nothing connects)
    assert authorize("/generate", "Bearer new", remote, tokens) is None
    assert authorize("/generate", "bearer old", remote, tokens) is None
    for header in (None, "", "Bearer", "Bearer wrong", "Basic new", "new", "Bearer newx"):
        assert authorize("/stats", header, "127.0.0.1", tokens)[0] == 401
    for path in ("/healthz", "/docs", "/openapi.json"):
        assert authorize(path, None, remote, tokens) is None
    # No token configured: loopback callers only.
    assert authorize("/generate", None, "127.0.0.1", ()) is None
    assert authorize("/generate", None, "::1", ()) is None
    status, reason = authorize("/generate", None, remote, ())
    assert status == 403 and "CFGD_API_TOKEN" in reason


class _FailsOnLabel(torch.nn.Module):
    """A network that raises for one label, as a request whose input breaks the math would."""

    def __init__(self, net, bad_label):
        super().__init__()
        self.net, self.bad = net, bad_label

    def forward(self, x, t, y):
        if (y == self.bad).any():
            raise OverflowError("math range error")
        return self.net(x, t, y)


def test_a_request_that_fails_inside_a_batch_fails_alone(tmp_path):
    from builders import tiny_checkpoint
    from cfgd.diffusion.plan import Condition
    from cfgd.serving.request_conditions import RequestCondition

    ck = load_checkpoint(tiny_checkpoint(tmp_path / "m", 0, perturb=False))
    good_gen = CheckpointSampler(ck, build_network(ck), torch.device("cpu"))
    gen = CheckpointSampler(ck, _FailsOnLabel(build_network(ck), 9), torch.device("cpu"))
    solver = Solver(steps=3)

    def spec(g, label, seed):
        cond = RequestCondition(Condition(label=label), str(label))
        return serving.SampleSpec(gen=g, checkpoint="m", condition=cond, seeds=[seed],
                                  solver=solver, guidance=Guidance(w=1.0), guides={}, format="png_list")

    specs = [spec(gen, 1, 5), spec(gen, 9, 6), spec(gen, 3, 7)]
    images, calls = serving.sample_specs(specs)
    assert isinstance(images[1], OverflowError) and calls == 4  # the batch, then each alone
    alone, _ = serving.sample_specs([spec(good_gen, 1, 5), spec(good_gen, 3, 7)])
    assert torch.equal(images[0], alone[0]) and torch.equal(images[2], alone[1])
    refusal = serving.sampling_failure(images[1])
    assert refusal.status == 422 and "OverflowError" in refusal.message
    assert serving.sampling_failure(RuntimeError("out of memory")).status == 503


@pytest.mark.parametrize("bad", [{"max_images": True}, {"max_images": "3"}, {"w_max": float("nan")},
                                 {"default_steps": 0}])
def test_settings_are_typed_strictly_in_user_config(bad):
    with pytest.raises(ValueError, match="setting "):
        serving.ServeSettings.from_dict({"checkpoints": {"a": "/x"}, "default_checkpoint": "a", **bad})
    # The command line sends strings: converted there, and still range-checked.
    assert serving.settings_from_args({"checkpoint": "/x", "max_images": "3"})["max_images"] == 3
