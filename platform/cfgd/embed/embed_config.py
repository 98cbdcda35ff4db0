"""``jobs/embed.py``'s configuration and its checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cfgd.checks import Rule, check
from cfgd.config import ConfigError
from cfgd.io.storage import StorageOptions


@dataclass
class EmbedConfig:
    """``jobs/embed.py``: add an ``embedding`` column to the shards under ``data_root``."""

    data_root: str = "outputs/data/fashion_mnist"  # the shards to read (path or s3://)
    out: str = "outputs/data/fashion_mnist_embedded"  # where the new shards go (path or s3://; not data_root)
    # The encoder, by import path: a callable (class or function) that, called with
    # encoder_args, returns fn(images float32 (B, C, H, W) in [-1, 1]) -> (B, D) or (B, L, D).
    encoder: str = "cfgd.embed.encoders:EvaluatorFeatures"
    encoder_args: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the encoder
    splits: list[str] = field(default_factory=lambda: ["train", "test"])
    batch_size: int = 256  # rows per encoder call
    num_actors: int = 1  # encoder actors (the actor pool's size)
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0  # > 0 on a GPU cluster: each actor gets that share of a GPU
    ray_address: str = ""  # "" = join RAY_ADDRESS or start a local Ray; "auto" / host:port = a cluster
    num_cpus: int = 0  # CPUs of a local Ray started here (0 = all)
    overwrite: bool = False  # recompute splits already complete at ``out``
    storage: StorageOptions = field(default_factory=StorageOptions)


def validate_embed_config(cfg: EmbedConfig) -> EmbedConfig:
    check([
        Rule("encoder", cfg.encoder, cfg.encoder.count(":") == 1 and all(cfg.encoder.split(":")),
             "an import path 'module:callable'"),
        Rule("out", cfg.out, bool(cfg.out) and cfg.out.rstrip("/") != cfg.data_root.rstrip("/"),
             f"a directory path or s3:// URI other than data_root ({cfg.data_root!r}): the job writes new shards"),
        Rule("data_root", cfg.data_root, bool(cfg.data_root), "a directory path or s3:// URI"),
        Rule("splits", cfg.splits, len(cfg.splits) >= 1, "a non-empty list of split names"),
        Rule("batch_size", cfg.batch_size, cfg.batch_size >= 1, ">= 1"),
        Rule("num_actors", cfg.num_actors, cfg.num_actors >= 1, ">= 1"),
        Rule("cpus_per_actor", cfg.cpus_per_actor, cfg.cpus_per_actor > 0, "> 0"),
        Rule("gpus_per_actor", cfg.gpus_per_actor, cfg.gpus_per_actor >= 0, ">= 0"),
    ], ConfigError)
    return cfg
