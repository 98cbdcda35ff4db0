"""One artifact format for model checkpoints and evaluators: the same corruption and
truncation cases refused for both, every loaded file listed, specs bounded, and remote
artifacts fetched into a private cache keyed by digest."""

import json
import os
import stat

import pytest
import torch

from cfgd.evaluate.evalnet import EvalNet
from cfgd.evaluate.evaluator import Evaluator, write_evaluator
from cfgd.io import artifact, transfers
from cfgd.io.checkpoint import CheckpointError, fetch_checkpoint, load_checkpoint
from builders import tiny_checkpoint


def _model_ckpt(out, step=3):
    return tiny_checkpoint(out, 0, perturb=False, step=step)


def _evaluator(out):
    torch.manual_seed(0)
    net = EvalNet(1, 10, [8, 16], 32)
    meta = {"arch": {"name": "EvalNet", "in_channels": 1, "num_classes": 10, "widths": [8, 16], "feature_dim": 32},
            "image_shape": [1, 8, 8], "class_names": [str(i) for i in range(10)], "test_accuracy": 0.5}
    return write_evaluator(str(out), net, meta)


KINDS = {"model": (_model_ckpt, lambda p: load_checkpoint(p), "ema.safetensors"),
         "evaluator": (_evaluator, lambda p: Evaluator.load(p), "model.safetensors")}


@pytest.mark.parametrize("kind", KINDS)
def test_truncated_corrupted_or_unlisted_files_are_refused(tmp_path, kind):
    write, load, weights = KINDS[kind]
    path = tmp_path / "a"
    write(path)
    load(path)  # intact
    f = path / weights
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        load(path)
    f.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(ValueError, match="sha256"):
        load(path)
    f.write_bytes(data)
    meta = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps({**meta, "files": {}}))  # would verify nothing
    with pytest.raises(ValueError, match=f"does not list .*{weights}"):
        load(path)
    (path / "meta.json").write_text(json.dumps(meta)[:-5])
    with pytest.raises(ValueError, match="corrupted"):
        load(path)
    (path / "meta.json").unlink()
    with pytest.raises(ValueError, match="meta.json is missing"):
        load(path)


@pytest.mark.parametrize("kind", KINDS)
def test_a_crash_mid_write_keeps_the_previous_artifact(tmp_path, kind, monkeypatch):
    write, load, _ = KINDS[kind]
    path = tmp_path / "a"
    write(path)
    before = sorted(os.listdir(path))

    def crash(*_a, **_k):
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(artifact, "sha256_file", crash)  # fails after the files are staged
    with pytest.raises(RuntimeError):
        artifact.write(str(path), "cfgd-evaluator" if kind == "evaluator" else "cfgd-model",
                       lambda tmp: [(tmp / "x").write_bytes(b"new") and "x"], {}, overwrite=True)
    monkeypatch.undo()
    assert sorted(os.listdir(path)) == before and os.listdir(tmp_path) == ["a"]
    load(path)


def test_a_model_checkpoint_is_not_an_evaluator(tmp_path):
    _model_ckpt(tmp_path / "m")
    with pytest.raises(ValueError, match="not a 'cfgd-evaluator'"):
        Evaluator.load(tmp_path / "m")


@pytest.mark.parametrize("field,value,message", [
    ("num_classes", 10 ** 9, "num_classes=1000000000"), ("image_size", 0, "image_size=0"),
    ("size", "colossal", "model size 'colossal'"), ("in_channels", "1", "in_channels='1'")])
def test_an_absurd_spec_is_refused_before_anything_is_built(tmp_path, field, value, message):
    path = _model_ckpt(tmp_path / "m")
    meta = json.loads((path / "meta.json").read_text())
    meta["model"][field] = value
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_remote_artifacts_are_cached_privately_by_digest(s3, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("CFGD_CACHE", str(cache))
    opts = s3.storage_options()
    uri = "s3://cfgd-test/artifacts/run"
    transfers.upload_dir(str(_model_ckpt(tmp_path / "c1", step=3)), f"{uri}/checkpoint_1", opts)
    first = fetch_checkpoint(uri, opts)
    assert first.parent == cache and stat.S_IMODE(os.stat(cache).st_mode) == 0o700
    assert load_checkpoint(first).step == 3 and fetch_checkpoint(uri, opts) == first  # cache hit
    # The same remote path rewritten with other weights: a new entry, never the stale one.
    transfers.upload_dir(str(_model_ckpt(tmp_path / "c2", step=5)), f"{uri}/checkpoint_1", opts)
    second = fetch_checkpoint(uri, opts)
    assert second != first and load_checkpoint(second).step == 5
    assert not [p for p in cache.iterdir() if p.name.startswith(".fetch-")]  # filled by rename
    with pytest.raises(CheckpointError, match="download cap"):
        artifact.fetch(f"{uri}/checkpoint_1", "cfgd-model", ["ema.safetensors"], opts, max_bytes=1000)
