"""What a model is, without torch: its size registry, its spec, the null label, the noise schedules
and parameterisations.

Config validation, checkpoint metadata and request checks need these names and bounds
before any network exists; keeping them here (no torch import) lets ``cfgd.config``
load and check a job's configuration without pulling in torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

SCHEDULES = ("linear", "cosine")  # cfgd.diffusion.process.make_schedule builds them
# What the network predicts (cfgd.diffusion.process.as_eps_fn turns each into ε for the sampler):
# eps = the noise ε; v = √ᾱ·ε − √(1−ᾱ)·x0 (Salimans & Ho 2022); x0 = the clean image.
PARAMETERIZATIONS = ("eps", "v", "x0")
# Per-timestep loss weights (cfgd.diffusion.process.loss_weights): uniform, or min-SNR-γ (Hang et al.
# 2023; with an offset δ, x0 weight min(SNR + δ, γ)).
LOSS_WEIGHTINGS = ("uniform", "min_snr")

# Bounds on a spec read from a checkpoint, checked before anything is allocated: a
# meta.json claiming num_classes=10**9 must be refused, not run out of memory.
MAX_IMAGE_SIZE = 1024
MAX_CHANNELS = 4
MAX_CLASSES = 100_000
MAX_TIMESTEPS = 100_000
MAX_VOCAB = 1_000_000
MAX_TOKENS = 1024  # caption tokens, or rows of an L×D embedding
MAX_EMBEDDING_DIM = 65_536

# What y is (cfgd.model.conditioning): a class id; a caption, tokenized with the checkpoint's
# tokenizer and encoded by a transformer trained with the denoiser; or a precomputed vector
# (one of D, or L×D tokens) from an encoder outside the platform.
CONDITIONS = ("label", "text", "embedding")


@dataclass(frozen=True)
class UNetSize:
    channels: int  # width at the top resolution
    mults: tuple[int, ...]  # width multipliers per resolution level
    res_blocks: int  # residual blocks per level
    attn_levels: tuple[int, ...]  # levels (0 = top) with self-attention; -1 = the lowest
    groups: int = 8  # group-norm groups
    heads: int = 1
    dropout: float = 0.0
    text_width: int = 64  # width of the text encoder and of the cross-attention's keys
    text_layers: int = 2  # transformer layers of the text encoder


# Named sizes. tiny: unit tests; small: the 2-core CPU demo; base/large: GPU clusters.
MODEL_SIZES: dict[str, UNetSize] = {
    "tiny": UNetSize(channels=16, mults=(1, 2), res_blocks=1, attn_levels=(-1,), groups=4, text_width=32,
                     text_layers=1),
    "small": UNetSize(channels=32, mults=(1, 2, 2), res_blocks=1, attn_levels=(-1,)),
    "base": UNetSize(channels=64, mults=(1, 2, 2, 2), res_blocks=2, attn_levels=(-2, -1), groups=32,
                     heads=4, dropout=0.1, text_width=256, text_layers=4),
    "large": UNetSize(channels=128, mults=(1, 2, 2, 2), res_blocks=2, attn_levels=(-2, -1), groups=32,
                      heads=4, dropout=0.1, text_width=512, text_layers=6),
}


def null_label(num_classes: int) -> int:
    """Index of the learned null condition ∅: the extra embedding row after the classes.

    The only place that decides it: the network sizes its class table from it, and
    condition dropout and guidance use it.
    """
    return num_classes


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the network; saved in every checkpoint.

    ``condition`` says what y is (:data:`CONDITIONS`). A text model also needs its
    vocabulary size and token count (the tokenizer itself travels in the checkpoint's
    meta.json); an embedding model the shape (tokens, dim) of its vectors, tokens = 1 for
    one vector per image. Checkpoints written before conditions existed are label models.
    A model may also take a conditioning image (``cond_channels`` > 0, of ``cond_height`` ×
    ``cond_width``): a second condition, with its own null.
    """

    size: str
    image_size: int
    in_channels: int
    num_classes: int
    condition: str = "label"
    vocab_size: int = 0
    max_tokens: int = 0
    embedding_tokens: int = 0
    embedding_dim: int = 0
    # A second condition, an image (cfgd.data.image_condition): its channels (0 = none) and size.
    cond_channels: int = 0
    cond_height: int = 0
    cond_width: int = 0

    @property
    def null_label(self) -> int:
        return null_label(self.num_classes)

    @property
    def has_image(self) -> bool:
        """Whether y carries a conditioning image besides the label, text or embedding."""
        return self.cond_channels > 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> "ModelSpec":
        """A spec from untrusted metadata, bounded before anything is built.

        Raises ValueError naming the first bad field and what is valid.
        """
        if not isinstance(data, dict):
            raise ValueError(f"model spec must be a mapping, got {type(data).__name__}")
        names = [f.name for f in fields(cls)]
        required = names[:4]  # the rest have defaults: older checkpoints lack them
        if not set(required) <= set(data) <= set(names):
            raise ValueError(f"model spec has keys {sorted(data)}; expected {required} and optionally "
                             f"{names[4:]}")
        data = {f.name: data.get(f.name, f.default) for f in fields(cls)}
        if data["size"] not in MODEL_SIZES:
            raise ValueError(f"model size {data['size']!r} is not valid; it must be one of {list(MODEL_SIZES)}")
        if data["condition"] not in CONDITIONS:
            raise ValueError(f"model condition {data['condition']!r} is not valid; it must be one of "
                             f"{list(CONDITIONS)}")
        text, emb = data["condition"] == "text", data["condition"] == "embedding"
        bounds = {"image_size": (4, MAX_IMAGE_SIZE), "in_channels": (1, MAX_CHANNELS),
                  "num_classes": (1, MAX_CLASSES), "vocab_size": (3 if text else 0, MAX_VOCAB if text else 0),
                  "max_tokens": (1 if text else 0, MAX_TOKENS if text else 0),
                  "embedding_tokens": (1 if emb else 0, MAX_TOKENS if emb else 0),
                  "embedding_dim": (1 if emb else 0, MAX_EMBEDDING_DIM if emb else 0),
                  "cond_channels": (0, MAX_CHANNELS + 1)}
        image = isinstance(data["cond_channels"], int) and data["cond_channels"] > 0
        bounds.update({k: (1 if image else 0, MAX_IMAGE_SIZE if image else 0) for k in ("cond_height", "cond_width")})
        for key, (lo, hi) in bounds.items():
            v = data[key]
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise ValueError(f"model spec {key}={v!r} is not valid for condition {data['condition']!r}; "
                                 f"it must be an int in [{lo}, {hi}]")
        return cls(**data)
