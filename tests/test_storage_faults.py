"""Object-storage faults, injected on purpose (tests/faultproxy.py between cfgd and S3).

What a fault may cost is a retry or a clear failure, never an artifact recorded as
complete that is not: docs/storage-faults.md has the findings and the rules.
"""

import json
import os
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from cfgd.config import load_config
from cfgd.io import artifact, storage, transfers
from cfgd.io.checkpoint import fetch_checkpoint, load_checkpoint
from cfgd.io.retry import StorageError
from faultproxy import FaultProxy

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def proxy(s3):
    p = FaultProxy(s3.s3_port).start()
    yield p
    p.stop()


def _files(tmp: Path) -> Path:
    d = tmp / "art"
    d.mkdir()
    (d / "weights.bin").write_bytes(os.urandom(300_000))
    (d / "big.bin").write_bytes(os.urandom(12 << 20))  # > arrow's part size: a multipart upload
    (d / artifact.META).write_text("{}")
    return d


def _listing(fs, path: str) -> dict[str, int]:
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return {i.base_name: i.size for i in infos}


@pytest.mark.parametrize("victim", [r"weights\.bin", r"big\.bin\?partNumber=2", r"big\.bin\?uploadId"])
def test_a_cut_upload_is_raised_and_meta_json_never_written(s3, proxy, tmp_path, victim):
    """A single PUT, one part of a multipart upload, or its completion, cut on every try."""
    src = _files(tmp_path)
    fs = storage.arrow_fs("s3://cfgd-test/x", s3.storage_options(endpoint_url=proxy.endpoint_url, retries=2))
    key = f"faults/{victim[:3]}-{time.monotonic_ns()}"
    rule = proxy.cut(rf"(PUT|POST) /cfgd-test/{key}/{victim}", times=1000, sticky=True)
    with pytest.raises(StorageError, match=rf"store .* of cfgd-test/{key}: still failing after 3 attempts"):
        artifact.persist(src, fs, f"cfgd-test/{key}", attempts=3)
    assert len(rule.hits) >= 3
    stored = _listing(fs, f"cfgd-test/{key}")
    assert artifact.META not in stored and set(stored) <= {"weights.bin", "big.bin"}

    # The cause: pyarrow's copy_files (Ray Train's default upload) returns normally
    # while the same cut leaves the file out. Printed, not asserted (pyarrow may fix it).
    rule = proxy.cut(rf"(PUT|POST) /cfgd-test/{key}-arrow/{victim}", times=1000, sticky=True)
    try:
        pafs.copy_files(str(src), f"cfgd-test/{key}-arrow", destination_filesystem=fs)
        outcome = "returned normally"
    except OSError as err:
        outcome = f"raised {type(err).__name__}"
    print(f"pyarrow copy_files with {victim} cut: {outcome}; stored {sorted(_listing(fs, f'cfgd-test/{key}-arrow'))}")


def test_refused_and_stalled_connections_are_ridden_through(s3, proxy, tmp_path):
    src = _files(tmp_path)
    fs = storage.arrow_fs("s3://cfgd-test/x", s3.storage_options(endpoint_url=proxy.endpoint_url, retries=2))
    proxy.refuse(2.0)  # the server "down" for 2 s: every new connection reset
    proxy.stall(r"PUT /cfgd-test/faults/ride/meta\.json", seconds=2.0)  # and a slow server
    t0 = time.monotonic()
    assert artifact.persist(src, fs, "cfgd-test/faults/ride", attempts=5)[-1] == artifact.META
    assert time.monotonic() - t0 >= 2.0
    assert _listing(fs, "cfgd-test/faults/ride") == {p.name: p.stat().st_size for p in src.iterdir()}
    # s3fs (every other cfgd write: shards, sweeps, evaluators, bulk) raises too, naming the URI.
    opts = s3.storage_options(endpoint_url=proxy.endpoint_url, retries=2)
    proxy.cut(r"PUT /cfgd-test/faults/s3fs/meta\.json", times=1000)
    with pytest.raises(StorageError, match="cfgd-test/faults/s3fs"):
        transfers.write_bytes_atomic("s3://cfgd-test/faults/s3fs/meta.json", b"{}", opts)


def test_acknowledged_writes_survive_a_server_restart(s3):
    """SeaweedFS (weed mini) keeps every write it acknowledged across a restart: the
    other suspect of the lost checkpoint object."""
    opts = s3.storage_options()
    payload = {f"s3://cfgd-test/faults/durable/{i:03d}.bin": os.urandom(1000 + i) for i in range(40)}
    for uri, data in payload.items():
        transfers.write_bytes_atomic(uri, data, opts)
    s3.restart()
    for uri, data in payload.items():
        assert transfers.read_bytes(uri, opts) == data, uri


def test_a_checkpoint_cut_mid_upload_is_never_recorded_and_training_resumes_from_a_verified_one(
        s3, proxy, ray_local, digits_shards, capfd):
    """Every try of one checkpoint's weights upload is cut: the worker fails naming the
    store, Ray Train restarts the group (max_failures=1), which resumes from the newest
    *verified* checkpoint; the cut one is never recorded and its leftovers are deleted."""
    from cfgd.train.trainer import fit

    run = f"cut-{time.monotonic_ns()}"
    opts = s3.storage_options(endpoint_url=proxy.endpoint_url)
    cfg = load_config(ROOT / "jobs/configs/tiny.yaml", [
        f"data.root={digits_shards}", "train.storage_path=s3://cfgd-test/faults/runs", f"train.run_name={run}",
        "train.steps=6", "train.checkpoint_every=2", "train.keep_checkpoints=100", "train.max_failures=1",
        f"storage.endpoint_url={proxy.endpoint_url}", f"storage.access_key_id={s3.access_key}",
        f"storage.secret_access_key={s3.secret_key}", "storage.retries=2"])
    # The step-2 checkpoint's weights pass; every try of the step-4 one is cut.
    rule = proxy.cut(rf"PUT /cfgd-test/faults/runs/{run}/checkpoint_[^/ ]+/model\.safetensors", times=1000,
                     skip=1, sticky=True)
    result = fit(cfg)
    assert result.metrics["step"] == 6 and rule.hits, rule.hits
    out = capfd.readouterr()
    assert "still failing after 2 attempts" in out.out + out.err  # the failure named the store
    fs = storage.fsspec_fs("s3://cfgd-test", opts)
    snapshot = json.loads(fs.cat_file(f"cfgd-test/faults/runs/{run}/checkpoint_manager_snapshot.json"))
    committed = [r["checkpoint_dir_name"] for r in snapshot["checkpoint_results"]]
    cut_dir = rule.path.decode().rsplit("/", 2)[-2]
    assert cut_dir not in committed
    steps = sorted(load_checkpoint(fetch_checkpoint(f"s3://cfgd-test/faults/runs/{run}/{name}", opts)).step
                   for name in committed)
    assert steps == [2, 4, 6]  # step 4 again, after resuming from step 2
    assert not fs.exists(f"cfgd-test/faults/runs/{run}/{cut_dir}")  # the partial upload was deleted
