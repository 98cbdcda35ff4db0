"""`ray job submit` against a real 2-node local cluster (head + one more `ray start` node)."""

import re
import sys

import pytest

from cfgd.checkpoint import find_checkpoints
from raycluster import LocalCluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalCluster(tmp_path_factory.mktemp("ray")).start(worker_nodes=1)
    yield c
    c.stop()


def test_job_submit_trains_across_two_nodes(cluster, digits_shards, tmp_path):
    status = cluster.ray("status", f"--address={cluster.address}", timeout=60)
    assert status.returncode == 0, status.stderr[-2000:]
    assert status.stdout.count("node_") >= 2 or "2 node" in status.stdout or status.stdout.count(" node") >= 2

    runs = tmp_path / "runs"
    submit = cluster.submit(
        "--runtime-env", "jobs/runtime_env.yaml",
        "--submission-id", "cfgd-test-train", "--",
        sys.executable, "jobs/train.py", "--config", "jobs/configs/tiny.yaml", f"data.root={digits_shards}",
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
