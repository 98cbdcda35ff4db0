"""Ray Train end to end on a real local Ray: Parquet shards → 2 DDP workers → checkpoints → samples.

Resuming (a rerun, a restarted worker group, a checkpoint Ray had not recorded) is
tested in test_failures.py, test_resume.py and test_s3_pipeline.py.
"""

import subprocess
import sys

import numpy as np

from cfgd.checkpoint import find_checkpoints, load_checkpoint
from cfgd.config import load_config
from cfgd.train import fit, run_dir

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def _cfg(root, runs, steps):
    return load_config(ROOT / "jobs/configs/tiny.yaml", [
        f"data.root={root}", f"train.storage_path={runs}", "train.run_name=resume_test",
        f"train.steps={steps}", "train.checkpoint_every=2", "train.keep_checkpoints=3"])


def test_two_workers_write_checkpoints_and_the_sampling_job_reads_them(ray_local, digits_shards, tmp_path, capfd):
    runs = tmp_path / "runs"
    first = fit(_cfg(digits_shards, runs, steps=4))
    assert first.metrics["step"] == 4
    found = find_checkpoints(run_dir(_cfg(digits_shards, runs, 4).train))
    assert [s for s, _ in found] == [2, 4]
    ck = load_checkpoint(found[-1][1], with_optimizer=True)
    assert ck.meta["started_at_step"] == 0 and ck.spec.image_size == 8 and ck.spec.num_classes == 10
    assert ck.meta["world_size"] == 2
    assert ck.optimizer_state["state"], "optimizer state is saved"

    assert "starting a new run" in capfd.readouterr().out

    # The sampling job, as a user runs it, on the run directory's newest checkpoint.
    out = tmp_path / "samples"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "jobs/sample.py"), "--config", str(ROOT / "jobs/configs/tiny.yaml"),
         f"sample.checkpoint={runs / 'resume_test'}", "sample.classes=[0,3]", "sample.w=[0,2]",
         "sample.per_cell=2", f"sample.out={out}"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"grid: {out / 'grid.png'}" in proc.stdout
    npz = np.load(out / "samples.npz")
    assert npz["images"].shape == (8, 8, 8, 1) and npz["images"].dtype == np.uint8
    assert npz["labels"].tolist() == [0, 0, 0, 0, 3, 3, 3, 3]
    assert npz["w"].tolist() == [0, 0, 2, 2] * 2
    assert npz["guidance_scale"].tolist() == [1, 1, 3, 3] * 2
    # Common random numbers: the same seeds in every w column.
    assert npz["seeds"].tolist() == [0, 1, 0, 1, 6, 7, 6, 7]
