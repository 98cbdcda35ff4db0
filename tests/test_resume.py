"""The resume point (cfgd.train.resume) over real files: a local run directory and a real S3
server. Checkpoints are written the way training writes them; "recorded" is the set of
paths Ray Train's controller knows, as the training loop passes it."""

from __future__ import annotations

import pyarrow.fs as pafs
import pytest
import torch

from cfgd.config import Config, to_dict
from cfgd.io import storage
from cfgd.io.checkpoint import META, WEIGHTS, write_checkpoint
from cfgd.model.unet import ModelSpec, build_model
from cfgd.train import resume


def _write(tmp_path, step: int):
    torch.manual_seed(step)
    model = build_model(ModelSpec("tiny", 8, 1, 10))
    opt = torch.optim.AdamW(model.parameters())
    return write_checkpoint(tmp_path / f"src-{step}", model_state=model.state_dict(), ema_state=model.state_dict(),
                            optimizer_state=opt.state_dict(), spec=model.spec,
                            label_names=[str(i) for i in range(10)], step=step, epoch=0,
                            config=to_dict(Config()), extra={"metrics": {"step": step, "loss": 1.0 / step}})


def _truncate(local_dir):
    f = local_dir / WEIGHTS[1]
    f.write_bytes(f.read_bytes()[:-100])


@pytest.fixture(params=["local", "s3"])
def run(request, tmp_path):
    """(filesystem, run path, put(step, name, corrupt=False) -> path on fs)."""
    if request.param == "local":
        fs, base = pafs.LocalFileSystem(), str(tmp_path / "run")
    else:
        s3 = request.getfixturevalue("s3")
        uri = f"s3://cfgd-test/resume/{request.node.name.replace('[', '-').rstrip(']')}"
        fs, base = storage.arrow_fs(uri, s3.storage_options()), storage.arrow_path(uri)
    fs.create_dir(base)

    def put(step: int, name: str, corrupt: bool = False) -> str:
        src = _write(tmp_path, step)
        if corrupt:
            _truncate(src)
        dest = f"{base}/{name}"
        fs.create_dir(dest)
        pafs.copy_files(str(src), dest, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        return dest

    return fs, base, put


def test_the_newest_verified_checkpoint_wins_recorded_or_not(run, tmp_path):
    fs, base, put = run
    c20 = put(20, "checkpoint_2026-01-01_00-00-20.000000")
    c40 = put(40, "checkpoint_2026-01-01_00-00-40.000000")  # complete, but Ray did not record it
    point = resume.choose(fs, base, recorded={c20})
    assert point.chosen.path.rstrip("/") == c40 and not point.chosen.recorded
    assert point.checkpoint.step == 40 and point.checkpoint.optimizer_state["param_groups"]
    assert point.checkpoint.meta["metrics"]["loss"] == pytest.approx(1 / 40)
    assert any("not recorded" in line and "step 40" in line and "step 20" in line for line in point.explain())
    assert resume.stale(point) == []  # nothing else unrecorded


def test_a_corrupted_newest_unrecorded_checkpoint_falls_back_and_says_so(run):
    fs, base, put = run
    c20 = put(20, "checkpoint_a")
    c40 = put(40, "checkpoint_b")
    c60 = put(60, "checkpoint_c", corrupt=True)  # truncated upload, never recorded
    put(80, "checkpoint_d")
    fs.delete_file(f"{base}/checkpoint_d/{META}")  # interrupted before meta.json
    point = resume.choose(fs, base, recorded={c20, c40})
    assert point.checkpoint.step == 40 and point.chosen.recorded
    why = "\n".join(point.explain())
    assert "step 60" in why and "truncated" in why, why
    assert "checkpoint_d" in why and META in why, why
    stale = {c.path.rstrip("/") for c in resume.stale(point)}
    assert stale == {c60, f"{base}/checkpoint_d"}
    resume.delete(fs, resume.stale(point))
    left = resume.list_candidates(fs, base, {c20, c40})
    assert [c.step for c in left] == [40, 20]  # recorded directories are Ray's to delete


def test_nothing_verifies_means_a_new_run(run):
    fs, base, put = run
    put(20, "checkpoint_x", corrupt=True)
    point = resume.choose(fs, base, recorded=set())
    assert point.checkpoint is None and point.chosen is None
    assert any("starting from step 0" in line for line in point.explain())
    empty = resume.choose(fs, base + "/missing", recorded=set())
    assert empty.checkpoint is None and empty.candidates == []


def test_a_recorded_checkpoint_that_does_not_verify_is_not_used(run):
    fs, base, put = run
    c20 = put(20, "checkpoint_1")
    c40 = put(40, "checkpoint_2", corrupt=True)
    point = resume.choose(fs, base, recorded={c20, c40})
    assert point.checkpoint.step == 20
    assert resume.stale(point) == []  # a recorded one is never deleted by us, even if bad
