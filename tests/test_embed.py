"""jobs/embed.py on a real local Ray: every row of the digits shards gets the encoder's
vector in its own row, a job killed mid-split resumes per shard without losing or
repeating rows, a half-done split is never readable as a data set, and training on the
result runs (model.condition=embedding) and samples variations of chosen rows (jobs/sample.py)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from cfgd.data.images import to_uint8
from cfgd.data.shards import read_split_meta
from cfgd.data.split_loader import load_split
from cfgd.embed.encoders import RandomProjection
from cfgd.io.checkpoint import find_checkpoints, load_checkpoint
from builders import write_digits

ROOT = Path(__file__).resolve().parents[1]
ENCODER = ["encoder=cfgd.embed.encoders:RandomProjection", "encoder_args={dim: 8, tokens: 2}"]


def _cmd(script, *args, config=None):
    return [sys.executable, str(ROOT / "jobs" / script), *(["--config", config] if config else []), *map(str, args)]


def _vectors(root, split):
    meta = read_split_meta(str(root), split)
    return np.concatenate([np.stack(pq.read_table(f).column("embedding").to_numpy(zero_copy_only=False))
                           for f in meta.files]), meta


def test_embed_job_writes_every_row_resumes_after_a_kill_and_trains(ray_local, tmp_path):
    data = write_digits(tmp_path / "digits", test=slice(0, 100), rows_per_shard=100)  # 18 train shards
    out = tmp_path / "out"
    address = ray_local.get_runtime_context().gcs_address
    args = [f"data_root={data}", f"out={out}", *ENCODER, "batch_size=25", f"ray_address={address}",
            "cpus_per_actor=0.5"]
    # Kill the job once some shards of train are written, before the split is complete.
    proc = subprocess.Popen(_cmd("embed.py", *args), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    partial = out / ".train.partial"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(list(partial.glob("*.parquet"))) < 2 and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = sorted(p.name for p in partial.glob("*.parquet"))
    assert done_before, "no shard was written before the kill"
    assert not (out / "train").exists()  # a half-done split is not a data set

    rerun = subprocess.run(_cmd("embed.py", *args), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-3000:]
    if len(done_before) < 18:
        assert "done in an earlier run, kept" in rerun.stdout
    vectors, meta = _vectors(out, "train")
    images, labels, _ = load_split(str(out), "train")
    orig_images, orig_labels, _ = load_split(str(data), "train")
    assert meta.num_rows == 1797 and len(vectors) == 1797 and (labels == orig_labels).all()
    assert (images == orig_images).all()
    want = RandomProjection(dim=8, tokens=2)(images.numpy()).reshape(1797, -1)
    np.testing.assert_allclose(vectors, want, atol=1e-5)  # each row its own image's vector, in order
    assert meta.conditions["embedding"]["shape"] == [2, 8]
    assert meta.conditions["embedding"]["encoder"] == "cfgd.embed.encoders:RandomProjection"
    assert not partial.exists()

    runs = tmp_path / "runs"
    train = subprocess.run(_cmd("train.py", f"data.root={out}", "model.condition=embedding",
                                f"train.storage_path={runs}", "train.run_name=emb", "train.steps=2",
                                "train.checkpoint_every=2", f"train.ray_address={address}",
                                config=str(ROOT / "jobs/configs/tiny.yaml")),
                           cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, (train.stdout + train.stderr)[-3000:]
    spec = load_checkpoint(find_checkpoints(runs / "emb")[-1][1]).spec
    assert (spec.condition, spec.embedding_tokens, spec.embedding_dim) == ("embedding", 2, 8)

    # jobs/sample.py: a grid of variations of chosen rows, conditioned on their embeddings.
    def sample(*keys):
        return subprocess.run(_cmd("sample.py", f"sample.checkpoint={runs / 'emb'}", "sample.steps=2",
                                   "sample.per_cell=1", "sample.data_split=test", *keys),
                              cwd=ROOT, capture_output=True, text=True, timeout=300)

    done = sample(f"sample.data_root={out}", "sample.data_rows=[5,0]", f"sample.out={tmp_path / 's'}")
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    npz = np.load(tmp_path / "s" / "samples.npz")
    test_images, _, _ = load_split(str(out), "test")
    assert list(npz["data_rows"]) == [5, 0] and npz["images"].shape == (2 * 3, 8, 8, 1)  # 2 rows × 3 w
    assert (npz["sources"] == to_uint8(test_images[[5, 0]])).all()
    no_column = sample(f"sample.data_root={data}")
    assert no_column.returncode != 0 and "sample.data_root" in no_column.stderr and "no embedding column" in \
        no_column.stderr
    past_end = sample(f"sample.data_root={out}", "sample.data_rows=[100]")
    assert past_end.returncode != 0 and "rows [100]" in past_end.stderr
    wrong_kind = sample(f"sample.data_root={out}", "sample.prompts=[a 3]")
    assert wrong_kind.returncode != 0 and "sample.prompts" in wrong_kind.stderr


def test_embed_job_refuses_a_bad_encoder_naming_it(tmp_path):
    data = write_digits(tmp_path / "digits", test=slice(0, 50))
    for extra, words in [(["encoder=no.such.module:Thing"], "cannot be imported"),
                         (["encoder=cfgd.embed.encoders:RandomProjection", "encoder_args={width: 3}"],
                          "do not fit encoder"),
                         ([f"out={data}"], "other than data_root")]:
        proc = subprocess.run(_cmd("embed.py", f"data_root={data}", f"out={tmp_path / 'o'}", *extra), cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode != 0 and words in proc.stdout + proc.stderr, (extra, proc.stderr[-1500:])
