"""`ray job submit` against a real 2-node local cluster (head + one more `ray start` node)."""

import re
import sys

import numpy as np
import pytest
from sklearn.datasets import load_digits

from cfgd.checkpoint import find_checkpoints
from cfgd.data import write_shards
from raycluster import LocalCluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalCluster(tmp_path_factory.mktemp("ray")).start(worker_nodes=1)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    root = tmp_path_factory.mktemp("digits")
    write_shards(str(root), "train", images, d.target, [str(i) for i in range(10)], rows_per_shard=300)
    return root


def test_job_submit_trains_across_two_nodes(cluster, shards, tmp_path):
    status = cluster.ray("status", f"--address={cluster.address}", timeout=60)
    assert status.returncode == 0, status.stderr[-2000:]
    assert status.stdout.count("node_") >= 2 or "2 node" in status.stdout or status.stdout.count(" node") >= 2

    runs = tmp_path / "runs"
    submit = cluster.submit(
        "--runtime-env", "jobs/runtime_env.yaml",
        "--submission-id", "cfgd-test-train", "--",
        sys.executable, "jobs/train.py", "--config", "jobs/configs/tiny.yaml", f"data.root={shards}",
        f"train.storage_path={runs}", "train.run_name=cluster", "train.steps=4", "train.checkpoint_every=2",
        "train.placement_strategy=SPREAD")
    out = submit.stdout + submit.stderr
    assert submit.returncode == 0, out[-4000:]
    assert "succeeded" in out.lower()
    nodes = dict(re.findall(r"worker (\d)/2 on node (\w+)", out))
    assert set(nodes) == {"0", "1"} and nodes["0"] != nodes["1"], "the two workers ran on different nodes"
    # The uploaded working dir excludes data, outputs, the virtualenv and .git.
    size = re.search(r"Uploading package gcs://_ray_pkg_\w+\.zip.*?\(([\d.]+)MiB\)", out) or \
        re.search(r"_ray_pkg_\w+\.zip \(([\d.]+)MiB\)", out)
    if size:
        assert float(size.group(1)) < 5

    status = cluster.ray("job", "status", f"--address={cluster.dashboard}", "cfgd-test-train", timeout=60)
    assert "succeeded" in (status.stdout + status.stderr).lower()
    logs = cluster.ray("job", "logs", f"--address={cluster.dashboard}", "cfgd-test-train", timeout=60)
    assert "step 4/4" in logs.stdout
    assert [s for s, _ in find_checkpoints(runs / "cluster")] == [2, 4]
