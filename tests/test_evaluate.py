"""Evaluation network and metrics: closed forms, a real tiny evaluator, checkpoint round trips."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from cfgd.config import ConfigError
from cfgd.config import load_structured
from cfgd.data.split_loader import load_split
from cfgd.evaluate.evaluator import Evaluator, RealSplit
from cfgd.evaluate.evaluator_config import EvaluatorConfig
from cfgd.evaluate.evaluator_training import accuracy_of, train_evaluator
from cfgd.evaluate.metrics import conditional_accuracy, fid, frechet_distance, inception_score, knn_radii, precision_recall
from builders import tiny_evaluator, write_digits


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return write_digits(tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="module")
def evaluator(digits, tmp_path_factory):
    return tiny_evaluator(digits, tmp_path_factory.mktemp("ev") / "evaluator")


# ------------------------------------------------------------------ FID


def test_fid_of_a_set_with_itself_is_zero():
    x = np.random.default_rng(0).normal(size=(500, 16)) @ np.random.default_rng(1).normal(size=(16, 16))
    assert abs(fid(x, x)) < 1e-8


def test_fid_of_a_shifted_set_is_the_squared_shift_and_grows_with_it():
    x = np.random.default_rng(0).normal(size=(400, 8))
    direction = np.ones(8) / np.sqrt(8)
    values = [fid(x, x + s * direction) for s in (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)]
    # Equal covariances: only the mean term remains, exactly ‖shift‖².
    assert np.allclose(values, [0.0, 0.0625, 0.25, 1.0, 4.0, 16.0], atol=1e-8)
    assert all(a < b for a, b in zip(values, values[1:]))
    y = np.random.default_rng(5).normal(size=(400, 8))
    noisy = [fid(y, x + s * direction) for s in (0.0, 1.0, 2.0, 4.0)]
    assert all(a < b for a, b in zip(noisy, noisy[1:]))


def test_frechet_distance_matches_the_sqrtm_formula():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(10, 10)), rng.normal(size=(10, 10))
    s1, s2 = a @ a.T + 0.1 * np.eye(10), b @ b.T + 0.1 * np.eye(10)
    mu1, mu2 = rng.normal(size=10), rng.normal(size=10)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    expected = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1 + s2 - 2 * covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_fid_is_finite_for_rank_deficient_covariances():
    # Fewer samples than dimensions: singular covariances, where sqrtm needs an eps offset.
    x = np.random.default_rng(0).normal(size=(20, 64))
    y = np.random.default_rng(1).normal(size=(20, 64))
    assert np.isfinite(fid(x, y)) and fid(x, y) > 0
    assert abs(fid(x, x)) < 1e-6


# ------------------------------------------------------------------ IS, accuracy, precision/recall


def test_inception_score_of_confident_predictions_is_the_number_of_classes():
    probs = np.eye(10)[np.arange(1000) % 10]
    assert inception_score(probs) == pytest.approx((10.0, 0.0))
    assert inception_score(np.eye(10)[np.zeros(100, int)])[0] == pytest.approx(1.0)
    assert inception_score(np.full((50, 4), 0.25))[0] == pytest.approx(1.0)  # uncertain: 1 as well
    mean, std = inception_score(probs, splits=5)
    assert mean == pytest.approx(10.0) and std == pytest.approx(0.0)
    probs3 = np.eye(5)[np.arange(300) % 3]  # 3 of 5 classes used
    assert inception_score(probs3)[0] == pytest.approx(3.0)


def test_conditional_accuracy_counts_argmax_matches():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    assert conditional_accuracy(probs, np.array([0, 1, 1, 1])) == 0.75


def test_precision_recall_of_a_set_with_itself_is_one_and_of_far_sets_zero():
    x = np.random.default_rng(0).normal(size=(300, 5))
    assert precision_recall(x, x, k=3, chunk=64) == (1.0, 1.0)
    assert precision_recall(x, x + 100.0, k=3) == (0.0, 0.0)
    # A tight fake set inside the real cloud: precise, but it covers little of it.
    p, r = precision_recall(x, 0.05 * np.random.default_rng(1).normal(size=(300, 5)), k=3)
    assert p > 0.9 and r < 0.2


def test_knn_radii_on_a_line():
    x = np.arange(6, dtype=float)[:, None]
    assert knn_radii(x, k=1).tolist() == [1, 1, 1, 1, 1, 1]
    assert knn_radii(x, k=2).tolist() == [2, 1, 1, 1, 1, 2]


# ------------------------------------------------------------------ the evaluator


def test_evaluator_accuracy_on_real_test_data_equals_the_direct_accuracy(evaluator, digits):
    x, y, meta = load_split(str(digits), "test")
    emb = evaluator.embed(x)
    assert emb.features.shape == (600, 32) and emb.probs.shape == (600, 10)
    assert np.allclose(emb.probs.sum(1), 1.0)
    direct = accuracy_of(evaluator.net, x, y)
    assert conditional_accuracy(emb.probs, y) == direct == evaluator.test_accuracy
    assert direct > 0.5  # a few dozen steps already beat chance by far on digits
    # The uint8 path (how samples are scored) gives the same features as the float path.
    u8 = np.round((x.permute(0, 2, 3, 1).numpy() + 1) * 127.5).astype(np.uint8)
    assert np.allclose(evaluator.embed(u8).features, emb.features, atol=1e-4)


def test_floor_halves_of_real_data(evaluator, digits):
    x, y, _ = load_split(str(digits), "test")
    split = RealSplit.of(evaluator.embed(x), y, seed=0)
    assert len(split.held_out) == 300 and len(split.reference) == 300
    floor = split.floor(100)
    assert floor["accuracy"] == conditional_accuracy(split.held_out.probs[:100], split.held_out_labels[:100])
    assert 0 < floor["fid"] < fid(split.held_out.features[:100], split.reference.features + 1.0)
    assert 0.5 < floor["precision"] <= 1 and 0.5 < floor["recall"] <= 1


def test_evaluator_checkpoint_describes_itself_and_refuses_corruption(evaluator, tmp_path, digits):
    meta = json.loads((Path(evaluator.path) / "meta.json").read_text())
    assert meta["arch"]["feature_dim"] == 32 and meta["image_shape"] == [1, 8, 8]
    assert meta["class_names"] == [str(i) for i in range(10)] and 0 <= meta["test_accuracy"] <= 1
    again = Evaluator.load(evaluator.path)
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    assert np.array_equal(again.embed(x).features, evaluator.embed(x).features)
    copy = tmp_path / "copy"
    shutil.copytree(evaluator.path, copy)
    data = (copy / "model.safetensors").read_bytes()
    (copy / "model.safetensors").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(ValueError, match="corrupted"):
        Evaluator.load(copy)
    with pytest.raises(ValueError, match="expects images"):
        evaluator.embed(torch.zeros(2, 1, 28, 28))


def test_evaluator_round_trip_through_s3(s3, digits, evaluator):
    from cfgd.evaluate.evaluator import write_evaluator

    uri = "s3://cfgd-test/evaluators/digits"
    write_evaluator(uri, evaluator.net, {k: v for k, v in evaluator.meta.items() if k not in ("files",)},
                    s3.storage_options())
    loaded = Evaluator.load(uri, s3.storage_options())
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    assert np.array_equal(loaded.embed(x).probs, evaluator.embed(x).probs)
    assert loaded.sha256 == evaluator.sha256
    with pytest.raises(ValueError, match="refusing to overwrite"):
        write_evaluator(uri, evaluator.net, evaluator.meta, s3.storage_options())


def test_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ConfigError, match="epoch"):
        load_structured(EvaluatorConfig, None, ["epoch=3"])
    cfg = load_structured(EvaluatorConfig, None, ["epochs=3", "storage.region=eu-west-1"])
    assert cfg.epochs == 3 and cfg.storage.region == "eu-west-1"
    from cfgd.evaluate.evaluator_config import validate_evaluator_config

    with pytest.raises(ConfigError, match="batch_size"):
        validate_evaluator_config(load_structured(EvaluatorConfig, None, ["batch_size=1"]))


def test_random_shift_moves_each_image_by_at_most_the_bound_and_keeps_its_content():
    from cfgd.evaluate.evalnet import random_shift

    x = -torch.ones(64, 1, 8, 8)
    x[:, 0, 3, 4] = 1.0  # one bright pixel per image
    out = random_shift(x, 2, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and torch.equal(random_shift(x, 0, torch.Generator()), x)
    where = (out[:, 0] == 1.0).nonzero()
    assert len(where) == 64  # the pixel survives in every image (a shift, not a blur)
    dy, dx = where[:, 1] - 3, where[:, 2] - 4
    assert dy.abs().max() <= 2 and dx.abs().max() <= 2 and len(set(zip(dy.tolist(), dx.tolist()))) > 10


def test_a_judge_of_another_architecture_trains_loads_and_embeds(digits, tmp_path):
    from cfgd.evaluate.evalnet import JudgeNet

    cfg = EvaluatorConfig(data_root=str(digits), out=str(tmp_path / "judge"), arch="judgenet", widths=[8, 16],
                          feature_dim=24, epochs=8, max_steps=150, batch_size=64, lr=1e-2, seed=1, augment_shift=1)
    judge, _ = train_evaluator(cfg, log=lambda _: None)
    again = Evaluator.load(tmp_path / "judge")
    assert isinstance(again.net, JudgeNet) and again.meta["arch"]["name"] == "JudgeNet"
    assert again.test_accuracy > 0.5  # far above chance (0.1) on real test digits
    x, _, _ = load_split(str(digits), "test")
    assert again.embed(x[:10]).features.shape == (10, 24)
    with pytest.raises(ConfigError, match="arch"):
        train_evaluator(EvaluatorConfig(data_root=str(digits), out=str(tmp_path / "x"), arch="vgg"))
