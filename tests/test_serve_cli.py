"""The README's serve command as a user runs it: started, serving, and stopped by Ctrl-C."""

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request

import pytest
import readme
from builders import tiny_checkpoint
from cfgd.data.sources import FASHION_MNIST_CLASSES


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_ctrl_c_stops_the_readme_serve_command_within_seconds(tmp_path):
    """A copy of the checkout's serving files (the config names outputs/runs/fashion_mnist_demo,
    which a fresh clone does not have: a tiny checkpoint stands in) runs the README line;
    SIGINT to its process group is what Ctrl-C in a terminal sends."""
    if not (readme.ROOT / ".venv/bin/serve").exists():
        pytest.skip("needs the checkout's .venv (scripts/setup.sh)")
    if not _port_free(8000):
        pytest.skip("port 8000 (serve/config.yaml's) is in use")
    (command,) = [c for c in readme.commands("Serving (Ray Serve)") if "serve.sh" in c]
    for part in ("scripts", "serve"):
        shutil.copytree(readme.ROOT / part, tmp_path / part)
    os.symlink(readme.ROOT / ".venv", tmp_path / ".venv")
    tiny_checkpoint(tmp_path / "outputs/runs/fashion_mnist_demo/checkpoint_0", seed=1,
                    overrides=["diffusion.timesteps=100"], label_names=FASHION_MNIST_CLASSES)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(["bash", "-c", command], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                if b"ok" in urllib.request.urlopen("http://127.0.0.1:8000/healthz", timeout=2).read():
                    break
            except OSError:
                time.sleep(1)
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-2000:]
        else:
            raise AssertionError("the app did not come up: " + (tmp_path / "serve.log").read_text()[-2000:])
        t0 = time.time()
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
        took = time.time() - t0
        print(f"Ctrl-C: `{command}` exited {proc.returncode} after {took:.1f} s")
        assert took < 30 and _port_free(8000)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
