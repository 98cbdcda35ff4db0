"""What one sampler replica holds and does: settings, loaded checkpoints, request checks,
batches, counters. Plain Python: the Serve deployment in serve/app.py only binds it."""

from __future__ import annotations

import base64
import threading
import time
from dataclasses import asdict

import torch
from pydantic import BaseModel

from cfgd.diffusion.plan import FIELDS, Guidance, PlanError, SamplingPlan, Solver, plan_row, strength_columns
from cfgd.sampling.checkpoint_sampler import CheckpointSampler
from cfgd.serving.batching import SampleSpec, sample_specs
from cfgd.serving.bulk import JOB_ID_RE, BulkPlan, existing_shards, pinned, read_job, resolve_destination
from cfgd.serving.checkpoint_cache import ModelCache
from cfgd.serving.request_conditions import check_prompt, request_condition, request_image
from cfgd.serving.schemas import MAX_SEED, BulkRequest, GenerateRequest, RequestError, parse, short_error
from cfgd.serving.settings import ServeSettings


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


def _bulk_cells(req: BulkRequest, gen: CheckpointSampler, s: ServeSettings
                ) -> tuple[list[int], list[str] | None, list[str] | None]:
    """A bulk job's cells: (class ids, None) for a label checkpoint, (prompt indices, prompts)
    for a text one, and each cell's conditioning image (base64 PNG) when the request pairs
    them with the cells; RequestError (422) naming the field."""
    classes, prompts = _bulk_y(req, gen, s, paired=req.images is not None)
    if req.images is None:
        return classes, prompts, None
    if not gen.checkpoint.spec.has_image:
        raise RequestError(422, "images", "this checkpoint has no image condition")
    if len(req.images) != len(classes):
        raise RequestError(422, "images", f"images has {len(req.images)} values for {len(classes)} "
                                          f"{'prompts' if prompts else 'classes'} (one per cell, paired in order)")
    images = []
    for i, img in enumerate(req.images):
        try:  # a URI under image_prefix is read here: the plan holds the bytes it was validated with
            images.append(base64.b64encode(request_image(img, gen, s)).decode())
        except RequestError as err:
            raise RequestError(err.status, f"images[{i}]",
                               err.message.replace("image ", f"images[{i}] ", 1)) from None
    return classes, prompts, images


def _bulk_y(req: BulkRequest, gen: CheckpointSampler, s: ServeSettings, paired: bool
            ) -> tuple[list[int], list[str] | None]:
    """The cells' y: class ids (explicit ones when images are paired with them) or prompts."""
    kind, names = gen.checkpoint.spec.condition, gen.checkpoint.label_names
    given = [f for f in ("classes", "class_names", "prompts", "negative_prompt") if getattr(req, f) is not None]
    allowed = {"label": ("classes", "class_names"), "text": ("prompts", "negative_prompt")}.get(kind)
    if allowed is None:
        raise RequestError(422, "checkpoint", f"bulk jobs take label and text checkpoints; this one is "
                                              f"conditioned on {kind}")
    for f in given:
        if f not in allowed:
            raise RequestError(422, f, f"this checkpoint is conditioned on {kind}: give {' or '.join(allowed)}, "
                                       f"not {f}")
    if kind == "text":
        if not req.prompts:
            raise RequestError(422, "prompts", "this checkpoint is conditioned on text: give prompts (a list)")
        for i, text in enumerate(req.prompts):
            check_prompt(gen, s, f"prompts[{i}]", text)
        if req.negative_prompt is not None:
            check_prompt(gen, s, "negative_prompt", req.negative_prompt)
        return list(range(len(req.prompts))), list(req.prompts)
    if req.classes is not None and req.class_names is not None:
        raise RequestError(422, "classes", "give classes or class_names, not both")
    if paired and req.classes is None and req.class_names is None:
        raise RequestError(422, "classes", "images are paired with classes: give classes (or class_names), one per "
                                           "image")
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
    if len(set(classes)) != len(classes) and not paired:  # with images, one class may have several cells
        raise RequestError(422, "classes", f"classes {classes} has duplicates")
    return classes, None


def _plan_fields(req: BaseModel, s: ServeSettings, T: int, solver: Solver | None = None, has_image: bool = False,
                 **override) -> tuple[Solver, Guidance]:
    """A request's plan fields → (Solver, Guidance): the request edge of cfgd.diffusion.plan.

    Server policy on top of the plan's own bounds: w within [w_min, w_max] and steps
    within [1, min(max_steps, T)]. Raises RequestError naming the request's field.
    """
    values = {k: getattr(req, k) for k in FIELDS}
    values.update(override)
    values["steps"] = _check_steps(values["steps"], s, T)
    try:
        solver, g = plan_row(values, default_w=s.default_w, solver=solver)
        SamplingPlan(solver=solver, rows=(g,)).check_image(has_image)
    except PlanError as err:
        raise RequestError(422, err.field, str(err)) from None
    if g.rule != "cfg++" and not s.w_min <= g.w <= s.w_max:
        name = "guidance_scale" if values.get("guidance_scale") is not None else "w"
        shown = values[name] if values.get(name) is not None else g.w
        lo, hi = (s.w_min + 1, s.w_max + 1) if name == "guidance_scale" else (s.w_min, s.w_max)
        raise RequestError(422, name, f"{name} {shown} is outside the allowed range [{lo}, {hi}]")
    if g.interval is not None and g.interval[1] > T:
        raise RequestError(422, "interval", f"interval {list(g.interval)} must satisfy 1 <= t_lo <= t_hi <= T={T}")
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
        self.last_success = float("-inf")  # monotonic time of the last batch with an image

    # --- configuration

    def apply(self, settings: ServeSettings) -> None:
        """Switch to new settings; the default checkpoint is loaded before this returns,
        so a bad URI fails the rollout instead of the requests. In-flight requests keep
        the CheckpointSampler they already hold."""
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

    def generator(self, name: str | None) -> tuple[str, CheckpointSampler, ServeSettings]:
        """(name, CheckpointSampler, settings) for a requested checkpoint name (None = default)."""
        s, cache = self._current()
        name = s.default_checkpoint if name is None else name
        if name not in s.checkpoints:
            raise RequestError(404, "checkpoint", f"unknown checkpoint {name!r}; available: {sorted(s.checkpoints)}")
        try:
            return name, cache.get(s.checkpoints[name]), s
        except Exception as err:  # noqa: BLE001 - any load failure: this checkpoint is unavailable
            raise RequestError(503, "checkpoint", f"checkpoint {name!r} cannot be loaded: {short_error(err)}") from None

    # --- /generate

    def prepare(self, body: dict | GenerateRequest) -> SampleSpec:
        req: GenerateRequest = parse(GenerateRequest, body)
        name, gen, s = self.generator(req.checkpoint)
        cond = request_condition(req, gen, s, _resolve_class)
        if req.num_images > s.max_images:
            raise RequestError(422, "num_images", f"num_images {req.num_images} is over the limit {s.max_images}")
        if req.seed + req.num_images - 1 > MAX_SEED:
            raise RequestError(422, "seed", f"seed + num_images - 1 must be <= {MAX_SEED}")
        solver, guidance = _plan_fields(req, s, gen.timesteps, has_image=gen.checkpoint.spec.has_image)
        return SampleSpec(gen=gen, checkpoint=name, condition=cond,
                          seeds=[req.seed + i for i in range(req.num_images)], solver=solver, guidance=guidance,
                          guides=self._guide(gen, guidance), format=req.format)

    def _guide(self, gen: CheckpointSampler, guidance: Guidance) -> dict:
        """{name: CheckpointSampler} of an autoguidance request's guide (a configured checkpoint)."""
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

    def sample(self, specs: list[SampleSpec]) -> list[torch.Tensor | Exception]:
        """One dynamic batch → images per request, or the exception of a request that
        failed alone (counted as one batch)."""
        images, calls = sample_specs(specs)
        with self._lock:
            c = self.counters
            self.last_success = time.monotonic() if any(isinstance(i, torch.Tensor) for i in images) \
                else self.last_success
            c["batches"] += 1
            c["requests"] += len(specs)
            c["sample_calls"] += calls
            c["images"] += sum(s.n for s in specs)
            c["largest_batch"] = max(c["largest_batch"], len(specs))
        return images

    def health_sample(self, fresh_s: float = 0.0) -> None:
        """One image, one step, on the default checkpoint: raises if that fails.

        Skipped when a batch succeeded in the last ``fresh_s`` seconds: a replica busy
        serving is healthy, and must not be restarted for being slow to answer a probe.
        """
        if fresh_s and time.monotonic() - self.last_success < fresh_s:
            return
        s, _ = self._current()
        _, gen, _ = self.generator(None)
        img = gen.sample([0], [0], SamplingPlan.uniform(1, solver=Solver(steps=1)), batch_size=1)
        if img.shape != (1, *gen.shape) or not torch.isfinite(img).all():
            raise RuntimeError(f"health sample of {s.default_checkpoint!r} is broken: shape {tuple(img.shape)}")

    # --- introspection

    def stats(self) -> dict:
        with self._lock:
            return {**self.counters, "config_error": self.config_error}

    def loaded(self) -> list[str]:
        """Names of the loaded checkpoints (names only: URIs are the server's business)."""
        with self._lock:
            s, cache = self.settings, self.cache
        if s is None:
            return []
        uris = set(cache.uris())
        return sorted(n for n, u in s.checkpoints.items() if u in uris)

    def describe(self) -> dict:
        with self._lock:
            s = self.settings
        if s is None:
            return {"configured": False, "loaded": []}
        return {"configured": True, "config_error": self.config_error, "default_checkpoint": s.default_checkpoint,
                "checkpoints": sorted(s.checkpoints), "loaded": self.loaded(),
                "max_batch_size": s.max_batch_size, "batch_wait_timeout_s": s.batch_wait_timeout_s}

    # --- /bulk

    def plan_bulk(self, body: dict | BulkRequest) -> dict:
        """Validate a bulk request; returns what :meth:`ServeState.submit` needs."""
        req: BulkRequest = parse(BulkRequest, body)
        s, _ = self._current()
        if not s.output_prefix:
            raise RequestError(503, "destination", "bulk generation is disabled: the server has no output_prefix")
        destination = resolve_destination(req.destination, s.output_prefix)
        name, gen, s = self.generator(req.checkpoint)
        names = gen.checkpoint.label_names
        classes, prompts, images = _bulk_cells(req, gen, s)
        counts = [req.counts] * len(classes) if isinstance(req.counts, int) else list(req.counts)
        if len(counts) != len(classes):
            raise RequestError(422, "counts", f"counts has {len(counts)} values for {len(classes)} "
                                              f"{'prompts' if prompts else 'classes'}")
        if any(c < 0 for c in counts) or sum(counts) == 0:
            raise RequestError(422, "counts", "counts must be >= 0 with at least one image")
        # One plan row per strength: w and guidance_scale are lists here.
        columns = strength_columns(req.w, req.guidance_scale, default=[None])
        if not columns:
            raise RequestError(422, "w", "w is empty")
        solver, rows = None, []
        for strength in columns:
            solver, g = _plan_fields(req, s, gen.timesteps, solver=solver, has_image=gen.checkpoint.spec.has_image,
                                     **strength)
            rows.append(g)
        guides = self._guide(gen, rows[0])
        total = sum(counts) * len(rows)
        if total > s.max_bulk_images:
            raise RequestError(422, "counts", f"counts ask for {total} images; the limit is {s.max_bulk_images}")
        if req.seed + total - 1 > MAX_SEED:
            raise RequestError(422, "seed", f"seed + number of images - 1 must be <= {MAX_SEED}")
        plan = BulkPlan(destination=destination, checkpoint=name, checkpoint_uri=pinned(s.checkpoints[name]),
                        checkpoint_step=gen.checkpoint.step, label_names=names, classes=classes, counts=counts,
                        seed=req.seed, solver=solver.model_dump(), guidance=[g.model_dump() for g in rows],
                        guide_uris={k: pinned(s.checkpoints[k]) for k in guides},
                        png_files=req.png_files, shard_size=s.shard_size, pad_rows=s.pad_rows, prompts=prompts,
                        negative_prompt=req.negative_prompt if prompts else None, images=images)
        return {"plan": plan.to_dict(), "storage": asdict(s.storage_options()), "output_prefix": s.output_prefix,
                "task": {"num_cpus": s.shard_num_cpus, "max_retries": s.shard_max_retries,
                         "threads": s.torch_threads, "max_running_jobs": s.max_running_jobs}}

    def locate_job(self, job_id: str) -> dict | None:
        """A bulk job from storage (its index entry, manifest and finished shards), for a
        state actor that restarted and lost its table; None if there is no such job."""
        s, _ = self._current()
        if not s.output_prefix or not JOB_ID_RE.match(job_id):
            return None
        opts = s.storage_options()
        plan = read_job(s.output_prefix, job_id, opts)
        if plan is None:
            return None
        done = sorted(k for k in existing_shards(plan.destination, opts) if k < plan.total_shards)
        return {"plan": plan.to_dict(), "done": done}
