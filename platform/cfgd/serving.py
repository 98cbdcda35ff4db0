"""Serving guided samples: the library side of ``serve/app.py``.

The Serve deployments in ``serve/app.py`` only route; everything they do is here,
as plain Python that runs without a cluster:

* :class:`ServeSettings` — the sampler's ``user_config`` (allowed checkpoints, limits,
  batching, bulk output prefix), unknown keys rejected.
* :class:`GenerateRequest`, :class:`BulkRequest` — the HTTP schemas (OpenAPI comes from
  them). :meth:`SamplerCore.prepare` and :meth:`SamplerCore.plan_bulk` check a request
  against the settings and the checkpoint and raise :class:`RequestError` (→ 4xx) naming
  the field.
* :class:`SamplerCore` — what one sampler replica holds: settings, an LRU of loaded
  checkpoints, counters. :meth:`SamplerCore.sample` turns one dynamic batch of requests
  into one ``Generator.sample`` call per compatible step schedule.
* Bulk jobs — :func:`resolve_destination`, :class:`BulkPlan`, :func:`run_shard` (one Ray
  task per Parquet shard) and :class:`ServeState` (a detached actor that runs and tracks
  jobs and collects replica reports).

Sampling is always ``Generator.sample`` on the EMA weights; nothing here repeats the math.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import io
import json
import math
import os
import re
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, Optional, Union

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, FiniteFloat, StrictBool, StrictInt, ValidationError

from cfgd import storage
from cfgd.checkpoint import CheckpointError
from cfgd.checks import Rule, check
from cfgd.generate import Generator, make_grid
from cfgd.images import encode_png, to_uint8
from cfgd.plan import RULES, SOLVERS, SPACINGS, WEIGHT_SCHEDULES, Guidance, PlanError, SamplingPlan, Solver, \
    from_fields, strength_columns
from cfgd.storage import StorageError, StorageOptions

MAX_SEED = 2**63 - 1
SHARD_NAME = "shard-{:05d}.parquet"
SHARD_RE = re.compile(r"^shard-(\d{5})\.parquet$")
# Leading "_": Parquet readers (pyarrow datasets, Ray Data) skip these when reading the
# destination directory as one dataset.
MANIFEST = "_job.json"
PNG_DIR = "_png"
STATE_NAMESPACE = "cfgd"
# Path segments allowed in a bulk destination: no spaces, no "..", nothing a shell or URL
# would reinterpret.
SEGMENT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=-]*$")


class RequestError(Exception):
    """A request the server refuses: HTTP ``status`` and the ``field`` at fault."""

    def __init__(self, status: int, field_name: str, message: str):
        super().__init__(status, field_name, message)
        self.status = status
        self.field = field_name
        self.message = message

    def __str__(self) -> str:
        return f"{self.status} {self.field}: {self.message}"

    def to_json(self) -> dict:
        return {"detail": self.message, "field": self.field}

    def as_result(self) -> dict:
        """The refusal as a return value: deployments return it instead of raising, so an
        expected 4xx costs no traceback in the replica's log."""
        return {"refused": {"status": self.status, **self.to_json()}}


def refused(result: Any) -> dict | None:
    """The refusal in a deployment's or actor's return value, if it is one."""
    return result.get("refused") if isinstance(result, dict) else None


def validation_message(exc: ValidationError | list) -> tuple[str, str]:
    """(field, message) from a pydantic error list, e.g. ("w", "w: Input should be ...")."""
    errors = exc.errors() if isinstance(exc, ValidationError) else exc
    parts, first = [], ""
    for e in errors:
        loc = [str(p) for p in e.get("loc", ()) if p != "body"]
        # A JSON syntax error's loc is a character offset, not a field.
        name = "body" if e.get("type") == "json_invalid" else ".".join(loc) or "body"
        first = first or name
        parts.append(f"{name}: {e.get('msg', 'invalid')}")
    return first or "body", "; ".join(parts) or "invalid request"


# ------------------------------------------------------------------------- settings


@dataclass
class ServeSettings:
    """The sampler deployment's ``user_config``; ``serve deploy`` with a changed one rolls
    it out through ``reconfigure`` without restarting replicas."""

    # Allowed checkpoints, name -> URI (checkpoint or run dir, local or s3://). Requests
    # can name only these, so a client never makes the server read an arbitrary path.
    checkpoints: dict = field(default_factory=dict)
    default_checkpoint: str = ""  # a key of ``checkpoints``
    max_models_per_replica: int = 2  # LRU bound on checkpoints held in memory per replica
    w_min: float = -1.0
    w_max: float = 20.0
    default_w: float = 1.0  # when a request gives neither w nor guidance_scale
    max_images: int = 16  # per /generate request
    max_steps: int = 250  # also capped by the checkpoint's T
    default_steps: int = 50
    max_batch_size: int = 8  # requests merged by @serve.batch (<= max_ongoing_requests)
    batch_wait_timeout_s: float = 0.05
    # CPU kernels round small batches differently; padding every forward pass to a
    # multiple of this many rows makes an image's bytes independent of its batch
    # (see RowPadded). 0 or 1 turns padding off.
    pad_rows: int = 16
    torch_threads: int = 1  # intra-op threads per replica / shard task
    # Bulk jobs: outputs only under this prefix (s3://bucket/prefix or a local dir);
    # "" disables /bulk.
    output_prefix: str = ""
    shard_size: int = 64  # images per Parquet shard (one Ray task each)
    shard_num_cpus: float = 0.5
    shard_max_retries: int = 3
    max_bulk_images: int = 100_000
    storage: dict = field(default_factory=dict)  # cfgd.storage.StorageOptions fields

    @classmethod
    def from_dict(cls, data: dict | None) -> "ServeSettings":
        """Build and validate; unknown keys raise ValueError listing the valid ones."""
        data = dict(data or {})
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(valid))
        if unknown:
            raise ValueError(f"unknown sampler setting(s) {unknown}; valid settings: {valid}")
        s = cls(**data)
        s.validate()
        return s

    def validate(self) -> None:
        kinds = {"int": (int,), "float": (int, float), "str": (str,), "dict": (dict,)}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, kinds[f.type]):
                raise ValueError(f"setting {f.name}={value!r} must be of type {f.type}")
        if not self.checkpoints:
            raise ValueError("checkpoints must map at least one name to a checkpoint URI")
        for name, uri in self.checkpoints.items():
            if not isinstance(uri, str) or not uri:
                raise ValueError(f"checkpoints[{name!r}] must be a non-empty URI, got {uri!r}")
            storage.is_remote(uri)  # refuses unsupported schemes
        if self.default_checkpoint not in self.checkpoints:
            raise ValueError(f"default_checkpoint {self.default_checkpoint!r} is not one of "
                             f"the configured checkpoints {sorted(self.checkpoints)}")
        check([
            Rule("max_models_per_replica", self.max_models_per_replica, self.max_models_per_replica >= 1, ">= 1"),
            Rule("w_min", self.w_min, math.isfinite(self.w_min) and self.w_min >= -1.0, "finite and >= -1"),
            Rule("w_max", self.w_max, math.isfinite(self.w_max) and self.w_max >= self.w_min, "finite and >= w_min"),
            Rule("default_w", self.default_w, self.w_min <= self.default_w <= self.w_max, "in [w_min, w_max]"),
            Rule("max_images", self.max_images, self.max_images >= 1, ">= 1"),
            Rule("max_steps", self.max_steps, self.max_steps >= 1, ">= 1"),
            Rule("default_steps", self.default_steps, 1 <= self.default_steps <= self.max_steps, "in [1, max_steps]"),
            Rule("max_batch_size", self.max_batch_size, self.max_batch_size >= 1, ">= 1"),
            Rule("batch_wait_timeout_s", self.batch_wait_timeout_s, self.batch_wait_timeout_s >= 0, ">= 0"),
            Rule("pad_rows", self.pad_rows, self.pad_rows >= 0, ">= 0"),
            Rule("torch_threads", self.torch_threads, self.torch_threads >= 1, ">= 1"),
            Rule("shard_size", self.shard_size, self.shard_size >= 1, ">= 1"),
            Rule("shard_num_cpus", self.shard_num_cpus, self.shard_num_cpus > 0, "> 0"),
            Rule("shard_max_retries", self.shard_max_retries, self.shard_max_retries >= 0, ">= 0"),
            Rule("max_bulk_images", self.max_bulk_images, self.max_bulk_images >= 1, ">= 1"),
        ], ValueError, prefix="setting ")
        if self.output_prefix:
            storage.is_remote(self.output_prefix)
        self.storage_options()  # unknown storage keys fail here

    def storage_options(self) -> StorageOptions:
        valid = [f.name for f in fields(StorageOptions)]
        unknown = sorted(set(self.storage or {}) - set(valid))
        if unknown:
            raise ValueError(f"unknown storage setting(s) {unknown}; valid: {valid}")
        return StorageOptions(**(self.storage or {}))


def settings_from_args(args: dict | None) -> dict:
    """Sampler settings from application args (``serve run module:build_app k=v``).

    ``checkpoint=URI`` is short for ``checkpoints={"default": URI}``. Command-line values
    arrive as strings and are converted to the field's type. Returns the validated
    settings as a plain dict (a ``user_config``).
    """
    args = dict(args or {})
    if "checkpoint" in args:
        if "checkpoints" in args:
            raise ValueError("give checkpoint (one URI) or checkpoints (name -> URI), not both")
        args["checkpoints"] = {"default": args.pop("checkpoint")}
        args.setdefault("default_checkpoint", "default")
    types = {f.name: f.type for f in fields(ServeSettings)}
    for k, v in list(args.items()):
        if isinstance(v, str) and types.get(k) in ("int", "float"):
            try:
                args[k] = int(v) if types[k] == "int" else float(v)
            except ValueError:
                raise ValueError(f"setting {k}={v!r} must be a number") from None
        elif isinstance(v, str) and types.get(k) == "dict":
            args[k] = json.loads(v)
    ServeSettings.from_dict(args)
    return args


# -------------------------------------------------------------------------- schemas


class PlanFields(BaseModel):
    """The sampling plan's fields of a request (cfgd.plan checks bounds and combinations)."""

    model_config = ConfigDict(extra="forbid")

    solver: Literal[SOLVERS] = "ddim"  # type: ignore[valid-type]
    steps: Optional[StrictInt] = Field(None, ge=1, description="solver steps (default: server's default_steps)")
    eta: FiniteFloat = Field(0.0, description="DDIM eta in [0, 1]: 0 deterministic, 1 DDPM-like")
    spacing: Optional[Literal[SPACINGS]] = Field(None, description="timestep spacing (default: the solver's)")  # type: ignore
    rule: Literal[RULES] = "cfg"  # type: ignore[valid-type]
    lam: FiniteFloat = Field(1.0, description="CFG++ lambda in [0, 1]")
    apg_beta: FiniteFloat = Field(0.0, description="APG momentum in [-1, 1)")
    apg_r: Optional[FiniteFloat] = Field(None, description="APG norm cap r > 0 (null: none)")
    apg_eta: FiniteFloat = Field(1.0, description="APG weight of the parallel component in [0, 1]")
    weight_schedule: Literal[WEIGHT_SCHEDULES] = "constant"  # type: ignore[valid-type]
    guidance_interval: Optional[tuple[StrictInt, StrictInt]] = Field(
        None, description="[t_lo, t_hi]: guide only at timesteps inside (1..T)")
    rescale: FiniteFloat = Field(0.0, description="guidance rescale phi in [0, 1]")
    clip: StrictBool = Field(True, description="clamp x0 to [-1, 1]")
    threshold: Optional[FiniteFloat] = Field(None, description="dynamic thresholding quantile in [0.5, 1]")
    guide: Optional[str] = Field(None, description="autoguidance: a configured checkpoint name")


class GenerateRequest(PlanFields):
    """POST /generate. Image i uses seed ``seed + i``; same request → same bytes."""

    class_label: Optional[StrictInt] = Field(None, description="class index; or give class_name")
    class_name: Optional[str] = Field(None, description="a label name of the checkpoint")
    num_images: StrictInt = Field(1, ge=1)
    seed: StrictInt = Field(0, ge=0, le=MAX_SEED)
    format: Literal["png_list", "grid"] = "png_list"
    checkpoint: Optional[str] = Field(None, description="a configured checkpoint name (default: the server's)")
    w: Optional[FiniteFloat] = Field(None, description="guidance strength (paper form); or guidance_scale")
    guidance_scale: Optional[FiniteFloat] = Field(None, description="= 1 + w; or w")


# Where a request field lands in the sampling plan (the same for /generate and /bulk).
PLAN_KEYS = {
    "solver": "solver.name", "steps": "solver.steps", "spacing": "solver.spacing", "eta": "solver.eta",
    "rule": "guidance.rule", "w": "guidance.w", "guidance_scale": "guidance.guidance_scale", "lam": "guidance.lam",
    "apg_beta": "guidance.apg_beta", "apg_r": "guidance.apg_r", "apg_eta": "guidance.apg_eta",
    "weight_schedule": "guidance.schedule", "guidance_interval": "guidance.interval", "rescale": "guidance.rescale",
    "clip": "guidance.clip", "threshold": "guidance.threshold", "guide": "guidance.guide",
}


class BulkRequest(PlanFields):
    """POST /bulk: ``counts`` images for every (class, w), written as Parquet shards."""

    destination: str = Field(..., description="a sub-path of the server's output_prefix, or a URI under it")
    classes: Optional[list[StrictInt]] = Field(None, description="class indices (default: every class)")
    class_names: Optional[list[str]] = Field(None, description="alternative to classes")
    counts: Union[StrictInt, list[StrictInt]] = Field(1, description="per (class, w): one number or one per class")
    w: Optional[list[FiniteFloat]] = None
    guidance_scale: Optional[list[FiniteFloat]] = None
    seed: StrictInt = Field(0, ge=0, le=MAX_SEED)
    png_files: StrictBool = False
    checkpoint: Optional[str] = None


def _parse(model: type[BaseModel], body: dict | BaseModel) -> Any:
    if isinstance(body, model):
        return body
    try:
        return model.model_validate(body)
    except ValidationError as err:
        name, msg = validation_message(err)
        raise RequestError(422, name, msg) from None


# ------------------------------------------------------------------ batch invariance


class RowPadded(torch.nn.Module):
    """The network with every forward batch padded to a multiple of ``multiple`` rows.

    Why: CPU kernels (oneDNN convolutions, MKL GEMM) choose their algorithm by batch
    size, and for small batches that changes each row's rounding. The DDIM step at
    t = T divides ε̂ by sqrt(ᾱ_T) ≈ 0.01, so a seed gave visibly different images alone
    and inside a batch (up to 1e-2; torch 2.13 CPU, measured). Every batch of >= 16 rows
    gave bit-identical rows, so padding makes an image's bytes independent of what it
    was batched with. Pad rows copy row 0's timestep and label; their output is dropped.
    """

    def __init__(self, net: torch.nn.Module, multiple: int):
        super().__init__()
        self.net = net
        self.multiple = multiple

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        pad = -B % self.multiple
        if pad == 0:
            return self.net(x, t, y)
        nhwc = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
        x = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))])
        if nhwc:  # cat returns NCHW; keep the layout the network was converted to
            x = x.contiguous(memory_format=torch.channels_last)
        t = torch.cat([t, t[:1].expand(pad)])
        y = torch.cat([y, y[:1].expand(pad)])
        return self.net(x, t, y)[:B]


def load_generator(uri: str, opts: StorageOptions | None, pad_rows: int) -> Generator:
    """``Generator.load`` (EMA weights), with :class:`RowPadded` around the network."""
    gen = Generator.load(uri, use_ema=True, storage=opts)
    if pad_rows > 1:
        gen = dataclasses.replace(gen, model=RowPadded(gen.model, pad_rows).eval())
    return gen


class ModelCache:
    """Checkpoints loaded on first use, at most ``capacity`` kept (least recently used
    evicted). Thread-safe; a URI is loaded once even when requested concurrently."""

    def __init__(self, capacity: int, opts: StorageOptions | None, pad_rows: int):
        self.capacity = capacity
        self.opts = opts
        self.pad_rows = pad_rows
        self._models: OrderedDict[str, Generator] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}
        self.loads = 0

    def get(self, uri: str) -> Generator:
        with self._lock:
            if uri in self._models:
                self._models.move_to_end(uri)
                return self._models[uri]
            load_lock = self._loading.setdefault(uri, threading.Lock())
        with load_lock:
            with self._lock:
                if uri in self._models:
                    return self._models[uri]
            gen = load_generator(uri, self.opts, self.pad_rows)
            with self._lock:
                self._models[uri] = gen
                self.loads += 1
                self._evict()
        return gen

    def resize(self, capacity: int) -> None:
        with self._lock:
            self.capacity = capacity
            self._evict()

    def _evict(self) -> None:
        # Requests already holding an evicted Generator keep it until they finish.
        while len(self._models) > self.capacity:
            self._models.popitem(last=False)

    def uris(self) -> list[str]:
        with self._lock:
            return list(self._models)


# ------------------------------------------------------------------------- sampling


@dataclass
class SampleSpec:
    """One validated /generate request: ``n`` rows of one class and one w."""

    gen: Generator
    checkpoint: str
    label: int
    class_name: str
    seeds: list[int]
    solver: Solver
    guidance: Guidance
    guides: dict  # guide name -> Generator (autoguidance)
    format: str

    @property
    def n(self) -> int:
        return len(self.seeds)

    def schedule_key(self) -> tuple:
        """Requests with equal keys share one ``Generator.sample`` call: class, seed and
        the whole guidance rule may differ per row; the checkpoint and solver may not."""
        return (id(self.gen), self.solver)


def sample_specs(specs: list[SampleSpec]) -> tuple[list[torch.Tensor], int]:
    """Images (n, C, H, W) in [-1, 1] per spec, and how many sample calls it took."""
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(specs):
        groups.setdefault(s.schedule_key(), []).append(i)
    out: list[torch.Tensor | None] = [None] * len(specs)
    for idxs in groups.values():
        members = [specs[i] for i in idxs]
        first = members[0]
        labels = [s.label for s in members for _ in range(s.n)]
        seeds = [seed for s in members for seed in s.seeds]
        plan = SamplingPlan(solver=first.solver, rows=tuple(s.guidance for s in members for _ in range(s.n)))
        guides = {k: g for s in members for k, g in s.guides.items()}
        # One chunk: the whole group is one forward pass per step, the point of batching.
        images = first.gen.sample(labels, seeds, plan, guides=guides, batch_size=len(labels))
        start = 0
        for i, s in zip(idxs, members):
            out[i] = images[start:start + s.n]
            start += s.n
    return out, len(groups)


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def render(spec: SampleSpec, images: torch.Tensor) -> dict:
    """The response body of one request (PNG bytes, not yet base64)."""
    u8 = to_uint8(images)
    g, sol = spec.guidance, spec.solver
    meta = {"label": spec.label, "class_name": spec.class_name, "w": g.w, "guidance_scale": 1.0 + g.w,
            "seeds": spec.seeds, "checkpoint": spec.checkpoint, "solver": sol.name, "steps": sol.steps,
            "eta": sol.eta, "spacing": sol.spacing, "rule": g.rule,
            "guidance_interval": list(g.interval) if g.interval else None, "format": spec.format}
    if spec.format == "grid":
        cols = math.ceil(math.sqrt(spec.n))
        rows = math.ceil(spec.n / cols)
        return {**meta, "grid": png_bytes(make_grid(u8, rows, cols))}
    return {**meta, "images": [encode_png(img) for img in u8]}


def to_http_json(result: dict) -> dict:
    """PNG bytes → base64 strings for a JSON response."""
    out = dict(result)
    out["images"] = [base64.b64encode(b).decode("ascii") for b in result["images"]]
    return out


def _resolve_class(label: int | None, name: str | None, label_names: list[str], field_label: str,
                   field_name: str) -> int:
    k = len(label_names)
    if label is not None and name is not None:
        raise RequestError(422, field_label, f"give {field_label} or {field_name}, not both")
    if label is None and name is None:
        raise RequestError(422, field_label, f"give {field_label} (0..{k - 1}) or {field_name} "
                                             f"(one of {label_names})")
    if name is not None:
        if name not in label_names:
            raise RequestError(422, field_name, f"unknown {field_name} {name!r}; choose one of {label_names}")
        return label_names.index(name)
    if not 0 <= label < k:
        raise RequestError(422, field_label, f"{field_label} {label} is outside [0, {k})")
    return label


def _plan_fields(req: BaseModel, s: ServeSettings, T: int, solver: Solver | None = None,
                 **override) -> tuple[Solver, Guidance]:
    """A request's plan fields → (Solver, Guidance): the request edge of cfgd.plan.

    Server policy on top of the plan's own bounds: w within [w_min, w_max] and steps
    within [1, min(max_steps, T)]. Raises RequestError naming the request's field.
    """
    values = {k: getattr(req, k) for k in PLAN_KEYS}
    values.update(override)
    values["steps"] = _check_steps(values["steps"], s, T)
    try:
        solver, g = from_fields(values, PLAN_KEYS, default_w=s.default_w, solver=solver)
    except PlanError as err:
        raise RequestError(422, err.field, str(err)) from None
    if g.rule != "cfg++" and not s.w_min <= g.w <= s.w_max:
        name = "guidance_scale" if values.get("guidance_scale") is not None else "w"
        shown = values[name] if values.get(name) is not None else g.w
        lo, hi = (s.w_min + 1, s.w_max + 1) if name == "guidance_scale" else (s.w_min, s.w_max)
        raise RequestError(422, name, f"{name} {shown} is outside the allowed range [{lo}, {hi}]")
    if g.interval is not None and g.interval[1] > T:
        raise RequestError(422, "guidance_interval", f"guidance_interval {list(g.interval)} must satisfy "
                                                     f"1 <= t_lo <= t_hi <= T={T}")
    return solver, g


def _check_steps(steps: int | None, s: ServeSettings, T: int) -> int:
    steps = s.default_steps if steps is None else steps
    limit = min(s.max_steps, T)
    if not 1 <= steps <= limit:
        raise RequestError(422, "steps", f"steps {steps} is outside [1, {limit}] "
                                         f"(max_steps {s.max_steps}, checkpoint T {T})")
    return steps


class SamplerCore:
    """The state of one sampler replica: settings, loaded checkpoints, counters."""

    def __init__(self):
        self.settings: ServeSettings | None = None
        self.cache: ModelCache | None = None
        self._lock = threading.Lock()
        self.counters = {"batches": 0, "requests": 0, "sample_calls": 0, "images": 0, "largest_batch": 0}
        self.config_error: str | None = None

    # --- configuration

    def apply(self, settings: ServeSettings) -> None:
        """Switch to new settings; the default checkpoint is loaded before this returns,
        so a bad URI fails the rollout instead of the requests. In-flight requests keep
        the Generator they already hold."""
        opts = settings.storage_options()
        torch.set_num_threads(settings.torch_threads)
        old = self.cache
        if old is not None and old.opts == opts and old.pad_rows == settings.pad_rows:
            cache = old
            cache.resize(max(settings.max_models_per_replica, 1))
        else:
            cache = ModelCache(settings.max_models_per_replica, opts, settings.pad_rows)
        cache.get(settings.checkpoints[settings.default_checkpoint])
        with self._lock:
            self.settings, self.cache = settings, cache

    def reconfigure(self, user_config: dict | None) -> ServeSettings | None:
        """Apply a ``user_config``; returns the new settings, or None if it was rejected.

        The first one must be valid: it raises (unknown keys, bad values, a checkpoint that
        does not load), so the replica fails to start with that message in ``serve
        status``. A bad *later* one is rejected without touching the running settings:
        raising there makes Serve stall the replica's requests and then answer 503, so one
        typo in ``serve deploy`` would take the service down. The rejection is kept in
        ``config_error`` (shown by /ready and /stats) until a good config arrives.
        """
        try:
            settings = ServeSettings.from_dict(user_config)
            self.apply(settings)
        except Exception as err:
            if self.settings is None:
                raise
            self.config_error = f"rejected user_config, still serving the previous settings: {err}"
            return None
        self.config_error = None
        return settings

    def _current(self) -> tuple[ServeSettings, ModelCache]:
        with self._lock:
            if self.settings is None:
                raise RequestError(503, "checkpoint", "the sampler has no settings yet: deploy it with a "
                                                      "user_config naming its checkpoints")
            return self.settings, self.cache

    def generator(self, name: str | None) -> tuple[str, Generator, ServeSettings]:
        """(name, Generator, settings) for a requested checkpoint name (None = default)."""
        s, cache = self._current()
        name = s.default_checkpoint if name is None else name
        if name not in s.checkpoints:
            raise RequestError(404, "checkpoint", f"unknown checkpoint {name!r}; available: {sorted(s.checkpoints)}")
        try:
            return name, cache.get(s.checkpoints[name]), s
        except (CheckpointError, StorageError, FileNotFoundError) as err:
            raise RequestError(503, "checkpoint", f"checkpoint {name!r} cannot be loaded: {err}") from None

    # --- /generate

    def prepare(self, body: dict | GenerateRequest) -> SampleSpec:
        req: GenerateRequest = _parse(GenerateRequest, body)
        name, gen, s = self.generator(req.checkpoint)
        names = gen.checkpoint.label_names
        label = _resolve_class(req.class_label, req.class_name, names, "class_label", "class_name")
        if req.num_images > s.max_images:
            raise RequestError(422, "num_images", f"num_images {req.num_images} is over the limit {s.max_images}")
        if req.seed + req.num_images - 1 > MAX_SEED:
            raise RequestError(422, "seed", f"seed + num_images - 1 must be <= {MAX_SEED}")
        solver, guidance = _plan_fields(req, s, gen.timesteps)
        return SampleSpec(gen=gen, checkpoint=name, label=label, class_name=names[label],
                          seeds=[req.seed + i for i in range(req.num_images)], solver=solver, guidance=guidance,
                          guides=self._guide(gen, guidance), format=req.format)

    def _guide(self, gen: Generator, guidance: Guidance) -> dict:
        """{name: Generator} of an autoguidance request's guide (a configured checkpoint)."""
        if guidance.guide is None:
            return {}
        s, _ = self._current()
        if guidance.guide not in s.checkpoints:
            raise RequestError(422, "guide", f"unknown guide {guidance.guide!r}; it must be a configured checkpoint: "
                                             f"{sorted(s.checkpoints)}")
        _, guide, _ = self.generator(guidance.guide)
        try:
            gen.check_guide(guide, guidance.guide)
        except ValueError as err:
            raise RequestError(422, "guide", str(err)) from None
        return {guidance.guide: guide}

    def sample(self, specs: list[SampleSpec]) -> list[torch.Tensor]:
        """One dynamic batch → images per request (counted as one batch)."""
        images, calls = sample_specs(specs)
        with self._lock:
            c = self.counters
            c["batches"] += 1
            c["requests"] += len(specs)
            c["sample_calls"] += calls
            c["images"] += sum(s.n for s in specs)
            c["largest_batch"] = max(c["largest_batch"], len(specs))
        return images

    def health_sample(self) -> None:
        """One image, one step, on the default checkpoint: raises if that fails."""
        s, _ = self._current()
        _, gen, _ = self.generator(None)
        img = gen.sample([0], [0], SamplingPlan.uniform(1, solver=Solver(steps=1)), batch_size=1)
        if img.shape != (1, *gen.shape) or not torch.isfinite(img).all():
            raise RuntimeError(f"health sample of {s.default_checkpoint!r} is broken: shape {tuple(img.shape)}")

    # --- introspection

    def stats(self) -> dict:
        with self._lock:
            return {**self.counters, "config_error": self.config_error}

    def loaded(self) -> dict:
        """Loaded checkpoints as {name: uri} (names mapped to a loaded URI)."""
        with self._lock:
            s, cache = self.settings, self.cache
        if s is None:
            return {}
        uris = set(cache.uris())
        return {n: u for n, u in s.checkpoints.items() if u in uris}

    def describe(self) -> dict:
        with self._lock:
            s = self.settings
        if s is None:
            return {"configured": False, "loaded": {}}
        return {"configured": True, "config_error": self.config_error, "default_checkpoint": s.default_checkpoint,
                "checkpoints": sorted(s.checkpoints), "loaded": self.loaded(),
                "max_batch_size": s.max_batch_size, "batch_wait_timeout_s": s.batch_wait_timeout_s}

    # --- /bulk

    def plan_bulk(self, body: dict | BulkRequest) -> dict:
        """Validate a bulk request; returns what :meth:`ServeState.submit` needs."""
        req: BulkRequest = _parse(BulkRequest, body)
        s, _ = self._current()
        if not s.output_prefix:
            raise RequestError(503, "destination", "bulk generation is disabled: the server has no output_prefix")
        destination = resolve_destination(req.destination, s.output_prefix)
        name, gen, s = self.generator(req.checkpoint)
        names = gen.checkpoint.label_names
        if req.classes is not None and req.class_names is not None:
            raise RequestError(422, "classes", "give classes or class_names, not both")
        if req.class_names is not None:
            bad = [n for n in req.class_names if n not in names]
            if bad:
                raise RequestError(422, "class_names", f"unknown class_names {bad}; choose from {names}")
            classes = [names.index(n) for n in req.class_names]
        else:
            classes = list(range(len(names))) if req.classes is None else list(req.classes)
            bad = [c for c in classes if not 0 <= c < len(names)]
            if bad:
                raise RequestError(422, "classes", f"classes {bad} are outside [0, {len(names)})")
        if not classes:
            raise RequestError(422, "classes", "classes is empty")
        if len(set(classes)) != len(classes):
            raise RequestError(422, "classes", f"classes {classes} has duplicates")
        counts = [req.counts] * len(classes) if isinstance(req.counts, int) else list(req.counts)
        if len(counts) != len(classes):
            raise RequestError(422, "counts", f"counts has {len(counts)} values for {len(classes)} classes")
        if any(c < 0 for c in counts) or sum(counts) == 0:
            raise RequestError(422, "counts", "counts must be >= 0 with at least one image")
        # One plan row per strength: w and guidance_scale are lists here.
        columns = strength_columns(req.w, req.guidance_scale, default=[None])
        if not columns:
            raise RequestError(422, "w", "w is empty")
        solver, rows = None, []
        for strength in columns:
            solver, g = _plan_fields(req, s, gen.timesteps, solver=solver, **strength)
            rows.append(g)
        guides = self._guide(gen, rows[0])
        total = sum(counts) * len(rows)
        if total > s.max_bulk_images:
            raise RequestError(422, "counts", f"counts ask for {total} images; the limit is {s.max_bulk_images}")
        if req.seed + total - 1 > MAX_SEED:
            raise RequestError(422, "seed", f"seed + number of images - 1 must be <= {MAX_SEED}")
        plan = BulkPlan(destination=destination, checkpoint=name, checkpoint_uri=_pinned(s.checkpoints[name]),
                        checkpoint_step=gen.checkpoint.step, label_names=names, classes=classes, counts=counts,
                        seed=req.seed, solver=solver.model_dump(), guidance=[g.model_dump() for g in rows],
                        guide_uris={k: _pinned(s.checkpoints[k]) for k in guides},
                        png_files=req.png_files, shard_size=s.shard_size, pad_rows=s.pad_rows)
        return {"plan": plan.to_dict(), "storage": asdict(s.storage_options()),
                "task": {"num_cpus": s.shard_num_cpus, "max_retries": s.shard_max_retries,
                         "threads": s.torch_threads}}


# ---------------------------------------------------------------------------- bulk


def _pinned(uri: str) -> str:
    """Shard tasks may run with another working directory: pin a local path down."""
    return uri if storage.is_remote(uri) else os.path.abspath(storage.strip_scheme(uri))


def _segments(path: str, what: str) -> list[str]:
    parts = [p for p in path.split("/") if p != ""]
    for p in parts:
        if p in (".", ".."):
            raise RequestError(422, "destination", f"{what} must not contain '{p}' segments")
        if not SEGMENT_RE.match(p):
            raise RequestError(422, "destination", f"{what} segment {p!r} has characters outside [A-Za-z0-9._=-] "
                                                   "or does not start with a letter or digit")
    return parts


def resolve_destination(destination: str, output_prefix: str) -> str:
    """The bulk output URI for ``destination``: a relative sub-path of ``output_prefix``
    or a URI/path under it. Anything else (``..``, another bucket or directory, the
    prefix itself) raises RequestError naming ``destination``."""
    dest = destination.strip()
    if not dest:
        raise RequestError(422, "destination", "destination is empty")
    remote = storage.is_remote(output_prefix)
    if remote:
        bucket, _, key = storage.strip_scheme(output_prefix).partition("/")
        base = [bucket] + [p for p in key.split("/") if p]
        root = "s3://"
    else:
        base_path = os.path.realpath(os.path.abspath(os.path.expanduser(storage.strip_scheme(output_prefix))))
        base = [p for p in base_path.split(os.sep) if p]
        root = "/"
    try:
        dest_remote = storage.is_remote(dest)
        scheme = storage._scheme(dest)
    except StorageError:
        raise RequestError(422, "destination", f"destination {destination!r} has an unsupported scheme") from None
    absolute = dest_remote or scheme == "file" or dest.startswith("/")
    if absolute:
        if dest_remote != remote:
            raise RequestError(422, "destination", f"destination {destination!r} is not under the output prefix "
                                                   f"{output_prefix!r}")
        full = _segments(storage.strip_scheme(dest), "destination")
        if not remote:  # compare real paths: a symlink must not lead outside
            real = os.path.realpath("/" + "/".join(full))
            full = [p for p in real.split(os.sep) if p]
    else:
        rel = _segments(dest, "destination")
        full = base + rel
        if not remote:
            real = os.path.realpath("/" + "/".join(full))
            full = [p for p in real.split(os.sep) if p]
    if full[:len(base)] != base or len(full) <= len(base):
        raise RequestError(422, "destination", f"destination {destination!r} must be a sub-path of the output "
                                               f"prefix {output_prefix!r}")
    return root + "/".join(full)


def job_id_for(destination: str) -> str:
    """One job per destination: re-POSTing it resumes rather than duplicates."""
    return hashlib.sha256(destination.encode()).hexdigest()[:16]


@dataclass
class BulkPlan:
    """A bulk job, fully determined: row i has seed ``seed + i``, rows ordered by class,
    then w, then sample; shard k holds rows [k·shard_size, (k+1)·shard_size)."""

    destination: str
    checkpoint: str
    checkpoint_uri: str
    checkpoint_step: int
    label_names: list[str]
    classes: list[int]
    counts: list[int]
    seed: int
    solver: dict  # cfgd.plan.Solver fields
    guidance: list[dict]  # one cfgd.plan.Guidance per strength (the "w" columns)
    guide_uris: dict  # autoguidance: guide name -> checkpoint URI
    png_files: bool
    shard_size: int
    pad_rows: int

    @classmethod
    def from_dict(cls, d: dict) -> "BulkPlan":
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def job_id(self) -> str:
        return job_id_for(self.destination)

    @property
    def ws(self) -> list[float]:
        return [g["w"] for g in self.guidance]

    def sampling(self) -> tuple[Solver, list[Guidance]]:
        """The plan's solver and guidance rows, as validated when the job was submitted."""
        return Solver.model_validate(self.solver), [Guidance.model_validate(g) for g in self.guidance]

    @property
    def total_images(self) -> int:
        return sum(self.counts) * len(self.guidance)

    @property
    def total_shards(self) -> int:
        return math.ceil(self.total_images / self.shard_size)

    def shard_rows(self, shard: int) -> list[tuple[int, int, int, int]]:
        """(row index, label, guidance index, seed) of one shard."""
        lo, hi = shard * self.shard_size, min(self.total_images, (shard + 1) * self.shard_size)
        rows, i = [], 0
        for c, n in zip(self.classes, self.counts):
            for w in range(len(self.guidance)):
                if i + n <= lo:  # skip whole cells before the shard
                    i += n
                    continue
                for _ in range(n):
                    if lo <= i < hi:
                        rows.append((i, c, w, self.seed + i))
                    i += 1
                if i >= hi:
                    return rows
        return rows

    def shard_uri(self, shard: int) -> str:
        return f"{self.destination}/{SHARD_NAME.format(shard)}"

    def manifest(self) -> dict:
        return {"job_id": self.job_id, "plan": self.to_dict(), "total_shards": self.total_shards,
                "total_images": self.total_images}


_SHARD_GENERATORS: dict[tuple, Generator] = {}  # per worker process, reused by later shards


def run_shard(plan_dict: dict, shard: int, opts: StorageOptions | None, threads: int = 1) -> dict:
    """Sample one shard and write ``shard-NNNNN.parquet`` (and PNG files, before it).

    The Parquet file is written last and atomically: its presence marks the shard done.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    plan = BulkPlan.from_dict(plan_dict)
    torch.set_num_threads(threads)

    def cached(uri: str) -> Generator:
        key = (uri, repr(opts), plan.pad_rows)
        if key not in _SHARD_GENERATORS:
            _SHARD_GENERATORS[key] = load_generator(uri, opts, plan.pad_rows)
        return _SHARD_GENERATORS[key]

    wanted = {(u, repr(opts), plan.pad_rows) for u in (plan.checkpoint_uri, *plan.guide_uris.values())}
    for key in set(_SHARD_GENERATORS) - wanted:  # this job's networks are enough per worker
        del _SHARD_GENERATORS[key]
    gen = cached(plan.checkpoint_uri)
    rows = plan.shard_rows(shard)
    idx, labels, ks, seeds = (list(v) for v in zip(*rows))
    solver, guidance = plan.sampling()
    guides = {name: cached(uri) for name, uri in plan.guide_uris.items()}
    images = gen.sample(labels, seeds, SamplingPlan(solver=solver, rows=tuple(guidance[k] for k in ks)),
                        guides=guides, batch_size=len(rows))
    ws = [guidance[k].w for k in ks]
    pngs = [encode_png(img) for img in to_uint8(images)]
    if plan.png_files:
        for i, png in zip(idx, pngs):
            storage.write_bytes_atomic(f"{plan.destination}/{PNG_DIR}/{i:08d}.png", png, opts)
    w_arr = np.asarray(ws, dtype=np.float64)
    table = pa.table({
        "image": pa.array(pngs, type=pa.binary()),
        "label": pa.array(labels, type=pa.int64()),
        "class_name": pa.array([plan.label_names[c] for c in labels], type=pa.string()),
        "w": pa.array(w_arr),
        "guidance_scale": pa.array(1.0 + w_arr),
        "seed": pa.array(seeds, type=pa.int64()),
        "index": pa.array(idx, type=pa.int64()),
        "checkpoint": pa.array([plan.checkpoint] * len(rows), type=pa.string()),
        "checkpoint_step": pa.array([plan.checkpoint_step] * len(rows), type=pa.int64()),
    })
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    uri = plan.shard_uri(shard)
    storage.write_bytes_atomic(uri, buf.getvalue().to_pybytes(), opts)
    return {"shard": shard, "rows": len(rows), "uri": uri}


def existing_shards(destination: str, opts: StorageOptions | None) -> set[int]:
    """Indices of the shard files already under ``destination``."""
    fs = storage.fsspec_fs(destination, opts)
    base = storage.arrow_path(destination)
    try:
        names = storage.with_retries(lambda: fs.ls(base, detail=False), what=f"list {destination}")
    except FileNotFoundError:
        return set()
    found = set()
    for p in names:
        m = SHARD_RE.match(p.rstrip("/").rsplit("/", 1)[-1])
        if m:
            found.add(int(m.group(1)))
    return found


def prepare_destination(plan: BulkPlan, opts: StorageOptions | None) -> set[int]:
    """Write the job manifest (or check that the one there is this job's) and return the
    shards already done. A different job in the same destination is a 409."""
    uri = f"{plan.destination}/{MANIFEST}"
    try:
        old = json.loads(storage.read_bytes(uri, opts))
    except FileNotFoundError:
        old = None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RequestError(409, "destination", f"{uri} is not a readable job manifest; choose another "
                                               "destination or remove it") from None
    if old is not None and old.get("plan") != plan.to_dict():
        changed = sorted(k for k, v in plan.to_dict().items() if old.get("plan", {}).get(k) != v)
        raise RequestError(409, "destination", f"{plan.destination} already holds a different bulk job "
                                               f"(differs in {changed}); choose another destination")
    if old is None:
        storage.write_bytes_atomic(uri, json.dumps(plan.manifest(), indent=2).encode(), opts)
    return {k for k in existing_shards(plan.destination, opts) if k < plan.total_shards}


@dataclass
class _Job:
    plan: BulkPlan
    skipped: set
    done: dict = field(default_factory=dict)  # shard -> rows
    failed: dict = field(default_factory=dict)  # shard -> error
    started: float = field(default_factory=time.time)
    finished: float | None = None

    def status(self) -> dict:
        p = self.plan
        finished = len(self.done) + len(self.skipped) + len(self.failed)
        state = "running" if finished < p.total_shards else ("failed" if self.failed else "done")
        done_shards = sorted(set(self.done) | self.skipped)
        return {
            "job_id": p.job_id, "state": state, "destination": p.destination,
            "total_shards": p.total_shards, "done_shards": len(done_shards),
            "skipped_shards": len(self.skipped), "failed_shards": len(self.failed),
            "total_images": p.total_images,
            "done_images": sum(len(p.shard_rows(k)) for k in self.skipped) + sum(self.done.values()),
            "errors": [f"shard {k}: {e}" for k, e in sorted(self.failed.items())],
            "manifest": f"{p.destination}/{MANIFEST}",
            "outputs": [p.shard_uri(k) for k in done_shards],
            "elapsed_s": round((self.finished or time.time()) - self.started, 3),
        }


def _short_error(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None) or exc
    text = f"{type(cause).__name__}: {cause}"
    return text if len(text) <= 500 else text[:500] + "…"


class ServeState:
    """Runs and tracks bulk jobs and collects sampler replica reports, for one app.

    Used as a detached named actor (:func:`state_actor`): jobs keep running and stay
    visible whichever ingress replica took the POST, and survive that replica.
    """

    def __init__(self):
        self.jobs: dict[str, _Job] = {}
        self.replicas: dict[str, dict] = {}
        self._tasks: set = set()  # strong references: asyncio keeps only weak ones
        self._locks: dict[str, asyncio.Lock] = {}

    async def submit(self, bulk: dict) -> dict:
        """Start (or resume, skipping finished shards) the job of a plan_bulk result.
        Returns the job status, or a refusal (:meth:`RequestError.as_result`)."""
        job_id = BulkPlan.from_dict(bulk["plan"]).job_id
        # One submission per job at a time: two racing POSTs must not both launch shards.
        async with self._locks.setdefault(job_id, asyncio.Lock()):
            try:
                return await self._submit(bulk)
            except RequestError as err:
                return err.as_result()

    async def _submit(self, bulk: dict) -> dict:
        import ray

        plan = BulkPlan.from_dict(bulk["plan"])
        opts = StorageOptions(**bulk["storage"])
        job = self.jobs.get(plan.job_id)
        if job is not None and job.status()["state"] == "running":
            if job.plan != plan:
                raise RequestError(409, "destination", f"{plan.destination} is in use by a running, different job")
            return job.status()
        try:
            skipped = await asyncio.to_thread(prepare_destination, plan, opts)
        except (StorageError, OSError) as err:
            raise RequestError(503, "destination", f"cannot use {plan.destination}: {err}") from None
        job = _Job(plan=plan, skipped=skipped)
        self.jobs[plan.job_id] = job
        task = bulk["task"]
        remote = ray.remote(run_shard).options(num_cpus=task["num_cpus"], max_retries=task["max_retries"],
                                               retry_exceptions=True)
        for k in range(plan.total_shards):
            if k not in skipped:
                ref = remote.remote(plan.to_dict(), k, opts, task["threads"])
                t = asyncio.get_running_loop().create_task(self._track(job, k, ref))
                self._tasks.add(t)
                t.add_done_callback(self._tasks.discard)
        if job.status()["state"] != "running":
            job.finished = time.time()
        return job.status()

    async def _track(self, job: _Job, shard: int, ref) -> None:
        try:
            result = await ref
            job.done[shard] = result["rows"]
        except Exception as exc:  # noqa: BLE001 - reported in the job status
            job.failed[shard] = _short_error(exc)
        if job.status()["state"] != "running":
            job.finished = time.time()

    def status(self, job_id: str) -> dict | None:
        job = self.jobs.get(job_id)
        return None if job is None else job.status()

    def report(self, replica: str, info: dict) -> None:
        self.replicas[replica] = {**info, "reported_at": time.time()}

    def forget(self, replica: str) -> None:
        self.replicas.pop(replica, None)

    def replica_reports(self, max_age_s: float = 60.0) -> dict:
        now = time.time()
        return {r: {**{k: v for k, v in i.items() if k != "reported_at"}, "age_s": round(now - i["reported_at"], 1)}
                for r, i in self.replicas.items() if now - i["reported_at"] <= max_age_s}


def state_actor_name(app_name: str) -> str:
    return f"cfgd-serve-state-{app_name}"


def state_actor(app_name: str):
    """The detached ServeState actor of ``app_name``, created on first use."""
    import ray

    return ray.remote(ServeState).options(
        name=state_actor_name(app_name), namespace=STATE_NAMESPACE, lifetime="detached", get_if_exists=True,
        num_cpus=0, max_restarts=3).remote()
