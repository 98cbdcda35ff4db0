"""Model checkpoints: self-describing (:mod:`cfgd.io.artifact`), safe weights, verified on load.

A checkpoint is a directory::

    model.safetensors   raw weights          (safetensors: no pickle)
    ema.safetensors     EMA weights          (what sampling uses by default)
    optimizer.pt        optimizer state      (read with torch.load(weights_only=True))
    meta.json           kind, format version, step, epoch, model spec, label names,
                        resolved config, the caption tokenizer of a text model, and the
                        size + sha256 of every file above

A directory without meta.json, or whose files do not match it, is refused. Callers
read what a checkpoint says through :class:`Checkpoint` (spec, timesteps, schedule(),
parameterization, label names, null label), never through the raw meta dict. The
network is built from one by :func:`cfgd.model.from_checkpoint.build_network`: this
module reads and writes files and knows nothing of the model's code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from cfgd.diffusion.process import Schedule, make_schedule
from cfgd.io import access, artifact, storage, transfers
from cfgd.io.artifact import META, ArtifactError as CheckpointError
from cfgd.io.retry import with_retries
from cfgd.spec import MAX_TIMESTEPS, PARAMETERIZATIONS, SCHEDULES, ModelSpec

KIND = "cfgd-model"
WEIGHTS = ("model.safetensors", "ema.safetensors")
OPTIMIZER = "optimizer.pt"


@dataclass
class Checkpoint:
    """A verified checkpoint. Weights are CPU tensors (None when only the meta was read)."""

    path: str
    meta: dict[str, Any]
    model_state: dict[str, torch.Tensor] | None = None
    ema_state: dict[str, torch.Tensor] | None = None
    optimizer_state: dict[str, Any] | None = None

    def __post_init__(self):
        # Bound everything a caller may build from before anything is built.
        self.spec  # noqa: B018 (raises on an unusable spec)
        self.schedule_name, self.timesteps, self.parameterization, self.zero_terminal_snr  # noqa: B018
        self.tokenizer_json  # noqa: B018

    @cached_property  # read (and bounded) once: callers ask for it per request and per batch
    def spec(self) -> ModelSpec:
        try:
            return ModelSpec.from_dict(self.meta.get("model"))
        except ValueError as err:
            raise CheckpointError(f"checkpoint {self.path} is refused: {err}") from None

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    @property
    def epoch(self) -> int:
        return int(self.meta.get("epoch", 0))

    @property
    def label_names(self) -> list[str]:
        return [str(n) for n in self.meta["label_names"]]

    @property
    def tokenizer_json(self) -> str:
        """A text model's caption tokenizer (cfgd.data.tokenizer JSON); refused if one is missing."""
        text = self.meta.get("tokenizer")
        if self.spec.condition == "text" and not isinstance(text, str):
            raise CheckpointError(f"checkpoint {self.path} is refused: a text model without its tokenizer")
        return text or ""

    @property
    def null_label(self) -> int:
        return self.spec.null_label

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images the model makes."""
        s = self.spec
        return (s.in_channels, s.image_size, s.image_size)

    @property
    def _diffusion(self) -> dict:
        return self.meta.get("config", {}).get("diffusion", {})

    @property
    def timesteps(self) -> int:
        T = self._diffusion.get("timesteps")
        if isinstance(T, bool) or not isinstance(T, int) or not 1 <= T <= MAX_TIMESTEPS:
            raise CheckpointError(f"checkpoint {self.path} is refused: diffusion timesteps={T!r}, "
                                  f"expected an int in [1, {MAX_TIMESTEPS}]")
        return T

    def _diffusion_choice(self, key: str, valid, default=None) -> str:
        """A diffusion setting of the checkpoint's config, refused unless one of ``valid``."""
        value = self._diffusion.get(key, default)
        if value not in valid:
            raise CheckpointError(f"checkpoint {self.path} is refused: {key} {value!r}, expected one of {list(valid)}")
        return value

    @property
    def schedule_name(self) -> str:
        return self._diffusion_choice("schedule", SCHEDULES)

    @property
    def parameterization(self) -> str:
        """What the network predicts (cfgd.spec.PARAMETERIZATIONS); "eps" for checkpoints
        written before the key existed."""
        return self._diffusion_choice("parameterization", PARAMETERIZATIONS, "eps")

    @property
    def zero_terminal_snr(self) -> bool:
        """Whether the schedule was rescaled to ᾱ_T = 0; False for checkpoints without the key."""
        flag = self._diffusion.get("zero_terminal_snr", False)
        if not isinstance(flag, bool) or (flag and self.parameterization == "eps"):
            raise CheckpointError(f"checkpoint {self.path} is refused: zero_terminal_snr={flag!r}, expected "
                                  f"a bool (and false with parameterization 'eps')")
        return flag

    def schedule(self) -> Schedule:
        """The noise schedule the model was trained with (built once per checkpoint)."""
        return self._schedule

    @cached_property
    def _schedule(self) -> Schedule:
        return make_schedule(self.schedule_name, self.timesteps, self.zero_terminal_snr)

    def weights_sha256(self, ema: bool = True) -> str:
        """The digest of the EMA (default) or raw weights file: what identifies the model."""
        return self.meta["files"][WEIGHTS[1] if ema else WEIGHTS[0]]["sha256"]

    @property
    def data_root(self) -> str:
        """Where the training data was read (the config's data.root), or ""."""
        return str(self.meta.get("config", {}).get("data", {}).get("root", ""))


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def write_checkpoint(directory: str | Path, *, model_state: dict, ema_state: dict, optimizer_state: dict | None,
                     spec: ModelSpec, label_names: list[str], step: int, epoch: int,
                     config: dict[str, Any], extra: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint into ``directory`` (created; must not already hold one), atomically.

    Returns the final path.
    """
    def stage(tmp: Path) -> list[str]:
        save_file(_contiguous(model_state), tmp / WEIGHTS[0])
        save_file(_contiguous(ema_state), tmp / WEIGHTS[1])
        if optimizer_state is None:
            return list(WEIGHTS)
        torch.save(optimizer_state, tmp / OPTIMIZER)
        return [*WEIGHTS, OPTIMIZER]

    fields = {"step": int(step), "epoch": int(epoch), "model": spec.to_dict(), "label_names": list(label_names),
              "config": config, **(extra or {})}
    return Path(artifact.write(str(directory), KIND, stage, fields))


# Checkpoints written before artifacts had a kind are model checkpoints.
_LEGACY = True


def read_meta(directory: str | Path, required: tuple[str, ...] = WEIGHTS) -> dict[str, Any]:
    """meta.json of a checkpoint, after checking that every file matches it."""
    return artifact.verify(directory, KIND, required, legacy_kind=_LEGACY)


def read_checkpoint(directory: str | Path) -> Checkpoint:
    """A verified checkpoint's metadata, without loading its weights."""
    return Checkpoint(path=str(directory), meta=read_meta(directory))


def load_checkpoint(directory: str | Path, with_optimizer: bool = False) -> Checkpoint:
    """Load and verify a checkpoint directory. Nothing is unpickled."""
    d = Path(directory)
    meta = read_meta(d)  # verifies every listed file, the optimizer state too
    opt = None
    if with_optimizer and OPTIMIZER in meta["files"]:
        opt = torch.load(d / OPTIMIZER, map_location="cpu", weights_only=True)
    try:
        model_state, ema_state = load_file(d / WEIGHTS[0]), load_file(d / WEIGHTS[1])
    except Exception as err:  # noqa: BLE001 (verified bytes that safetensors still refuses)
        raise CheckpointError(f"checkpoint {d} has unreadable weights: {err}") from None
    return Checkpoint(path=str(d), meta=meta, model_state=model_state, ema_state=ema_state, optimizer_state=opt)


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
    checkpoint under ``uri`` (by the step in its meta.json) is fetched through the
    private, digest-keyed cache (:func:`cfgd.io.artifact.fetch`); one that fails
    verification is skipped for the next newest.
    """
    if not storage.is_remote(uri):
        return resolve_checkpoint(uri)
    access.check_access(uri, opts)
    fs = storage.fsspec_fs(uri, opts)
    base = storage.strip_scheme(uri).rstrip("/")
    metas = [p for p in with_retries(lambda: fs.find(base), what=uri) if p.endswith("/" + META)]
    candidates = []
    for p in metas:
        raw = transfers.read_bytes("s3://" + p, opts)
        try:
            candidates.append((int(json.loads(raw)["step"]), p, raw))
        except (ValueError, KeyError, TypeError):
            continue  # unreadable meta.json: not a candidate
    for _, p, raw in sorted(candidates, key=lambda c: (c[0], c[1]), reverse=True):
        try:
            return artifact.fetch("s3://" + p[: -len(META) - 1], KIND, WEIGHTS, opts, meta_bytes=raw,
                                  legacy_kind=_LEGACY)[0]
        except CheckpointError:
            continue
    raise CheckpointError(f"no complete checkpoint found at or under {uri}")
