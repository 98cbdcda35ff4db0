"""The platform against a real S3-compatible server: shards, training, checkpoints and
sampling all through s3:// URIs; credentials from the standard AWS variables."""

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from builders import digits_uint8
from cfgd.config import load_config
from cfgd.io.checkpoint import CheckpointError, fetch_checkpoint, load_checkpoint
from cfgd.io.retry import StorageError
from cfgd.io.storage import fsspec_fs
from cfgd.train.trainer import fit
from faults import crash_after_commit

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "s3://cfgd-test/e2e"


@pytest.fixture(scope="module")
def digits_npz(tmp_path_factory):
    images, labels = digits_uint8()
    images = images[..., 0]
    path = tmp_path_factory.mktemp("npz") / "digits.npz"
    np.savez(path, x_train=images[:1500], y_train=labels[:1500], x_test=images[1500:], y_test=labels[1500:],
             class_names=np.array([f"digit {i}" for i in range(10)]))
    return path


def _job(script, *args, env=None):
    return subprocess.run([sys.executable, str(ROOT / "jobs" / script), "--config", str(ROOT / "jobs/configs/tiny.yaml"),
                           *args], capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)


def test_prepare_train_sample_through_s3(s3, ray_local, digits_npz, tmp_path, capfd):
    env = {**os.environ, **s3.env()}  # credentials and endpoint from the standard AWS variables
    prep = _job("prepare_data.py", "data.source=npz", f"data.source_path={digits_npz}", f"data.root={BUCKET}/data",
                "data.rows_per_shard=500", env=env)
    assert prep.returncode == 0, prep.stderr[-3000:]
    assert "train: 1500 rows of 8x8x1" in prep.stdout
    assert s3.secret_key not in prep.stdout + prep.stderr
    fs = fsspec_fs(BUCKET, s3.storage_options())
    assert len(fs.glob("cfgd-test/e2e/data/train/*.parquet")) == 3

    cfg = load_config(ROOT / "jobs/configs/tiny.yaml", [
        f"data.root={BUCKET}/data", f"train.storage_path={BUCKET}/runs", "train.run_name=s3run",
        "train.steps=6", "train.checkpoint_every=2", "train.keep_checkpoints=2", "train.max_failures=1",
        "train.log_every=2", f"storage.endpoint_url={s3.endpoint_url}",
        f"storage.access_key_id={s3.access_key}", f"storage.secret_access_key={s3.secret_key}"])
    # Rank 0 dies right after its step-4 checkpoint is complete in the bucket, before Ray
    # Train records it (step 2 is recorded). The restarted workers resume at 4, not at the
    # recorded 2, adopt it into Ray's record, and retention then keeps exactly the newest 2.
    # (A rerun of the same command resumes the same way: test_failures, test_resume.)
    marker = tmp_path / "killed"
    capfd.readouterr()
    result = fit(cfg, loop_fn=crash_after_commit(4, marker))
    out = capfd.readouterr().out
    assert marker.exists(), "the fault was not injected"
    assert result.metrics["step"] == 6
    assert "resuming from checkpoint at step 4" in out, out[-3000:]
    assert "checkpoint_unrecorded_4 (step 4, not recorded by Ray Train)" in out
    metas = sorted(p for p in fs.find("cfgd-test/e2e/runs/s3run") if p.endswith("meta.json"))
    # Retention manages the adopted checkpoint like any other: 2 is retired, 4 and 6 remain.
    assert len(metas) == 2 and any("/checkpoint_unrecorded_4/" in p for p in metas), metas
    snapshot = fs.cat_file("cfgd-test/e2e/runs/s3run/checkpoint_manager_snapshot.json").decode()
    assert "checkpoint_unrecorded_4" in snapshot, "the resumed-from checkpoint was not adopted into Ray's record"
    saved_config = fs.cat_file("cfgd-test/e2e/runs/s3run/config.yaml").decode()
    assert "secret_access_key: '***'" in saved_config and s3.secret_key not in saved_config

    local = fetch_checkpoint(f"{BUCKET}/runs/s3run", s3.storage_options())
    assert load_checkpoint(local).step == 6 and load_checkpoint(local).meta["started_at_step"] == 4

    out = tmp_path / "samples"
    sample = _job("sample.py", f"sample.checkpoint={BUCKET}/runs/s3run", "sample.classes=[1,2]", "sample.w=[0,3]",
                  f"sample.out={out}", env=env)
    assert sample.returncode == 0, sample.stderr[-3000:]
    assert np.load(out / "samples.npz")["images"].shape == (4, 8, 8, 1)


def test_missing_bucket_and_wrong_endpoint_fail_fast_with_the_uri(s3):
    opts = [f"storage.endpoint_url={s3.endpoint_url}", f"storage.access_key_id={s3.access_key}",
            f"storage.secret_access_key={s3.secret_key}"]
    cfg = load_config(None, ["data.root=s3://no-such-bucket/data", "train.storage_path=s3://cfgd-test/runs", *opts])
    t0 = time.monotonic()
    with pytest.raises(StorageError, match="no-such-bucket"):
        fit(cfg)
    cfg = load_config(None, ["data.root=s3://cfgd-test/data", "storage.endpoint_url=http://127.0.0.1:9",
                             *opts[1:]])
    with pytest.raises(StorageError, match="endpoint"):
        fit(cfg)
    assert time.monotonic() - t0 < 30


def test_object_store_restart_during_training(s3, ray_local, digits_npz, tmp_path):
    """Restart the S3 server while a run writes checkpoints to it. The run rides through
    (retries) or fails with a message naming the storage; either way every checkpoint
    Ray committed verifies and loads."""
    import json
    import threading

    from cfgd.data.prepare import prepare

    opts = s3.storage_options()
    prepare("npz", str(digits_npz), f"{BUCKET}/restart-data", rows_per_shard=500, storage=opts)
    cfg = load_config(ROOT / "jobs/configs/tiny.yaml", [
        f"data.root={BUCKET}/restart-data", f"train.storage_path={BUCKET}/runs", "train.run_name=restart",
        "train.steps=40", "train.checkpoint_every=4", "train.keep_checkpoints=100",
        f"storage.endpoint_url={s3.endpoint_url}", f"storage.access_key_id={s3.access_key}",
        f"storage.secret_access_key={s3.secret_key}"])
    outcome = {}

    def run():
        try:
            outcome["result"] = fit(cfg)
        except Exception as err:  # noqa: BLE001 - the outcome is asserted below
            outcome["error"] = err

    thread = threading.Thread(target=run)
    thread.start()
    fs = fsspec_fs(BUCKET, opts)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and thread.is_alive():
        if any(p.endswith("meta.json") for p in fs.find("cfgd-test/e2e/runs/restart")):
            break
        time.sleep(0.5)
    s3.restart()
    thread.join(timeout=400)
    assert not thread.is_alive()
    if "error" in outcome:
        message = str(outcome["error"])
        assert "s3" in message.lower() or "storage" in message.lower() or "cfgd-test" in message, message
    else:
        assert outcome["result"].metrics["step"] == 40
    # Ray's record of committed checkpoints; the outage may have kept even the first
    # record from being written, and then nothing counts as committed.
    snapshot_path = "cfgd-test/e2e/runs/restart/checkpoint_manager_snapshot.json"
    committed = []
    if fs.exists(snapshot_path):
        snapshot = json.loads(fs.cat_file(snapshot_path))
        committed = [r["checkpoint_dir_name"] for r in snapshot["checkpoint_results"]]
    if "result" in outcome:
        assert committed
    for name in committed:
        local = fetch_checkpoint(f"{BUCKET}/runs/restart/{name}", opts)
        assert load_checkpoint(local).step > 0
    # Whatever else the outage left in the bucket, resolving the run gives a verified
    # checkpoint, or a clear refusal when no upload completed at all.
    try:
        newest = load_checkpoint(fetch_checkpoint(f"{BUCKET}/runs/restart", opts)).step
    except CheckpointError:
        assert "error" in outcome and not committed
        newest = None
    print(f"object-store restart: {'rode through' if 'result' in outcome else 'failed cleanly'}; "
          f"{len(committed)} committed checkpoints all load; newest verified step {newest}")
