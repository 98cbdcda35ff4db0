"""Paper-comparable FID (cfgd.evaluate.fid_inception): torch-fidelity's InceptionV3, with random
weights saved to a local file the way torch-fidelity's weights file is saved, checked
for its plumbing (the numbers of real weights cannot be downloaded here)."""

import importlib.util
import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save_file

from cfgd.config import ConfigError
from cfgd.evaluate import fid_inception
from cfgd.evaluate.evaluator import RealSplit
from cfgd.evaluate.fid_inception import CONFIG_KEY, InceptionFID, real_halves, to_inception_input
from cfgd.evaluate.metrics import Embedding, fid
from cfgd.io.artifact import sha256_file
from cfgd.sweep.runner import run_sweep
from cfgd.sweep.sweep_grid import SweepConfig
from builders import tiny_checkpoint, tiny_evaluator, write_digits

pytestmark = pytest.mark.skipif(importlib.util.find_spec("torch_fidelity") is None,
                                reason="torch-fidelity is the fid extra: bash scripts/setup.sh installs it")

N = 6  # images per set: InceptionV3 at 299×299 runs at ~2 images/s on 2 shared cores


def random_inception_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """torch-fidelity's InceptionV3 architecture with random He-scaled weights (features of
    order 1 through all 94 layers) and identity batch-norm statistics."""
    class Unloaded(fid_inception.library().FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # keep the shapes, skip the load
            return None

    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    shapes = Unloaded("random", ["2048"], feature_extractor_weights_path=empty).state_dict()
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, v in shapes.items():
        if k.endswith(("bn.weight", "running_var")):
            state[k] = torch.ones_like(v)
        elif k.endswith("running_mean"):
            state[k] = torch.zeros_like(v)
        elif not v.is_floating_point():
            state[k] = v.clone()
        elif v.ndim == 4:
            state[k] = torch.randn(v.shape, generator=g) * (2.0 / v[0].numel()) ** 0.5
        else:
            state[k] = 0.05 * torch.randn(v.shape, generator=g)
    return state


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """{"state": the random state dict, "pth": torch.save'd file (torch-fidelity's format)}."""
    state = random_inception_state()
    path = tmp_path_factory.mktemp("inception") / "weights-inception-random.pth"
    torch.save(state, path)
    return {"state": state, "pth": str(path)}


@pytest.fixture(scope="module")
def image_sets():
    """Two sets of N grayscale uint8 (N, 28, 28, 1) images: dark noise and bright noise."""
    rng = np.random.default_rng(0)
    a = rng.integers(0, 128, (N, 28, 28, 1), dtype=np.uint8)
    b = rng.integers(128, 256, (N, 28, 28, 1), dtype=np.uint8)
    return a, b


@pytest.fixture(scope="module")
def features(weights, image_sets):
    net = InceptionFID(weights["pth"])
    return {"net": net, "a": net.features(image_sets[0], batch_size=3), "b": net.features(image_sets[1], batch_size=N)}


def test_empty_or_missing_weights_are_refused_naming_the_key_and_the_download(tmp_path):
    url = fid_inception.weights_url()
    assert url.startswith("https://") and url.endswith(".pth")
    for bad in ("", str(tmp_path / "nope.pth")):
        with pytest.raises(ConfigError, match=CONFIG_KEY) as err:
            InceptionFID(bad)
        assert url in str(err.value)


def test_files_that_are_not_its_weights_are_refused(tmp_path):
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(3)}, wrong)
    with pytest.raises(ValueError, match=f"{CONFIG_KEY}=.*does not hold torch-fidelity's InceptionV3 weights"):
        InceptionFID(wrong)
    pickled = tmp_path / "object.pth"
    torch.save({"a": torch.zeros(1), "code": Embedding}, pickled)  # a class: refused, never imported/run
    with pytest.raises(ValueError, match=f"{CONFIG_KEY}=.*not a state dict of tensors"):
        InceptionFID(pickled)


def test_images_become_three_channel_uint8_the_same_from_either_form(image_sets):
    a = image_sets[0][:4]
    x = to_inception_input(a)
    assert x.dtype == torch.uint8 and x.shape == (4, 3, 28, 28)
    assert torch.equal(x[:, 0], torch.from_numpy(a[..., 0])) and torch.equal(x[:, 0], x[:, 2])
    as_float = torch.from_numpy(a).permute(0, 3, 1, 2).float() * (2 / 255) - 1  # the data loader's map
    assert torch.equal(to_inception_input(as_float), x)
    assert torch.equal(to_inception_input(np.repeat(a, 3, axis=3)), x)
    with pytest.raises(ValueError, match="1 or 3 channels"):
        to_inception_input(np.zeros((2, 8, 8, 2), np.uint8))
    with pytest.raises(ValueError, match=r"uint8 \(N, H, W, C\) or float"):
        to_inception_input(torch.zeros(2, 8, 8, dtype=torch.int64))


def test_features_and_fid(features):
    fa, fb = features["a"], features["b"]
    assert fa.shape == fb.shape == (N, 2048) and fa.dtype == np.float64
    assert np.isfinite(fa).all() and fa.std(axis=0).mean() > 1e-3  # random weights still tell images apart
    scale = np.trace(np.cov(fa, rowvar=False))
    assert fid(fa, fa) <= 1e-9 * scale
    d_ab = fid(fa, fb)
    assert np.isfinite(d_ab) and d_ab > 0.1 * scale


def test_same_file_same_features_and_batch_size_does_not_matter(weights, image_sets, features, tmp_path):
    a = image_sets[0]
    # Loaded afresh from the same file, the first batch of 3 again: bit for bit the same.
    assert np.array_equal(InceptionFID(weights["pth"]).features(a[:3], batch_size=3), features["a"][:3])
    # Batches of 1 instead of 3, float [-1, 1] input, the same weights as safetensors: the same up to round-off.
    save_file(weights["state"], tmp_path / "w.safetensors")
    as_float = torch.from_numpy(a[3:5]).permute(0, 3, 1, 2).float() * (2 / 255) - 1
    np.testing.assert_allclose(InceptionFID(tmp_path / "w.safetensors").features(as_float, batch_size=1),
                               features["a"][3:5], rtol=1e-4, atol=1e-6)


def test_real_halves_are_the_evaluator_split():
    labels = np.arange(11) % 3
    emb = Embedding(np.arange(11.0)[:, None] * 10, np.eye(3)[labels])
    split = RealSplit.of(emb, labels, seed=4)
    held, ref = real_halves(11, seed=4)
    assert np.array_equal(emb.features[held], split.held_out.features)
    assert np.array_equal(emb.features[ref], split.reference.features)


# ------------------------------------------------------------------ in a sweep


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Digits data whose test split has 4 images (reference half 2), an evaluator and a checkpoint."""
    root = tmp_path_factory.mktemp("fidsweep")
    write_digits(root / "data", train=slice(0, 400), test=slice(400, 404), rows_per_shard=400)
    evaluator = tiny_evaluator(root / "data", root / "evaluator", steps=20)
    tiny_checkpoint(root / "run" / "checkpoint_a", 0, perturb=False, step=1,
                    overrides=["diffusion.timesteps=50", f"data.root={root / 'data'}"])
    return {"root": root, "evaluator": evaluator.path}


def test_sweep_reports_fid_inception_only_when_set_and_without_resampling(ray_local, tiny_run, weights, tmp_path):
    out = tmp_path / "sweep"

    def cfg(**kw):
        return SweepConfig(checkpoint=str(tiny_run["root"] / "run"), evaluator=tiny_run["evaluator"], out=str(out),
                           w=[1.0], samples_per_w=2, steps=2, k=1, chunk_size=2, num_workers=1,
                           cpus_per_worker=0.5, grid_columns=2, progress=False, **kw)

    plain = run_sweep(cfg(), log=lambda _: None)
    plain_columns = pq.read_table(out / "table.parquet").column_names
    assert "fid_inception" not in plain_columns
    assert "inception_weights_sha256" not in json.loads((out / "sweep.json").read_text())
    assert not list((out / "points").glob("*fid_inception*"))

    with pytest.raises(ConfigError, match=CONFIG_KEY):
        run_sweep(cfg(inception_weights=str(tmp_path / "absent.pth")), log=lambda _: None)

    with_fid = run_sweep(cfg(inception_weights=weights["pth"]), log=lambda _: None)
    assert with_fid.computed == [] and with_fid.skipped == plain.computed  # the stored samples are scored
    table = pq.read_table(out / "table.parquet")
    assert table.column_names == plain_columns + ["fid_inception"]
    rows = table.to_pylist()
    assert [r["kind"] for r in rows] == ["generated", "real_floor"]
    assert all(np.isfinite(r["fid_inception"]) and r["fid_inception"] > 0 for r in rows)
    assert [r["fid"] for r in rows] == [r["fid"] for r in plain.rows]  # the evaluator's columns are unchanged
    records = sorted((out / "points").glob("*.fid_inception-*.json"))
    assert len(records) == 2 and all(json.loads(p.read_text())["n_samples"] == 2 for p in records)
    assert json.loads((out / "sweep.json").read_text())["inception_weights_sha256"] == sha256_file(weights["pth"])

    stamps = {p: p.stat().st_mtime_ns for p in (out / "points").glob("*inception*")}
    assert run_sweep(cfg(inception_weights=weights["pth"]), log=lambda _: None).rows[0]["fid_inception"] == \
        rows[0]["fid_inception"]
    assert {p: p.stat().st_mtime_ns for p in (out / "points").glob("*inception*")} == stamps  # nothing recomputed
