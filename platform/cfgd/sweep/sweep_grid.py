"""The grid of a guidance sweep: its config and its points, each a sampling-plan row.

Every grid point's solver and guidance are built here, once, from the sweep's keys
(cfgd.diffusion.plan), with errors naming the sweep key; the sweep (cfgd.sweep.runner) only runs them.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, make_dataclass
from typing import Any, Optional

import numpy as np

from cfgd.checks import Rule, check
from cfgd.config import ConfigError, plan_keys
from cfgd.data.captions import class_word
from cfgd.diffusion.guidance import plan_cost
from cfgd.diffusion.plan import (FIELDS, RULE_PARAMS, Condition, Guidance, PlanError, SamplingPlan, Solver, plan_row,
                                 strength_columns)
from cfgd.diffusion.solvers import ddim_timesteps
from cfgd.io.storage import StorageOptions

DEFAULT_W = [0.0, 0.5, 1.0, 2.0, 4.0]

@dataclass
class SweepJob:
    """``jobs/sweep.py``'s own keys: every key is top level (``w=[0,1]``, ``steps=25``),
    storage under ``storage.``. The plan's keys follow (``SweepConfig``)."""

    checkpoint: Any = ""  # checkpoint or run dir (path or s3://), or a list of them: a grid dimension
    evaluator: str = ""  # evaluator checkpoint from jobs/train_evaluator.py (path or s3://)
    out: str = ""  # where results go (path or s3://); "" = outputs/sweeps/<first checkpoint's name>
    data_root: str = ""  # real images (Parquet shards); "" = the first checkpoint's data.root
    real_split: str = "test"
    # Guidance strengths, paper form, or guidance_scale (s = 1 + w); neither: DEFAULT_W.
    w: Optional[list[float]] = None
    guidance_scale: Optional[list[float]] = None
    # A text checkpoint: prompt templates, each "{class}" replaced by the sample's class word
    # ("a dark {class}" → "a dark dress"); a list is a grid dimension. Negative prompts likewise
    # ("" or null: ∅). A label checkpoint takes neither.
    prompt: Any = None
    negative_prompt: Any = None
    samples_per_w: int = 500  # samples per grid point; sample i has class i mod num_classes
    use_ema: bool = True
    seed: int = 0  # sample i uses seed + i at every grid point
    k: int = 3  # neighbourhood size of precision/recall
    is_splits: int = 1  # Inception Score splits
    # InceptionV3 weights file of torch-fidelity (local path; extra "fid"): adds the paper-comparable
    # column fid_inception; "" = no such column (see cfgd.evaluate.fid_inception)
    inception_weights: str = ""
    chunk_size: int = 100  # rows per Ray task (mixed w)
    num_workers: int = 0  # sampling actors; 0 = as many as the free CPUs allow
    cpus_per_worker: float = 1.0
    threads_per_worker: int = 0  # torch threads per actor; 0 = max(1, cpus_per_worker)
    ray_address: str = ""  # "" = join RAY_ADDRESS or start a local Ray; "auto" / host:port = a cluster
    num_cpus: int = 0  # CPUs of a local Ray started here (0 = all)
    grid_columns: int = 20  # samples per row of the sample grid
    grid_zoom: int = 2  # pixel magnification of the grid image
    progress: bool = True  # tqdm bar over the whole sweep
    storage: StorageOptions = field(default_factory=StorageOptions)


# Every plan field (cfgd.diffusion.plan) is a sweep key: one value, or a list of values, each list
# one more grid dimension (a rule's parameter multiplies only that rule's points).
SweepConfig = make_dataclass("SweepConfig", plan_keys(skip=("w", "guidance_scale"), grid=True), bases=(SweepJob,))


# ------------------------------------------------------------------ the grid


@dataclass(frozen=True)
class GridPoint:
    checkpoint: str
    solver: Solver
    guidance: Guidance  # this point's plan row, built once (sweep_axes)
    prompt: Optional[str] = None  # a text checkpoint's prompt template ("{class}" → the class word)
    negative_prompt: Optional[str] = None  # its negative prompt template; None = ∅

    @property
    def w(self) -> float:
        return self.guidance.w

    @property
    def group(self) -> tuple:
        """Everything but w: rows of one group go into one grid image and one plot line."""
        return (self.checkpoint, self.solver, self.guidance.model_copy(update={"w": 0.0}), self.prompt,
                self.negative_prompt)

    def condition(self, label: int, label_names: list[str]) -> int | Condition:
        """Sample ``label``'s condition at this point: the label, or the prompts for its class."""
        if self.prompt is None:
            return label
        word = class_word(label_names[label])
        neg = self.negative_prompt.replace("{class}", word) if self.negative_prompt else None
        return Condition(prompt=self.prompt.replace("{class}", word), negative_prompt=neg)

    def params(self) -> dict:
        """The guidance parameters that are not at their defaults (besides rule, w, interval)."""
        d = self.guidance.model_dump(exclude={"rule", "w", "interval", "guidance_scale"})
        defaults = Guidance(rule=self.guidance.rule, guide=self.guidance.guide).model_dump(exclude={"rule", "w",
                                                                                                      "interval"})
        return {k: v for k, v in d.items() if v != defaults.get(k)}


def _listify(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _prompts(cfg: SweepJob) -> tuple[list[Optional[str]], list[Optional[str]]]:
    """The prompt and negative-prompt templates (each a grid dimension), checked."""
    prompts = [None] if cfg.prompt is None else _listify(cfg.prompt)
    negatives = [None] if cfg.negative_prompt is None else [n or None for n in _listify(cfg.negative_prompt)]
    for name, values in (("prompt", prompts), ("negative_prompt", negatives)):
        for v in values:
            if v is not None and not isinstance(v, str):
                raise ConfigError(f"{name}={v!r} is not valid; give a string or a list of strings")
    for p in prompts:
        if p is not None and "{class}" not in p:
            raise ConfigError(f"prompt={p!r} has no '{{class}}': sample i is scored as class i mod C, so every "
                              "prompt template names it (e.g. 'a dark {class}')")
    if negatives != [None] and prompts == [None]:
        raise ConfigError("negative_prompt needs prompt: negative prompts are for text checkpoints")
    return prompts, negatives


def _intervals(value: Any) -> list[Optional[tuple[int, int]]]:
    """null → [None]; [lo, hi] → [(lo, hi)]; [[lo, hi], null, ...] → several."""
    if value is None:
        return [None]
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value):
        value = [value]
    out = []
    for v in _listify(value):
        if v is None:
            out.append(None)
            continue
        if not (isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(b, (int, float)) for b in v)):
            raise ConfigError(f"interval={value!r} is not valid; use null, [t_lo, t_hi], or a list of those")
        out.append((int(v[0]), int(v[1])))
    return out


# The plan keys that belong to the solver: one Solver per combination of them.
SOLVER_KEYS = tuple(k for k, (model, _) in FIELDS.items() if model is Solver)


def sweep_axes(cfg: SweepConfig) -> list[GridPoint]:
    """The grid points after validation, w varying fastest; each point's plan row is built
    here, once (cfgd.diffusion.plan, errors naming the sweep key)."""
    checkpoints = [str(c) for c in _listify(cfg.checkpoint) if str(c)]
    if not checkpoints:
        raise ConfigError("checkpoint is required: a checkpoint or run directory (or a list of them)")
    if not cfg.evaluator:
        raise ConfigError("evaluator is required: an evaluator checkpoint (train one with jobs/train_evaluator.py)")
    ws = strength_columns(cfg.w, cfg.guidance_scale, DEFAULT_W)
    check([
        Rule("samples_per_w", cfg.samples_per_w, cfg.samples_per_w >= 2, ">= 2"),
        Rule("k", cfg.k, 1 <= cfg.k < cfg.samples_per_w, "in [1, samples_per_w)"),
        Rule("is_splits", cfg.is_splits, 1 <= cfg.is_splits <= cfg.samples_per_w, "in [1, samples_per_w]"),
        Rule("chunk_size", cfg.chunk_size, cfg.chunk_size >= 1, ">= 1"),
        Rule("num_workers", cfg.num_workers, cfg.num_workers >= 0, ">= 0"),
        Rule("cpus_per_worker", cfg.cpus_per_worker, cfg.cpus_per_worker > 0, "> 0"),
        Rule("grid_columns", cfg.grid_columns, cfg.grid_columns >= 1, ">= 1"),
        Rule("grid_zoom", cfg.grid_zoom, cfg.grid_zoom >= 1, ">= 1"),
        Rule("w", cfg.w, bool(ws), "a non-empty list"),
    ], ConfigError)
    dims = {k: _listify(getattr(cfg, k)) for k in FIELDS if k not in ("w", "guidance_scale", "interval")}
    dims["interval"] = _intervals(cfg.interval)
    prompts, negatives = _prompts(cfg)
    points: list[GridPoint] = []
    solvers: dict = {}
    try:
        for ck in checkpoints:
            for combo in itertools.product(*dims.values()):
                values = dict(zip(dims, combo))
                # A parameter of another rule does not make a new point.
                for rule, names in RULE_PARAMS.items():
                    if values["rule"] != rule:
                        for name in names:
                            values.pop(name, None)
                if values["rule"] != "autoguidance":
                    values.pop("guide")
                for prompt, neg in itertools.product(prompts, negatives):
                    for w in ([{}] if values["rule"] == "cfg++" else ws):  # CFG++ has λ, not w
                        key = tuple((k, values[k]) for k in SOLVER_KEYS)
                        solver, g = plan_row({**values, **w}, solver=solvers.get(key))
                        solvers[key] = solver
                        p = GridPoint(ck, solver, g, prompt, neg)
                        if p not in points:
                            points.append(p)
    except PlanError as err:
        raise ConfigError(str(err)) from None
    first = next((p for p in points if p.guidance.rule != "cfg++"), None)
    if first is not None and len({p.w for p in points if p.group == first.group}) != len(ws):
        raise ConfigError(f"w={cfg.w!r} / guidance_scale={cfg.guidance_scale!r}: the strengths must be distinct")
    return points


def sample_rows(n: int, num_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(labels, seeds) of the n samples every grid point draws: class i mod C, seed + i."""
    i = np.arange(n, dtype=np.int64)
    return i % num_classes, seed + i


def rows_per_image(p: GridPoint, T: int, alphas_cumprod) -> int:
    """Network rows one sample of ``p`` costs over the run (cfgd.diffusion.guidance.plan_cost)."""
    ts = ddim_timesteps(T, p.solver.steps, p.solver.spacing, alphas_cumprod)
    return plan_cost(SamplingPlan(solver=p.solver, rows=(p.guidance,)), T, ts)[0]
