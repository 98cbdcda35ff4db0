"""Which checkpoint a restarted run resumes from.

Ray Train hands a restarted worker group the newest checkpoint its controller has
*recorded*. The controller records a checkpoint when it next polls the workers, a
moment after rank 0 finished uploading it, so a crash in that window leaves a
checkpoint that is complete in the run directory but unknown to Ray, and resuming
from Ray's choice would redo up to a whole checkpoint interval.

So the run directory itself is the source of truth: every ``checkpoint_*`` directory
in it, recorded or not, newest step first, and the first one that *verifies* (every
file's size and sha256 against its meta.json, as :func:`cfgd.io.checkpoint.load_checkpoint`
checks) is the resume point. A checkpoint that does not verify is never used.

Unrecorded directories are invisible to Ray's retention (``keep_checkpoints``), so the
caller adopts the chosen one into Ray's record and deletes the rest (:func:`stale`).
Recorded directories are only ever deleted by Ray.

Works on any pyarrow filesystem (local or S3: the one Ray Train writes the run with),
and needs no Ray, so it is tested on its own.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pyarrow.fs as pafs

from cfgd.io.checkpoint import META, Checkpoint, CheckpointError, load_checkpoint

PREFIX = "checkpoint_"  # Ray Train's checkpoint directory names: checkpoint_<timestamp>


@dataclass(frozen=True)
class Candidate:
    """A checkpoint directory of the run. ``step`` is None when its meta.json is unreadable."""

    path: str  # on the run's filesystem
    step: int | None
    recorded: bool  # known to Ray Train's checkpoint manager

    def describe(self) -> str:
        state = "recorded" if self.recorded else "not recorded by Ray Train"
        step = "unknown step" if self.step is None else f"step {self.step}"
        return f"{Path(self.path).name} ({step}, {state})"


@dataclass
class ResumePoint:
    """The outcome of :func:`choose`: what to resume from and what was passed over, and why."""

    checkpoint: Checkpoint | None = None  # loaded and verified; None: start from step 0
    chosen: Candidate | None = None
    candidates: list[Candidate] = field(default_factory=list)
    skipped: list[tuple[Candidate, str]] = field(default_factory=list)  # (candidate, reason)

    def explain(self) -> list[str]:
        """Log lines: each skipped checkpoint with its reason, then the choice."""
        lines = [f"not resuming from {c.describe()}: {why}" for c, why in self.skipped]
        if self.chosen is None:
            lines.append("no checkpoint in the run directory verifies: starting from step 0"
                         if self.candidates else "no checkpoint in the run directory: starting from step 0")
        elif not self.chosen.recorded:
            newest = max((c.step for c in self.candidates if c.recorded and c.step is not None), default=None)
            than = f"newer than the newest recorded one (step {newest})" if newest is not None else \
                "Ray Train had recorded none"
            lines.append(f"resume point {self.chosen.describe()}: complete and verified, {than}")
        return lines


def _norm(path: str) -> str:
    return path.rstrip("/")


def _step(fs: pafs.FileSystem, directory: str) -> int | None:
    try:
        with fs.open_input_stream(f"{directory}/{META}") as f:
            return int(json.loads(f.read())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # missing or unreadable meta.json: an interrupted write


def list_candidates(fs: pafs.FileSystem, run_path: str, recorded: set[str]) -> list[Candidate]:
    """Every ``checkpoint_*`` directory under ``run_path``, newest step first.

    At equal steps a recorded directory comes first; directories without a readable
    step come last. ``recorded``: the paths Ray Train has recorded (same filesystem).
    """
    recorded = {_norm(p) for p in recorded}
    infos = fs.get_file_info(pafs.FileSelector(_norm(run_path), allow_not_found=True))
    found = [Candidate(path=i.path, step=_step(fs, i.path), recorded=_norm(i.path) in recorded)
             for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith(PREFIX)]
    return sorted(found, key=lambda c: (c.step is None, -(c.step or 0), not c.recorded, c.path))


@contextlib.contextmanager
def local_dir(fs: pafs.FileSystem, path: str) -> Iterator[Path]:
    """A local directory with the files of ``path``: the path itself on a local
    filesystem, else a temporary download that is removed afterwards."""
    if isinstance(fs, pafs.LocalFileSystem):
        yield Path(path)
        return
    with tempfile.TemporaryDirectory(prefix="cfgd-resume-") as tmp:
        pafs.copy_files(path, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        yield Path(tmp)


def load(fs: pafs.FileSystem, path: str, with_optimizer: bool = True) -> Checkpoint:
    """Load and verify the checkpoint at ``path`` on ``fs`` (raises CheckpointError)."""
    with local_dir(fs, path) as d:
        ck = load_checkpoint(d, with_optimizer=with_optimizer)
    ck.path = path
    return ck


def choose(fs: pafs.FileSystem, run_path: str, recorded: set[str], with_optimizer: bool = True) -> ResumePoint:
    """The newest checkpoint under ``run_path`` that verifies, recorded by Ray or not."""
    point = ResumePoint(candidates=list_candidates(fs, run_path, recorded))
    for cand in point.candidates:
        if cand.step is None:
            point.skipped.append((cand, f"{META} is missing or unreadable (interrupted write?)"))
            continue
        if point.chosen is not None:
            continue  # older than the resume point
        try:
            point.checkpoint = load(fs, cand.path, with_optimizer)
        except (CheckpointError, OSError) as err:
            point.skipped.append((cand, f"it does not verify: {err}"))
            continue
        point.chosen = cand
    return point


def stale(point: ResumePoint) -> list[Candidate]:
    """Unrecorded directories to delete once the run has resumed: every one that is not
    the resume point (older ones are superseded, newer ones did not verify). Ray's
    retention never sees them, so nothing else would."""
    return [c for c in point.candidates if not c.recorded and c != point.chosen]


def delete(fs: pafs.FileSystem, candidates: list[Candidate]) -> None:
    for c in candidates:
        fs.delete_dir(c.path)
