"""The README's "Running on a Ray cluster" block, run as written: `bash scripts/cluster.sh up`
(a real 2-node cluster: head + one more `ray start` node), `ray job submit` of the training
job, `ray job list/status/logs`, `bash scripts/cluster.sh down`.

Only the dashboard port (the cluster runs on free ports and its own session directory, so
that it meets no other Ray on this machine) and the `<submission id>` placeholder are
substituted; the submit line gets a tiny setup appended (later overrides win).
"""

import os
import re
import shutil
import socket
import subprocess
import tempfile

import pytest

import readme
from cfgd.io.checkpoint import find_checkpoints

SECTION = "Running on a Ray cluster"
README_DASHBOARD = "127.0.0.1:8265"


def _free_ports(n: int) -> list[int]:
    """n distinct free ports: the sockets stay bound until all are chosen (one at a time,
    the kernel may hand out the same port twice)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _cluster_processes(ray_dir: str) -> list[str]:
    ps = subprocess.run(["ps", "-eo", "stat=,args="], capture_output=True, text=True).stdout
    return [line for line in ps.splitlines() if ray_dir + "/" in line and not line.startswith("Z")]


@pytest.fixture(scope="module")
def cluster():
    """The README's first and last commands bring the cluster up and down."""
    if not (readme.ROOT / ".venv/bin/ray").exists():
        pytest.skip("the README's cluster commands use the checkout's .venv: run scripts/setup.sh "
                    "(scripts/test.sh does)")
    cmds = readme.commands(SECTION)
    assert cmds[0] == "bash scripts/cluster.sh up" and cmds[-1] == "bash scripts/cluster.sh down", cmds
    # Short: the session's socket paths must stay under the 107-byte AF_UNIX limit.
    ray_dir = tempfile.mkdtemp(prefix="cfgd-ray-", dir="/tmp")
    gcs_port, dashboard_port = _free_ports(2)
    dashboard = f"127.0.0.1:{dashboard_port}"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a fresh terminal's
    env.update(CFGD_RAY_PORT=str(gcs_port), CFGD_DASHBOARD_PORT=str(dashboard_port),
               CFGD_RAY_DIR=ray_dir)
    shell = readme.Shell(env)
    up = shell.run(cmds[0], timeout=300)
    try:
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        yield {"shell": shell, "commands": cmds[1:-1], "dashboard": dashboard, "ray_dir": ray_dir}
    finally:
        down = shell.run(cmds[-1], timeout=120)
        assert down.returncode == 0, down.stdout + down.stderr
        assert not _cluster_processes(ray_dir), "cluster.sh down left processes of its cluster running"
        shutil.rmtree(ray_dir, ignore_errors=True)


def test_readme_cluster_commands_train_across_two_nodes(cluster, digits_shards, tmp_path):
    shell, dashboard = cluster["shell"], cluster["dashboard"]
    runs = tmp_path / "runs"
    tiny = (f"data.root={digits_shards} train.storage_path={runs} model.size=tiny diffusion.timesteps=100 "
            "train.batch_size=32 train.steps=4 train.checkpoint_every=2 train.log_every=1")
    submission = None
    ran = []
    for cmd in cluster["commands"]:
        line = cmd.replace(README_DASHBOARD, dashboard)
        if submission:
            line = line.replace("<submission id>", submission)
        if line.startswith("ray job submit"):
            line = f"{line} {tiny}"
        proc = shell.run(line)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"README command failed: {line}\n{out[-4000:]}"
        ran.append(cmd.split(" --")[0])
        if line.startswith("ray job submit"):
            submission = _check_submit(out)
        elif line.startswith("ray job list"):
            assert submission in out
        elif line.startswith("ray job status"):
            assert f"Job '{submission}' succeeded" in out, out
        elif line.startswith("ray job logs"):
            assert out.count("[cfgd.train] step 4/4") == 1
    assert ran == ["export RAY_AUTH_MODE=token", "source .venv/bin/activate", "ray job submit",
                   "ray job list", "ray job status", "ray job logs"]
    assert [s for s, _ in find_checkpoints(runs / "cluster_demo")] == [2, 4]
    nodes = shell.run(f"ray status --address={dashboard.rsplit(':', 1)[0]}:{shell.env['CFGD_RAY_PORT']}")
    assert nodes.returncode == 0 and nodes.stdout.count("node_") >= 2, nodes.stdout + nodes.stderr


def _check_submit(out: str) -> str:
    """Checks the output of the submit line; returns the job's submission id."""
    assert "succeeded" in out.lower(), out[-4000:]
    # The job ran in the checkout's virtualenv (cluster.sh puts it first on the nodes' PATH).
    assert "ModuleNotFoundError" not in out, out[-4000:]
    nodes = dict(re.findall(r"worker (\d)/2 on node (\w+)", out))
    assert set(nodes) == {"0", "1"} and nodes["0"] != nodes["1"], "the two workers ran on different nodes"
    # One copy of each worker line: every node has its own session directory, so no two
    # log monitors forward the same worker log.
    for step in range(1, 5):
        assert out.count(f"[cfgd.train] step {step}/4 ") == 1, out[-4000:]
    assert out.count("[cfgd.train] checkpoint at step 4") == 1
    # The uploaded working dir excludes data, outputs, the virtualenv and .git.
    for size in re.findall(r"_ray_pkg_\w+\.zip.*?\(([\d.]+)MiB\)", out):
        assert float(size) < 5
    return re.search(r"Job '(\w+)' succeeded", out).group(1)

