"""Ray Train end to end on a real local Ray, as a user runs the main job: ``jobs/train.py``
(Parquet shards → 2 DDP workers → checkpoints) then ``jobs/sample.py`` (the labelled grid),
each a subprocess, and what they print: a short story on the console, Ray's output in
the log file they name.

Resuming (a rerun, a restarted worker group, a checkpoint Ray had not recorded) is
tested in test_failures.py, test_resume.py and test_s3_pipeline.py.
"""

import re
import subprocess
import sys

import numpy as np
from PIL import Image

from cfgd.io.checkpoint import find_checkpoints, load_checkpoint
from cfgd.sampling.tiles import zoom_for

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
MAX_LINES = 60  # the console story of train + sample on the tiny config


def _job(script, *args):
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / script), "--config", str(ROOT / "jobs/configs/tiny.yaml"),
                           *map(str, args)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc


def test_train_and_sample_jobs_write_checkpoints_a_labelled_grid_and_a_short_story(ray_local, digits_shards,
                                                                                     tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "samples"
    # The train job joins this session's Ray (as under `ray job submit`), which saves starting one.
    train = _job("train.py", f"data.root={digits_shards}", f"train.storage_path={runs}", "train.run_name=resume_test",
                 "train.steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=3", "train.log_every=2",
                 f"train.ray_address={ray_local.get_runtime_context().gcs_address}",
                 "--log-file", tmp_path / "train.log")
    found = find_checkpoints(runs / "resume_test")
    assert [s for s, _ in found] == [2, 4]
    ck = load_checkpoint(found[-1][1], with_optimizer=True)
    assert ck.meta["started_at_step"] == 0 and ck.spec.image_size == 8 and ck.spec.num_classes == 10
    assert ck.meta["world_size"] == 2
    assert ck.optimizer_state["state"], "optimizer state is saved"

    # The sampling job, as a user runs it, on the run directory's newest checkpoint.
    sample = _job("sample.py", f"sample.checkpoint={runs / 'resume_test'}", "sample.classes=[0,3]", "sample.w=[0,2]",
                  "sample.per_cell=2", f"sample.out={out}", "--log-file", tmp_path / "sample.log")
    npz = np.load(out / "samples.npz")
    assert npz["images"].shape == (8, 8, 8, 1) and npz["images"].dtype == np.uint8
    assert npz["labels"].tolist() == [0, 0, 0, 0, 3, 3, 3, 3]
    assert npz["w"].tolist() == [0, 0, 2, 2] * 2
    assert npz["guidance_scale"].tolist() == [1, 1, 3, 3] * 2
    # Common random numbers: the same seeds in every w column.
    assert npz["seeds"].tolist() == [0, 1, 0, 1, 6, 7, 6, 7]
    # The grid: 8 px images magnified to >= 84 px, class names on the left, w above the columns.
    zoom = zoom_for(8)
    grid = np.asarray(Image.open(out / "grid.png").convert("L"))
    body_h, body_w = zoom * (2 * (8 + 6) - 6), zoom * (2 * (2 * (8 + 2) - 2 + 6) - 6)
    top, left = grid.shape[0] - body_h, grid.shape[1] - body_w
    assert top > 0 and left > 0, grid.shape
    assert np.array_equal(grid[top:top + zoom * 8, left:left + zoom * 8],  # first cell: sample 0, magnified
                          np.kron(npz["images"][0, ..., 0], np.ones((zoom, zoom), np.uint8)))

    # What the user sees: the story, every line once, no Ray start-up or framework warnings.
    console = train.stdout + train.stderr + sample.stdout + sample.stderr
    lines = console.replace("\r", "\n").splitlines()
    assert len(lines) <= MAX_LINES, console
    assert re.findall(r"\[cfgd\.train\] step (\d+)/4 .* samples/s ETA \d+:\d\d:\d\d", train.stdout) == ["2", "4"]
    assert train.stdout.count("checkpoint at step") == 2 and train.stdout.count("starting a new run") == 1
    assert f"grid: {out / 'grid.png'}" in sample.stdout
    for noise in ("RayTrainWorker", "TrainController", "WARNING", "Warning", "Grad strides"):
        assert noise not in console, noise
    log = (tmp_path / "train.log").read_text()
    assert f"log: {tmp_path / 'train.log'}" in train.stdout
    assert "(RayTrainWorker pid=" in log and "resolved config:" in log
    assert "Grad strides do not match bucket view strides" not in log  # DDP's layout warning (cfgd.model.unet)
