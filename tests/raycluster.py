"""A real multi-node Ray cluster on this machine: `ray start --head` plus worker nodes.

Each node is its own set of processes with its own resources. Token authentication
stays on (the Ray 2.60 default for `ray start`), so every client gets
RAY_AUTH_MODE=token in its environment. Only this cluster's processes are stopped
at the end (`ray stop` would stop every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

RAY = str(Path(sys.executable).with_name("ray"))


def free_port(lo: int = 20000, hi: int = 30000) -> int:
    """A free TCP port outside Ray's default worker port range (10002–19999)."""
    for port in range(lo + os.getpid() % 5000, hi):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port")


def client_env() -> dict[str, str]:
    return {**os.environ, "RAY_AUTH_MODE": "token", "RAY_DISABLE_USAGE_STATS": "1"}


class LocalCluster:
    def __init__(self, temp_dir: Path):
        self.temp_dir = Path(temp_dir)
        self.port = free_port()
        self.dashboard_port = free_port(30000, 40000)
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"

    def _ray_start(self, *args: str) -> None:
        proc = subprocess.run([RAY, "start", "--node-ip-address=127.0.0.1", "--disable-usage-stats", *args],
                              env=client_env(), capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"ray start {' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")

    def start(self, worker_nodes: int = 1) -> "LocalCluster":
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        self._ray_start("--head", f"--port={self.port}", "--num-cpus=2", "--dashboard-host=127.0.0.1",
                        f"--dashboard-port={self.dashboard_port}", f"--temp-dir={self.temp_dir}",
                        "--object-store-memory=400000000")
        for i in range(worker_nodes):
            self._ray_start(f"--address={self.address}", "--num-cpus=1",
                            f"--resources={json.dumps({f'node{i + 2}': 1})}", "--object-store-memory=300000000")
        return self

    def _processes(self) -> list[psutil.Process]:
        marks = (str(self.temp_dir), f"127.0.0.1:{self.port}", f"--port={self.dashboard_port}")
        found = {}
        for p in psutil.process_iter(["cmdline"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if any(m in cmd for m in marks):
                found[p.pid] = p
                for c in p.children(recursive=True):
                    found[c.pid] = c
        return list(found.values())

    def stop(self) -> None:
        procs = self._processes()
        for p in procs:
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=15)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)

    def submit(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        """`ray job submit` with retries while the head's job agent is still starting."""
        deadline = time.monotonic() + 90
        while True:
            proc = self.ray("job", "submit", f"--address={self.dashboard}", *args, timeout=timeout)
            if "No available agent" not in proc.stderr or time.monotonic() > deadline:
                return proc
            time.sleep(3)

    def ray(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        """Run a `ray` CLI command against this cluster as a client would."""
        return subprocess.run([RAY, *args], env=client_env(), capture_output=True, text=True, timeout=timeout,
                              cwd=Path(__file__).resolve().parents[1])


if __name__ == "__main__":
    c = LocalCluster(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/cfgd-cluster")).start()
    print(f"cluster up: address {c.address}, dashboard {c.dashboard}; Ctrl-C stops it", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        c.stop()
