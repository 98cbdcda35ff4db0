"""Evaluation during training on the digits fixture: a real Ray Train run scores its checkpoints
in a Ray task beside the workers, reports the metrics with them, keeps the best by FID and
writes the curve; the scores are those a sweep computes for the same checkpoint."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from cfgd.config import ConfigError, load_config
from cfgd.io.checkpoint import find_checkpoints
from cfgd.sweep.runner import run_sweep
from cfgd.sweep.sweep_grid import SweepConfig
from cfgd.train.checkpoint_eval import metric_key, progress_note, read_records
from builders import tiny_evaluator, write_digits

ROOT = Path(__file__).resolve().parents[1]


def test_checkpoints_are_scored_during_training_and_the_best_fid_is_kept(ray_local, tmp_path):
    digits = write_digits(tmp_path / "digits")
    ev = tiny_evaluator(digits, tmp_path / "evaluator", steps=40)
    runs = tmp_path / "runs"
    args = [f"data.root={digits}", f"train.storage_path={runs}", "train.run_name=watched", "train.steps=6",
            "train.checkpoint_every=2", "train.eval_every=2", "train.keep_checkpoints=1", "train.keep_best_by=fid",
            f"train.evaluator={ev.path}", "train.eval_samples=20", "train.eval_steps=4", "train.eval_w=[0,2]",
            "train.eval_solver=dpm++2m",
            "train.log_every=2", "train.warmup_steps=1", "train.lr=3e-3",
            f"train.ray_address={ray_local.get_runtime_context().gcs_address}"]
    job = [sys.executable, str(ROOT / "jobs/train.py"), "--config", str(ROOT / "jobs/configs/tiny.yaml"), *args]
    proc = subprocess.run(job, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    run = runs / "watched"

    # Every evaluated checkpoint has a record: both w, finite scores, the sweep's sample count.
    records = read_records(str(run))
    assert [r["step"] for r in records] == [2, 4, 6]
    for rec in records:
        assert [row["w"] for row in rec["rows"]] == [0.0, 2.0]
        for row in rec["rows"]:
            assert math.isfinite(row["fid"]) and row["fid"] > 0 and 0 <= row["accuracy"] <= 1
            assert row["n_samples"] == 20
        assert rec["floor"]["fid"] < min(row["fid"] for row in rec["rows"])  # real data beats a 6-step model
    best_fid = {rec["step"]: min(row["fid"] for row in rec["rows"]) for rec in records}
    best_step = min(best_fid, key=best_fid.get)

    # keep_best_by=fid with keep_checkpoints=1: the lowest-FID checkpoint and the newest (Ray keeps it too).
    kept = {step: path for step, path in find_checkpoints(run)}
    assert set(kept) == {best_step, 6}

    # The metrics went to Ray Train with the checkpoints: its snapshot has them for the kept ones.
    snapshot = json.loads((run / "checkpoint_manager_snapshot.json").read_text())
    reported = {r["metrics"]["step"]: r["metrics"] for r in snapshot["checkpoint_results"]}
    assert set(reported) == set(kept) and len(snapshot["validated_checkpoint_dir_names"]) == len(kept)
    for step, metrics in reported.items():
        rec = next(r for r in records if r["step"] == step)
        assert metrics["fid"] == best_fid[step] and metrics["eval_step"] == step
        for row in rec["rows"]:
            assert metrics[metric_key("fid", row["w"])] == row["fid"]
            assert metrics[metric_key("accuracy", row["w"])] == row["accuracy"]

    # The curve: a row per (step, w), and its plot.
    table = pq.read_table(run / "eval.parquet").to_pylist()
    assert [(r["step"], r["w"]) for r in table] == [(s, w) for s in (2, 4, 6) for w in (0.0, 2.0)]
    assert table[0]["fid"] == records[0]["rows"][0]["fid"]
    assert Image.open(run / "eval.png").format == "PNG"

    # What the user saw: one line per evaluation, the best checkpoint, the curve.
    out = proc.stdout
    assert re.findall(r"\[cfgd\.eval\] step (\d+): w=0 FID [\d.]+ acc [\d.]+ \| w=2 FID", out) == ["2", "4", "6"]
    assert f"best evaluated checkpoint: step {best_step}, FID {best_fid[best_step]:.2f}" in out
    assert f"evaluation curve: {run / 'eval.png'}" in out
    assert out.count("(evaluating)") == 3

    # The scores are the sweep's: same rows, seeds, sampler and metrics at the same n.
    sweep = run_sweep(SweepConfig(checkpoint=str(kept[best_step]), evaluator=ev.path, out=str(tmp_path / "sweep"),
                                  w=[0.0, 2.0], samples_per_w=20, solver="dpm++2m", steps=4, seed=0, chunk_size=20,
                                  num_workers=1, cpus_per_worker=0.5, progress=False), log=lambda _: None)
    swept = {r["w"]: r["fid"] for r in sweep.rows if r["kind"] == "generated"}
    rec = next(r for r in records if r["step"] == best_step)
    for row in rec["rows"]:
        assert swept[row["w"]] == pytest.approx(row["fid"], rel=1e-6)


def test_evaluation_settings_are_checked():
    ok = ["train.checkpoint_every=100", "train.eval_every=200", "train.evaluator=ev"]
    load_config(None, ok)
    bad = {("train.eval_every=150",): "train.eval_every=150 is not valid; it must be a multiple of train.checkpoint",
           ("train.evaluator=''",): "train.evaluator='' is not valid",
           ("train.eval_w=[]",): "train.eval_w=[] is not valid",
           ("train.eval_cpus=0",): "train.eval_cpus=0.0 is not valid",
           ("train.eval_steps=5000",): "train.eval_steps=5000 is not valid",
           ("train.eval_solver=euler",): "train.eval_solver='euler' is not valid; it must be one of ['ddim', 'dpm++2m']"}
    for extra, message in bad.items():
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(None, ok + list(extra))
    with pytest.raises(ConfigError, match="train.keep_best_by='fid' is not valid.*train.eval_every"):
        load_config(None, ["train.keep_best_by=fid"])


def test_progress_note_names_the_newest_evaluation():
    m = {"eval_step": 400, "fid": 14.6, "fid_best_w": 2.0, "accuracy_w0": 0.512}
    assert progress_note(m, [0.0, 1.0, 2.0]) == " | eval @400: FID 14.6 (w=2), acc 0.512 (w=0)"
    assert progress_note(None, [1.0]) == ""


def test_learning_rate_warms_up_then_follows_the_schedule():
    from cfgd.train.lr_schedule import learning_rate

    cfg = load_config(None, ["train.lr=1e-3", "train.warmup_steps=100", "train.steps=600"]).train
    assert learning_rate(cfg, 0) == pytest.approx(1e-5) and learning_rate(cfg, 99) == pytest.approx(1e-3)
    assert learning_rate(cfg, 599) == pytest.approx(1e-3)  # constant
    cfg.lr_schedule = "cosine"
    assert learning_rate(cfg, 49) == pytest.approx(5e-4)  # warm-up unchanged
    assert learning_rate(cfg, 100) == pytest.approx(1e-3)
    assert learning_rate(cfg, 350) == pytest.approx(5e-4)  # half-way down
    assert learning_rate(cfg, 600) == pytest.approx(0.0, abs=1e-12) and learning_rate(cfg, 900) == 0.0
    rates = [learning_rate(cfg, s) for s in range(100, 601)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))
