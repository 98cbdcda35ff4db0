"""Failure handling on a real local Ray, as a user runs it: ``jobs/train.py`` in a subprocess.

1. The whole job is stopped (SIGTERM to its process group) and rerun with the same
   command: it resumes from its newest checkpoint, weights, EMA and optimizer included.
2. In that rerun a Ray Train worker is SIGKILLed: Ray Train replaces the worker group
   (``train.max_failures``), the new workers resume from the newest checkpoint, and the
   job still exits 0 with the final checkpoint. (One scenario, so that the suite starts
   one job less; a checkpoint Ray had not recorded when rank 0 died is adopted: see
   test_s3_pipeline.py.)

Each run starts its own embedded Ray in its own session (``start_new_session``) and
its own Ray temp dir, so it never joins or disturbs another Ray on this machine, and
every process it leaves is found by session id and killed at teardown.

Ray Train resumes from the checkpoints recorded in the run's
``checkpoint_manager_snapshot.json``, which its controller updates when it next polls
the workers (every ~2 s). A checkpoint directory written in that window is complete on
disk but not yet resumable; the tests wait for it to be recorded before interrupting.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import torch

from cfgd.io.checkpoint import META, OPTIMIZER, WEIGHTS, find_checkpoints, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
STEPS = 140  # the rerun needs room for a recorded checkpoint and a kill after its resume
EVERY = 20
POLL_S = 0.2
RESUME_RE = re.compile(r"resuming from checkpoint at step (\d+)")
# "(RayTrainWorker pid=123) [cfgd.train] worker 0/2 on node ..." (Ray colours the prefix).
WORKER_RE = re.compile(r"RayTrainWorker pid=(\d+)[^)]*\)\S*\s+\[cfgd\.train\] worker (\d+)/\d+")
STEP_RE = re.compile(r"\[cfgd\.train\] step (\d+)/")
SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of the run's checkpoints


# --------------------------------------------------------------------------- processes


class Run:
    """One ``jobs/train.py`` subprocess, leader of its own session and process group."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str]):
        self.log = log
        self.started = time.time()
        with open(log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "jobs/train.py", *args], cwd=ROOT, env=env,
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.sid = self.proc.pid

    def procs(self) -> list[psutil.Process]:
        """Every live process of this run: its session (Ray's daemons and workers), plus descendants."""
        found = {}
        for p in psutil.process_iter(["create_time"]):
            try:
                if p.info["create_time"] >= self.started - 1 and os.getsid(p.pid) == self.sid:
                    found[p.pid] = p
            except (OSError, psutil.Error):
                pass
        if self.proc.poll() is None:
            try:
                for p in psutil.Process(self.proc.pid).children(recursive=True):
                    found[p.pid] = p
            except psutil.Error:
                pass
        return [p for p in found.values() if _alive(p)]

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def tail(self, n: int = 6000) -> str:
        return f"--- {self.log} (last {n} chars) ---\n{self.text()[-n:]}"

    def workers(self) -> list[psutil.Process]:
        out = []
        for p in self.procs():
            try:
                if "RayTrainWorker" in " ".join(p.cmdline()):
                    out.append(p)
            except psutil.Error:
                pass
        return out

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"run did not finish within {timeout:.0f} s\n{self.tail()}")

    def drained(self, timeout: float) -> float | None:
        """Seconds until every process of the session has exited, or None if some remain."""
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None and not self.procs():
                return time.time() - t0
            time.sleep(POLL_S)
        return None

    def stop(self, grace: float = 15.0) -> list[str]:
        """SIGTERM the process group, SIGKILL whatever of the session is left after ``grace``.

        Returns descriptions of processes that survived even that (should be none).
        """
        self._signal_group(signal.SIGTERM)
        if self.drained(grace) is None:
            self._signal_group(signal.SIGKILL)
            for p in self.procs():  # Ray workers run in process groups of their own
                _kill(p)
            self.drained(10.0)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        return [_describe(p) for p in self.procs()]

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass  # the group is already gone


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _kill(p: psutil.Process) -> None:
    try:
        p.kill()
    except psutil.Error:
        pass


def _describe(p: psutil.Process) -> str:
    try:
        return f"{p.pid} {' '.join(p.cmdline())[:100]}"
    except psutil.Error:
        return str(p.pid)


@pytest.fixture
def launch(tmp_path):
    """Start ``jobs/train.py`` runs; at teardown, stop them and check that none of their processes survive."""
    # Short on purpose: Ray's unix socket paths live under it and must stay < 108 characters.
    ray_tmp = tempfile.mkdtemp(prefix="cfgdf-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # never join someone's cluster
    env.update(RAY_TMPDIR=ray_tmp, RAY_DISABLE_USAGE_STATS="1", RAY_DEDUP_LOGS="0",
               PYTHONUNBUFFERED="1")  # the log file shows each line as it happens
    runs: list[Run] = []

    def start(args: list[str], name: str) -> Run:
        run = Run(args, tmp_path / f"{name}.log", env)
        runs.append(run)
        return run

    yield start
    survivors = [s for run in runs for s in run.stop()]
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert not survivors, f"processes of the test runs survived teardown: {survivors}"


def _args(root: Path, runs: Path, name: str, max_failures: int) -> list[str]:
    return ["--config", "jobs/configs/tiny.yaml", f"data.root={root}", f"train.storage_path={runs}",
            f"train.run_name={name}", f"train.steps={STEPS}", f"train.checkpoint_every={EVERY}",
            f"train.max_failures={max_failures}", "train.log_every=1",
            "--verbose"]  # Ray's own lines too: the tests find worker pids in "(RayTrainWorker pid=…)"


# --------------------------------------------------------------------------- checkpoints


def _steps(run_dir: Path) -> dict[int, Path]:
    return {s: p for s, p in find_checkpoints(run_dir)}


def _recorded(run_dir: Path, found: dict[int, Path]) -> list[int]:
    """Steps of the complete checkpoints that Ray Train has recorded (so a restart can resume from them)."""
    try:
        snapshot = (run_dir / SNAPSHOT).read_text()
    except OSError:
        return []
    return sorted(s for s, p in found.items() if f'"{p.name}"' in snapshot)


def _wait_for_recorded_checkpoint(run: Run, run_dir: Path, min_step: int, timeout: float) -> tuple[int, dict]:
    """Poll until a checkpoint at step >= min_step is complete and recorded; returns (its step, all found)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if run.proc.poll() is not None:
            pytest.fail(f"run exited ({run.proc.returncode}) before a checkpoint at step >= {min_step}\n"
                        f"{run.tail()}")
        found = _steps(run_dir)
        recorded = [s for s in _recorded(run_dir, found) if s >= min_step]
        if recorded:
            return recorded[-1], found
        time.sleep(POLL_S)
    found = _steps(run_dir)
    pytest.fail(f"no checkpoint at step >= {min_step} recorded in {run_dir / SNAPSHOT} within {timeout:.0f} s "
                f"(on disk: {sorted(found)}, recorded: {_recorded(run_dir, found)})\n{run.tail()}")


def _assert_no_corrupt_checkpoints(run_dir: Path) -> list[int]:
    """Every directory holding checkpoint files loads and verifies; returns their steps."""
    names = {META, OPTIMIZER, *WEIGHTS}
    dirs = sorted({f.parent for f in run_dir.rglob("*") if f.name in names})
    assert dirs, f"no checkpoint under {run_dir}"
    steps = []
    for d in dirs:
        steps.append(load_checkpoint(d, with_optimizer=True).step)  # raises CheckpointError if bad
    return sorted(steps)


def _resumed_step(run: Run, nth: int = 1) -> int | None:
    """The step of the run's nth 'resuming from checkpoint' line, None before it appears."""
    found = RESUME_RE.findall(run.text())
    return int(found[nth - 1]) if len(found) >= nth else None


def _wait_for(value, run: Run, what: str, timeout: float):
    """Poll ``value()`` until it is not None; fail naming ``what`` if the run exits first or time runs out."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = value()
        if got is not None:
            return got
        if run.proc.poll() is not None:
            pytest.fail(f"run exited ({run.proc.returncode}) before {what}\n{run.tail()}")
        time.sleep(POLL_S)
    pytest.fail(f"no {what} within {timeout:.0f} s\n{run.tail()}")


# --------------------------------------------------------------------------- tests


def test_stopped_job_resumes_when_rerun_and_a_killed_worker_is_replaced(launch, digits_shards, tmp_path):
    """The job is stopped and rerun with the identical command: it resumes from its newest
    checkpoint. In the rerun, rank 0's worker is SIGKILLed: Ray Train replaces the worker
    group (``train.max_failures``), the new workers resume from the newest checkpoint, and
    the job exits 0 with the final checkpoint, weights, EMA and optimizer carried through."""
    runs = tmp_path / "runs"
    run_dir = runs / "stopped"
    args = _args(digits_shards, runs, "stopped", max_failures=2)
    first = launch(args, "first")

    step_recorded, _ = _wait_for_recorded_checkpoint(first, run_dir, 1, timeout=180)
    t_stop = time.time()
    survivors = first.stop(grace=15.0)
    stopped_in = time.time() - t_stop
    assert not survivors, f"processes of the stopped run survived: {survivors}"
    on_disk = sorted(_steps(run_dir))
    recorded = _recorded(run_dir, _steps(run_dir))
    print(f"\nstopped the job {t_stop - first.started:.1f} s after start (exit status "
          f"{first.proc.returncode}); all its processes gone in {stopped_in:.1f} s; "
          f"checkpoints recorded {recorded}, on disk {on_disk}")
    assert max(on_disk) < STEPS, "the first run finished before it was stopped: nothing to resume"

    second = launch(args, "second")  # the identical command
    resumed = _wait_for(lambda: _resumed_step(second), second, "the rerun's 'resuming' line", timeout=180)
    print(f"rerun resumed at step {resumed}, {time.time() - second.started:.0f} s after its start")
    assert resumed > 0 and resumed in on_disk and resumed >= step_recorded, (resumed, recorded, on_disk)

    # A worker dies in the rerun, once it has a newer checkpoint recorded. Rank 0, the
    # writer of the checkpoints: once it is dead, no checkpoint can follow the kill.
    step_recorded, _ = _wait_for_recorded_checkpoint(second, run_dir, resumed + 1, timeout=180)
    rank0 = {int(pid) for pid, rank in WORKER_RE.findall(second.text()) if rank == "0"}
    workers = second.workers()
    assert len(workers) == 2, f"expected 2 RayTrainWorker processes, found {[_describe(w) for w in workers]}"
    victim = next((w for w in workers if w.pid in rank0), workers[0])
    recorded_before = _recorded(run_dir, _steps(run_dir))
    victim.send_signal(signal.SIGKILL)
    t_kill = time.time()
    victim.wait(10)
    on_disk_at_kill = sorted(_steps(run_dir))
    print(f"killed RayTrainWorker pid {victim.pid} (rank {0 if victim.pid in rank0 else '?'}); "
          f"recorded checkpoints {recorded_before}, on disk {on_disk_at_kill}")
    again = _wait_for(lambda: _resumed_step(second, nth=2), second, "a 'resuming' line after the kill",
                      timeout=180)
    t_resumed = time.time()
    rc = second.wait(timeout=180)
    assert rc == 0, second.tail()

    text = second.text()
    before, after = text.split(list(RESUME_RE.finditer(text))[1].group(0), 1)
    lost = max(int(s) for s in STEP_RE.findall(before)) - again
    print(f"resumed at step {again}: recovery (kill -> 'resuming' line) {t_resumed - t_kill:.1f} s; "
          f"steps lost {lost}; rerun took {time.time() - second.started:.0f} s")
    assert again in on_disk_at_kill, f"resumed from step {again}, not a checkpoint on disk at kill time"
    assert again >= max(recorded_before) >= step_recorded, (again, recorded_before)
    assert lost <= EVERY, f"{lost} steps lost, more than checkpoint_every={EVERY}"
    new_workers = {int(pid) for pid, _ in WORKER_RE.findall(after)}
    assert new_workers and victim.pid not in new_workers, f"the worker group was not replaced: {new_workers}"

    found = find_checkpoints(run_dir)
    final = load_checkpoint(found[-1][1], with_optimizer=True)
    assert final.step == STEPS
    assert final.meta["started_at_step"] == again  # each restart continued; none started over
    adam_steps = {int(v["step"]) for v in final.optimizer_state["state"].values()}
    assert adam_steps == {STEPS}, f"optimizer state not restored: Adam steps {adam_steps}"
    assert any(not torch.equal(final.ema_state[k], v) for k, v in final.model_state.items()), \
        "EMA weights equal the raw weights"
    for step in _recorded(run_dir, _steps(run_dir)):
        assert load_checkpoint(_steps(run_dir)[step]).step == step
    assert _assert_no_corrupt_checkpoints(run_dir) == [s for s, _ in found]
    linger = second.drained(30)
    print(f"processes of the rerun gone {linger:.1f} s after it exited" if linger is not None
          else "some processes of the rerun outlived it by 30 s (killed at teardown)")
