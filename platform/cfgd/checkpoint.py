"""Self-describing checkpoints: safe weights, verified on load, committed atomically.

A checkpoint is a directory::

    model.safetensors   raw weights          (safetensors: no pickle)
    ema.safetensors     EMA weights          (what sampling uses by default)
    optimizer.pt        optimizer state      (read with torch.load(weights_only=True))
    meta.json           format version, step, epoch, model spec, label names,
                        resolved config, and the size + sha256 of every file above

``meta.json`` is written last: a directory without it, or whose files do not
match their recorded size and hash (a truncated or corrupted upload), is refused.
Loading rebuilds the model from the checkpoint alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from cfgd import storage
from cfgd.model import ModelSpec, UNet, build_model

FORMAT_VERSION = 1
META = "meta.json"
WEIGHTS = ("model.safetensors", "ema.safetensors")
OPTIMIZER = "optimizer.pt"


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, corrupted or of an unknown format."""


@dataclass
class Checkpoint:
    """What a loaded checkpoint holds. Weights are CPU tensors."""

    path: str
    meta: dict[str, Any]
    model_state: dict[str, torch.Tensor]
    ema_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any] | None

    @property
    def spec(self) -> ModelSpec:
        return ModelSpec(**self.meta["model"])

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    @property
    def label_names(self) -> list[str]:
        return list(self.meta["label_names"])

    def build(self, ema: bool = True) -> UNet:
        """The network with EMA (default) or raw weights, in eval mode, on the CPU."""
        model = build_model(self.spec)
        model.load_state_dict(self.ema_state if ema else self.model_state)
        return model.eval()


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def write_checkpoint(directory: str | Path, *, model_state: dict, ema_state: dict, optimizer_state: dict | None,
                     spec: ModelSpec, label_names: list[str], step: int, epoch: int,
                     config: dict[str, Any], extra: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint into ``directory`` (created; must not already hold one).

    The files go into a temporary sibling first and the directory is renamed into
    place at the end, so a crash mid-write never leaves a checkpoint that looks
    complete. Returns the final path.
    """
    final = Path(directory)
    if (final / META).exists():
        raise CheckpointError(f"refusing to overwrite the checkpoint at {final}")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        save_file(_contiguous(model_state), tmp / WEIGHTS[0])
        save_file(_contiguous(ema_state), tmp / WEIGHTS[1])
        files = list(WEIGHTS)
        if optimizer_state is not None:
            torch.save(optimizer_state, tmp / OPTIMIZER)
            files.append(OPTIMIZER)
        meta = {
            "format_version": FORMAT_VERSION,
            "step": int(step),
            "epoch": int(epoch),
            "model": spec.to_dict(),
            "label_names": list(label_names),
            "config": config,
            "files": {f: {"bytes": (tmp / f).stat().st_size, "sha256": sha256_file(tmp / f)} for f in files},
            **(extra or {}),
        }
        (tmp / META).write_text(json.dumps(meta, indent=2, sort_keys=True))
        if final.exists():
            shutil.rmtree(final)  # an incomplete leftover (no meta.json, checked above)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def read_meta(directory: str | Path) -> dict[str, Any]:
    """meta.json of a checkpoint, after checking that every file matches it."""
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"no checkpoint directory at {d}")
    if not (d / META).is_file():
        raise CheckpointError(f"{d} is not a complete checkpoint: {META} is missing (interrupted write?)")
    try:
        meta = json.loads((d / META).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{d / META} is corrupted: {err}") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{d} has checkpoint format {meta.get('format_version')!r}; "
                              f"this version of cfgd reads format {FORMAT_VERSION}")
    for name, rec in meta["files"].items():
        f = d / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {d} is incomplete: {name} is missing")
        if f.stat().st_size != rec["bytes"]:
            raise CheckpointError(f"checkpoint {d} is corrupted: {name} has {f.stat().st_size} bytes, "
                                  f"expected {rec['bytes']} (truncated?)")
        if sha256_file(f) != rec["sha256"]:
            raise CheckpointError(f"checkpoint {d} is corrupted: {name} does not match its sha256")
    return meta


def load_checkpoint(directory: str | Path, with_optimizer: bool = False) -> Checkpoint:
    """Load and verify a checkpoint directory. Nothing is unpickled."""
    d = Path(directory)
    meta = read_meta(d)
    opt = None
    if with_optimizer and OPTIMIZER in meta["files"]:
        opt = torch.load(d / OPTIMIZER, map_location="cpu", weights_only=True)
    return Checkpoint(path=str(d), meta=meta, model_state=load_file(d / WEIGHTS[0]),
                      ema_state=load_file(d / WEIGHTS[1]), optimizer_state=opt)


def find_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete, verified checkpoint under run_dir, oldest first."""
    found = []
    for meta_path in Path(run_dir).glob("**/" + META):
        try:
            meta = read_meta(meta_path.parent)
        except CheckpointError:
            continue  # incomplete or corrupted: never picked
        found.append((int(meta["step"]), meta_path.parent))
    return sorted(found)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir as given, or the newest valid checkpoint under a run dir."""
    p = Path(path)
    if (p / META).exists():
        read_meta(p)
        return p
    found = find_checkpoints(p)
    if not found:
        raise CheckpointError(f"no complete checkpoint found at or under {p}")
    return found[-1][1]


def fetch_checkpoint(uri: str, opts: "storage.StorageOptions | None" = None) -> Path:
    """A local, verified checkpoint directory for a checkpoint or run directory anywhere.

    Local paths go through :func:`resolve_checkpoint`. For ``s3://`` URIs the newest
    checkpoint under ``uri`` (by the step in its meta.json) is downloaded into a local
    cache and verified; one that fails verification is skipped for the next newest.
    """
    if not storage.is_remote(uri):
        return resolve_checkpoint(uri)
    storage.check_access(uri, opts)
    fs = storage.fsspec_fs(uri, opts)
    base = storage.strip_scheme(uri).rstrip("/")
    metas = [p for p in storage.with_retries(lambda: fs.find(base), what=uri) if p.endswith("/" + META)]
    steps = []
    for p in metas:
        try:
            steps.append((int(json.loads(storage.read_bytes("s3://" + p, opts))["step"]), p))
        except (ValueError, KeyError):
            continue  # unreadable meta.json: not a candidate
    cache_root = Path(tempfile.gettempdir()) / "cfgd-checkpoints"
    for _, p in sorted(steps, reverse=True):
        remote_dir = "s3://" + p[: -len(META) - 1]
        local = cache_root / hashlib.sha256(remote_dir.encode()).hexdigest()[:24]
        try:
            read_meta(local)  # already cached and intact
            return local
        except CheckpointError:
            shutil.rmtree(local, ignore_errors=True)
        storage.download_dir(remote_dir, str(local), opts)
        try:
            read_meta(local)
            return local
        except CheckpointError:
            shutil.rmtree(local, ignore_errors=True)
    raise CheckpointError(f"no complete checkpoint found at or under {uri}")
