"""The sampler deployment's settings (its ``user_config``), validated once.

Types and unknown keys are pydantic's job (strict for a ``user_config``, which YAML
already typed; lax for ``serve run ... k=v`` arguments, which arrive as strings); the
ranges and cross-field rules are a :func:`cfgd.checks.check` table, as in every config.
"""

from __future__ import annotations

import json
import math
from dataclasses import fields
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from cfgd.checks import Rule, check
from cfgd.diffusion.plan import MAX_IMAGE_BYTES, first_error
from cfgd.io import storage
from cfgd.io.storage import StorageOptions


class ServeSettings(BaseModel):
    """The sampler deployment's ``user_config``; ``serve deploy`` with a changed one rolls
    it out through ``reconfigure`` without restarting replicas."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    # Allowed checkpoints, name -> URI (checkpoint or run dir, local or s3://). Requests
    # can name only these, so a client never makes the server read an arbitrary path.
    checkpoints: dict[str, str] = {}
    default_checkpoint: str = ""  # a key of ``checkpoints``
    max_models_per_replica: int = 2  # LRU bound on checkpoints held in memory per replica
    w_min: float = -1.0
    w_max: float = 20.0
    default_w: float = 1.0  # when a request gives neither w nor guidance_scale
    max_images: int = 16  # per /generate request
    max_steps: int = 250  # also capped by the checkpoint's T
    max_prompt_chars: int = 300  # prompt / negative_prompt length (tokens are capped by the checkpoint)
    max_embedding_values: int = 4096  # an embedding's values (also fixed by the checkpoint's tokens × dim)
    max_image_bytes: int = 32_768  # a conditioning image's PNG (size and channels: the checkpoint's); bodies are capped at 64 KiB
    # Conditioning images may also be given as a URI (s3://… or a path) under this prefix; "" = base64 only.
    image_prefix: str = ""
    default_steps: int = 50
    max_batch_size: int = 8  # requests merged by @serve.batch (<= max_ongoing_requests)
    batch_wait_timeout_s: float = 0.05
    # CPU kernels round small batches differently; padding every forward pass to a
    # multiple of this many rows makes an image's bytes independent of its batch
    # (see cfgd.serving.row_padding.RowPadded). 0 or 1 turns padding off.
    pad_rows: int = 16
    torch_threads: int = 1  # intra-op threads per replica / shard task
    # Bulk jobs: outputs only under this prefix (s3://bucket/prefix or a local dir);
    # "" disables /bulk.
    output_prefix: str = ""
    shard_size: int = 64  # images per Parquet shard (one Ray task each)
    shard_num_cpus: float = 0.5
    shard_max_retries: int = 3
    max_bulk_images: int = 100_000
    max_running_jobs: int = 4  # bulk jobs running at once; more are refused with 429
    storage: dict[str, Any] = {}  # cfgd.io.storage.StorageOptions fields

    @classmethod
    def from_dict(cls, data: dict | None, strict: bool = True) -> "ServeSettings":
        """Build and validate; raises ValueError naming the first bad setting."""
        data = dict(data or {})
        unknown = sorted(set(data) - set(cls.model_fields))
        if unknown:
            raise ValueError(f"unknown sampler setting(s) {unknown}; valid settings: {list(cls.model_fields)}")
        try:
            return cls.model_validate(data, strict=strict)
        except ValidationError as err:
            e = first_error(err)
            raise ValueError(f"setting {e}" if e.field in cls.model_fields else e.message) from None

    @model_validator(mode="after")
    def _rules(self) -> "ServeSettings":
        if not self.checkpoints:
            raise ValueError("checkpoints must map at least one name to a checkpoint URI")
        for name, uri in self.checkpoints.items():
            if not uri:
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
            Rule("max_prompt_chars", self.max_prompt_chars, self.max_prompt_chars >= 1, ">= 1"),
            Rule("max_embedding_values", self.max_embedding_values, self.max_embedding_values >= 1, ">= 1"),
            Rule("max_image_bytes", self.max_image_bytes, 1 <= self.max_image_bytes <= MAX_IMAGE_BYTES,
                 f"in [1, {MAX_IMAGE_BYTES}]"),
            Rule("default_steps", self.default_steps, 1 <= self.default_steps <= self.max_steps, "in [1, max_steps]"),
            Rule("max_batch_size", self.max_batch_size, self.max_batch_size >= 1, ">= 1"),
            Rule("batch_wait_timeout_s", self.batch_wait_timeout_s, self.batch_wait_timeout_s >= 0, ">= 0"),
            Rule("pad_rows", self.pad_rows, self.pad_rows >= 0, ">= 0"),
            Rule("torch_threads", self.torch_threads, self.torch_threads >= 1, ">= 1"),
            Rule("shard_size", self.shard_size, self.shard_size >= 1, ">= 1"),
            Rule("shard_num_cpus", self.shard_num_cpus, self.shard_num_cpus > 0, "> 0"),
            Rule("shard_max_retries", self.shard_max_retries, self.shard_max_retries >= 0, ">= 0"),
            Rule("max_bulk_images", self.max_bulk_images, self.max_bulk_images >= 1, ">= 1"),
            Rule("max_running_jobs", self.max_running_jobs, self.max_running_jobs >= 1, ">= 1"),
        ], ValueError, prefix="setting ")
        for prefix in (self.output_prefix, self.image_prefix):
            if prefix:
                storage.is_remote(prefix)
        self.storage_options()  # unknown storage keys fail here
        return self

    def storage_options(self) -> StorageOptions:
        valid = [f.name for f in fields(StorageOptions)]
        unknown = sorted(set(self.storage or {}) - set(valid))
        if unknown:
            raise ValueError(f"unknown storage setting(s) {unknown}; valid: {valid}")
        return StorageOptions(**(self.storage or {}))


def settings_from_args(args: dict | None) -> dict:
    """Sampler settings from application args (``serve run module:build_app k=v``).

    ``checkpoint=URI`` is short for ``checkpoints={"default": URI}``. Command-line values
    arrive as strings: pydantic converts numbers, JSON text gives the mappings. Returns
    the validated settings as a plain dict (a ``user_config``).
    """
    args = dict(args or {})
    if "checkpoint" in args:
        if "checkpoints" in args:
            raise ValueError("give checkpoint (one URI) or checkpoints (name -> URI), not both")
        args["checkpoints"] = {"default": args.pop("checkpoint")}
        args.setdefault("default_checkpoint", "default")
    for k in ("checkpoints", "storage"):
        if isinstance(args.get(k), str):
            try:
                args[k] = json.loads(args[k])
            except json.JSONDecodeError:
                raise ValueError(f"setting {k}={args[k]!r} must be a JSON object") from None
    return ServeSettings.from_dict(args, strict=False).model_dump()
