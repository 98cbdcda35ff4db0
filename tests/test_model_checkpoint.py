"""The network, checkpoints and the sampler bound to a real (tiny) network."""

import copy
import json
import os

import numpy as np
import pytest
import torch

from cfgd.config import Config, to_dict
from cfgd.data.images import to_uint8
from cfgd.diffusion.guidance import GuidedDenoiser
from cfgd.diffusion.plan import Guidance, SamplingPlan, Solver
from cfgd.diffusion.process import make_schedule, q_sample
from cfgd.diffusion.solvers import sample
from cfgd.io.checkpoint import CheckpointError, find_checkpoints, load_checkpoint, resolve_checkpoint, write_checkpoint
from cfgd.model.unet import MODEL_SIZES, ModelSpec, build_model
from cfgd.sampling.checkpoint_sampler import CPU_ROWS_PER_CALL, CheckpointSampler, eps_fn_of
from cfgd.sampling.tiles import make_grid
from cfgd.spec import null_label
from builders import digits_batch, tiny_net


def _plan(ws, steps=10, eta=0.0, intervals=None, clip=True):
    intervals = intervals or [None] * len(ws)
    return SamplingPlan(solver=Solver(steps=steps, eta=eta),
                        rows=tuple(Guidance(w=float(w), interval=iv, clip=clip) for w, iv in zip(ws, intervals)))


@pytest.fixture(scope="module")
def tiny():
    return tiny_net(0)


@pytest.mark.parametrize("size,image_size,channels", [("tiny", 28, 1), ("small", 32, 3), ("tiny", 64, 3),
                                                      ("base", 28, 1)])
def test_unet_shapes_for_supported_image_sizes(size, image_size, channels):
    model = build_model(ModelSpec(size, image_size, channels, num_classes=10))
    x = torch.randn(2, channels, image_size, image_size)
    out = model(x, torch.tensor([1, 999]), torch.tensor([3, 10]))
    assert out.shape == x.shape
    assert model.class_emb.num_embeddings == 11  # num_classes + the null row


def test_unknown_model_size_lists_the_registry():
    with pytest.raises(ValueError, match="tiny"):
        build_model(ModelSpec("huge", 28, 1, 10))
    assert {"tiny", "small", "base", "large"} <= set(MODEL_SIZES)


def test_labels_change_the_prediction(tiny):
    x = torch.randn(1, 1, 8, 8)
    t = torch.tensor([500])
    a, b = tiny(x, t, torch.tensor([1])), tiny(x, t, torch.tensor([null_label(10)]))
    assert not torch.allclose(a, b)


def test_batched_2b_forward_equals_two_calls_with_the_network(tiny):
    x = torch.randn(6, 1, 8, 8)
    t = torch.full((6,), 400)
    y = torch.tensor([0, 1, 2, 3, 4, 5])
    w = torch.tensor([0.5, 1, 2, 3, 4, 5], dtype=torch.float64)
    with torch.no_grad():
        plan = SamplingPlan(rows=tuple(Guidance(w=float(v), clip=False) for v in w))
        guided = GuidedDenoiser(eps_fn_of(tiny), make_schedule("cosine", 1000), y, plan, null_label(10))(x, 400).eps
        ec = tiny(x, t, y)
        eu = tiny(x, t, torch.full_like(y, null_label(10)))
    expected = (1 + w.float())[:, None, None, None] * ec - w.float()[:, None, None, None] * eu
    assert (guided - expected).abs().max().item() < 1e-5


def test_seeded_sample_is_the_same_alone_and_in_a_batch_of_64(tiny):
    s = make_schedule("cosine", 100)
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 10, (64,), generator=g)
    ws = torch.rand(64, generator=g, dtype=torch.float64) * 4 - 0.5
    seeds = list(range(1000, 1064))
    plan = _plan(ws.tolist(), steps=20, eta=0.5)
    batch = sample(eps_fn_of(tiny), s, labels, seeds, (1, 8, 8), plan, null_label=null_label(10))
    for i in (0, 17, 63):
        alone = sample(eps_fn_of(tiny), s, labels[i:i + 1], seeds[i:i + 1], (1, 8, 8), plan.select(i, i + 1),
                       null_label=null_label(10))
        assert (alone[0] - batch[i]).abs().max().item() < 1e-4, i


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    x0, y = digits_batch(16)
    model = build_model(ModelSpec("tiny", 8, 1, 10))
    s = make_schedule("cosine", 100)
    g = torch.Generator().manual_seed(0)
    t = torch.randint(1, 101, (16,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    x_t = q_sample(s, x0, t, noise)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        loss = (model(x_t, t, y) - noise).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], (losses[0], losses[-1])


def test_execution_settings_change_how_the_network_runs_not_what_it_computes(tiny):
    """Row chunking and channels-last (the CPU defaults) give the plain call's ε."""
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(70, 1, 8, 8, generator=g), torch.randint(1, 1000, (70,), generator=g), torch.arange(70) % 11
    fast = copy.deepcopy(tiny).to(memory_format=torch.channels_last)
    with torch.inference_mode():
        ref = eps_fn_of(tiny)(x, t, y)
        chunked = eps_fn_of(tiny, rows_per_call=32)(x, t, y)  # 32 + 32 + 6 rows
        nhwc = eps_fn_of(fast, rows_per_call=32, channels_last=True)(x, t, y)
    assert chunked.shape == nhwc.shape == ref.shape and nhwc.is_contiguous()
    torch.testing.assert_close(chunked, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(nhwc, ref, rtol=0, atol=1e-5)
    # Rows 0..31 are a whole call of 32 rows either way: bit-identical.
    assert torch.equal(chunked[:32], eps_fn_of(tiny)(x[:32], t[:32], y[:32]))


def _save(tmp_path, model, name="ckpt", step=7):
    spec = model.spec
    return write_checkpoint(tmp_path / name, model_state=model.state_dict(), ema_state=model.state_dict(),
                            optimizer_state={"state": {}, "param_groups": [{"lr": 1e-3, "params": [0]}]},
                            spec=spec, label_names=[str(i) for i in range(10)], step=step, epoch=1,
                            config=to_dict(Config()))


def test_checkpoint_round_trip_reproduces_samples_bit_for_bit(tmp_path, tiny):
    path = _save(tmp_path, tiny)
    gen = CheckpointSampler.load(path)
    assert gen.checkpoint.step == 7 and gen.checkpoint.label_names[3] == "3"
    assert gen.checkpoint.schedule_name == "cosine" and gen.checkpoint.null_label == 10
    labels, seeds = [1, 2, 3], [5, 6, 7]
    a = gen.sample(labels, seeds, _plan([0.0, 1.0, 3.0]))
    # On CPU, load() runs the network channels-last in calls of at most 32 rows.
    assert (gen.rows_per_call, gen.channels_last) == (CPU_ROWS_PER_CALL, True)
    same = copy.deepcopy(tiny).to(memory_format=torch.channels_last)
    b = CheckpointSampler(gen.checkpoint, same, torch.device("cpu"), CPU_ROWS_PER_CALL, True).sample(
        labels, seeds, _plan([0.0, 1.0, 3.0]))
    assert torch.equal(a, b)
    ck = load_checkpoint(path, with_optimizer=True)
    assert ck.optimizer_state["param_groups"][0]["lr"] == 1e-3


def test_truncated_or_corrupted_checkpoint_is_refused(tmp_path, tiny):
    path = _save(tmp_path, tiny)
    weights = path / "ema.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(path)
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(path)
    (path / "meta.json").unlink()
    with pytest.raises(CheckpointError, match="meta.json is missing"):
        load_checkpoint(path)


def test_interrupted_write_leaves_no_complete_looking_checkpoint(tmp_path, tiny):
    # A non-tensor value makes safetensors fail after the first weights file is written.
    with pytest.raises(Exception):
        write_checkpoint(tmp_path / "ckpt", model_state=tiny.state_dict(), ema_state={"x": "not a tensor"},
                         optimizer_state=None, spec=tiny.spec, label_names=[], step=1, epoch=0, config={})
    assert os.listdir(tmp_path) == []  # neither a checkpoint nor temporary files are left


def test_newest_valid_checkpoint_is_picked_and_corrupt_ones_skipped(tmp_path, tiny):
    _save(tmp_path, tiny, "checkpoint_a", step=10)
    newest = _save(tmp_path, tiny, "checkpoint_b", step=20)
    assert resolve_checkpoint(tmp_path) == newest
    meta = json.loads((newest / "meta.json").read_text())
    (newest / "model.safetensors").write_bytes(b"garbage")
    assert [s for s, _ in find_checkpoints(tmp_path)] == [10]
    assert resolve_checkpoint(tmp_path).name == "checkpoint_a"
    assert meta["format_version"] == 1
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        resolve_checkpoint(tmp_path / "nothing-here")


def test_grid_layout():
    imgs = np.stack([np.full((4, 4, 1), i * 20, np.uint8) for i in range(12)])
    grid = np.asarray(make_grid(imgs, rows=2, cols=3, pad=1, gap=2, per_cell=2))
    assert grid.shape == (2 * 4 + 2, 3 * (2 * 4 + 1) + 2 * 2)
    assert grid[0, 0] == 0 and grid[0, 5] == 20 and grid[6, 0] == 6 * 20  # row 2 starts at cell 3
    assert to_uint8(torch.tensor([[[[-1.0, 1.0]]]])).tolist() == [[[[0], [255]]]]


def test_chunked_sampling_with_per_row_intervals_equals_one_batch(tmp_path, tiny):
    gen = CheckpointSampler.load(_save(tmp_path, tiny))
    labels, seeds, w = [0, 1, 2, 3, 4], [9, 8, 7, 6, 5], [0.0, 1.0, 2.0, 3.0, -1.0]
    intervals = [(1, 1000), (1, 400), (300, 1000), (500, 1000), (1, 600)]
    whole = gen.sample(labels, seeds, _plan(w, 8, intervals=intervals), batch_size=5)
    chunked = gen.sample(labels, seeds, _plan(w, 8, intervals=intervals), batch_size=2)
    assert (whole - chunked).abs().max().item() < 1e-5
    plain = gen.sample(labels, seeds, _plan(w, 8), batch_size=5)
    assert not torch.allclose(whole[2], plain[2])  # the interval changed a guided row
