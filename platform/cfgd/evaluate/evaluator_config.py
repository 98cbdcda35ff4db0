"""The evaluator's training job configuration (``jobs/train_evaluator.py``) and its checks."""

from __future__ import annotations

from dataclasses import dataclass, field

from cfgd.checks import Rule, check
from cfgd.config import ConfigError
from cfgd.evaluate.evalnet import ARCHS
from cfgd.io.storage import StorageOptions


@dataclass
class EvaluatorConfig:
    """``jobs/train_evaluator.py``: train the evaluation classifier on real data."""

    data_root: str = "outputs/data/fashion_mnist"  # Parquet shards <root>/{train,test}/ (path or s3://)
    out: str = "outputs/evaluators/fashion_mnist"  # evaluator checkpoint directory (path or s3://)
    arch: str = "evalnet"  # evalnet (the platform's evaluator) or judgenet (a ResNet: a second judge)
    widths: list[int] = field(default_factory=lambda: [32, 64, 64])  # conv widths (evalnet: pool after all but the last)
    feature_dim: int = 128  # the feature space of FID and precision/recall
    epochs: int = 2
    max_steps: int = 0  # stop after this many optimizer steps (0 = run every epoch)
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-4
    max_train_rows: int = 0  # use only the first rows of the train split (0 = all)
    threads: int = 0  # torch intra-op threads (0 = torch's default)
    seed: int = 0
    augment_shift: int = 0  # translate training images by up to this many pixels (0 = no augmentation)
    overwrite: bool = False  # replace an evaluator already at ``out``
    storage: StorageOptions = field(default_factory=StorageOptions)


def validate_evaluator_config(cfg: EvaluatorConfig) -> EvaluatorConfig:
    check([
        Rule("arch", cfg.arch, cfg.arch in ARCHS, f"one of {sorted(ARCHS)}"),
        Rule("augment_shift", cfg.augment_shift, cfg.augment_shift >= 0, ">= 0"),
        Rule("widths", cfg.widths, len(cfg.widths) >= 1 and all(w >= 1 for w in cfg.widths),
             "a non-empty list of ints >= 1"),
        Rule("feature_dim", cfg.feature_dim, cfg.feature_dim >= 2, ">= 2"),
        Rule("epochs", cfg.epochs, cfg.epochs >= 1, ">= 1"),
        Rule("max_steps", cfg.max_steps, cfg.max_steps >= 0, ">= 0"),
        Rule("batch_size", cfg.batch_size, cfg.batch_size >= 2, ">= 2 (batch norm)"),
        Rule("lr", cfg.lr, cfg.lr > 0, "> 0"),
        Rule("max_train_rows", cfg.max_train_rows, cfg.max_train_rows >= 0, ">= 0"),
        Rule("out", cfg.out, bool(cfg.out), "a directory path or s3:// URI"),
        Rule("data_root", cfg.data_root, bool(cfg.data_root), "a directory path or s3:// URI"),
    ], ConfigError)
    return cfg
