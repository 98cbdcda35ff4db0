"""What y is to the network: one encoder per kind of condition, and the cross-attention.

Every encoder maps a raw condition to the same encoded form, a dict of tensors:

- ``pooled`` (B, E): added to the timestep embedding (E = the UNet's embedding width);
- ``context`` (B, L, D) and ``mask`` (B, L) bool, True at real tokens (text and
  embeddings only): what the UNet's cross-attention attends to.

Raw conditions and their null ∅ (condition dropout and guidance use it):

============  ==========================================  ===================================
kind          raw y                                       ∅
============  ==========================================  ===================================
label         (B,) int64 class ids                        the extra row ``null_label``
text          {"tokens": (B, L) int64}, 0 = [PAD]         the empty caption "": all [PAD]
embedding     {"embedding": (B, L, D) float,              a learned (L, D) vector in place of
              "null": (B,) bool}                          the row's embedding
============  ==========================================  ===================================

The text encoder prepends a learned start token that is never masked, so "" still has
one key to attend to (cross-attention over no keys is undefined) and its output is the
pooled vector (like BERT's [CLS]).

A model may also take a conditioning image (ModelSpec.cond_channels > 0; SR3, Palette):
raw y is then {"y": the condition above, "image": (B, c, h, w) float in [-1, 1],
"image_null": (B,) bool}, and its encoded form adds "image" (B, c + 1, H, W), the extra
input channels of :func:`image_input`; its ∅ is zeros with a presence channel of 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cfgd.spec import ModelSpec, UNetSize


def is_encoded(y) -> bool:
    return isinstance(y, dict) and "pooled" in y


class TextCondition(nn.Module):
    """Token ids (B, L) → a transformer's token states (B, 1 + L, width) and a pooled vector."""

    def __init__(self, spec: ModelSpec, size: UNetSize, emb_dim: int):
        super().__init__()
        d = size.text_width
        self.tokens = nn.Embedding(spec.vocab_size, d)
        self.start = nn.Parameter(torch.randn(d) * 0.02)
        self.pos = nn.Parameter(torch.randn(spec.max_tokens + 1, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, max(1, d // 64), 4 * d, dropout=0.0, batch_first=True,
                                           norm_first=True)
        # No nested-tensor fast path: it changes results with the padding of the batch.
        self.encoder = nn.TransformerEncoder(layer, size.text_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.pool = nn.Linear(d, emb_dim)

    def forward(self, y: dict) -> dict:
        ids = y["tokens"]
        B = ids.shape[0]
        mask = torch.cat([torch.ones(B, 1, dtype=torch.bool, device=ids.device), ids != 0], dim=1)
        h = torch.cat([self.start.expand(B, 1, -1), self.tokens(ids)], dim=1) + self.pos[: ids.shape[1] + 1]
        h = self.norm(self.encoder(h, src_key_padding_mask=~mask))
        return {"pooled": self.pool(h[:, 0]), "context": h, "mask": mask}


class EmbeddingCondition(nn.Module):
    """Precomputed vectors (B, L, D) → projected tokens (B, L, width) and their pooled mean."""

    def __init__(self, spec: ModelSpec, size: UNetSize, emb_dim: int):
        super().__init__()
        self.null = nn.Parameter(torch.zeros(spec.embedding_tokens, spec.embedding_dim))  # the learned ∅
        self.proj = nn.Linear(spec.embedding_dim, size.text_width)
        self.norm = nn.LayerNorm(size.text_width)
        self.pool = nn.Linear(size.text_width, emb_dim)

    def forward(self, y: dict) -> dict:
        e = y["embedding"]
        e = torch.where(y["null"].reshape(-1, 1, 1), self.null.to(e.dtype), e)
        h = self.norm(self.proj(e))
        mask = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
        return {"pooled": self.pool(h.mean(dim=1)), "context": h, "mask": mask}


class CrossAttention(nn.Module):
    """Image positions (queries) attend to the condition's tokens (keys, values), residual."""

    def __init__(self, ch: int, context_dim: int, groups: int, heads: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch)
        self.q = nn.Conv2d(ch, ch, 1)
        self.kv = nn.Linear(context_dim, 2 * ch)
        self.proj = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)  # starts as the identity, like the other residual blocks
        nn.init.zeros_(self.proj.bias)
        self.heads = heads

    def forward(self, x: torch.Tensor, c: dict) -> torch.Tensor:
        """x: (B, C, H, W); c: encoded condition with context (B, L, D) and mask (B, L)."""
        B, C, H, W = x.shape
        hd, L = C // self.heads, c["context"].shape[1]
        q = self.q(self.norm(x)).reshape(B, self.heads, hd, H * W).transpose(-1, -2)
        k, v = self.kv(c["context"].to(x.dtype)).reshape(B, L, 2, self.heads, hd).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=c["mask"][:, None, None, :])
        # contiguous: proj's weight gradient then has DDP's bucket strides (see unet.Attention).
        return x + self.proj(h.transpose(-1, -2).reshape(B, C, H, W).contiguous())


def image_input(image: torch.Tensor, null: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The conditioning image as extra input channels: (B, c, h, w) in [-1, 1] and null (B,) bool →
    (B, c + 1, H, W): the image resized to the sample's size (bilinear; as it is when the
    sizes match) and zeroed where null, then a presence channel, 1 where given, 0 for ∅."""
    if tuple(image.shape[-2:]) != tuple(size):
        image = F.interpolate(image, size=size, mode="bilinear", align_corners=False)
    on = (~null).to(image.dtype).reshape(-1, 1, 1, 1)
    return torch.cat([image * on, on.expand(-1, 1, *size)], dim=1)


def drop_conditions(y, p_uncond: float, spec: ModelSpec, generator: torch.Generator | None = None,
                    p_image: float = 0.0, p_both: float = 0.0):
    """Condition dropout of a model with an image condition (InstructPix2Pix): per row, one of
    three exclusive events: both conditions → ∅ (p_both), y alone (p_uncond), the image alone
    (p_image); otherwise both are kept. Without an image, :func:`drop_condition`."""
    if not spec.has_image:
        return drop_condition(y, p_uncond, spec, generator)
    B, device = y["image"].shape[0], y["image"].device
    u = torch.rand(B, generator=generator, device=device)
    both = u < p_both
    primary = both | ((u >= p_both) & (u < p_both + p_uncond))
    image = both | ((u >= p_both + p_uncond) & (u < p_both + p_uncond + p_image))
    return {"y": null_rows(y["y"], primary, spec), "image": y["image"], "image_null": y["image_null"] | image}


def null_rows(y, drop: torch.Tensor, spec: ModelSpec):
    """y with the rows where ``drop`` (B,) bool is true replaced by ∅ (module docstring)."""
    if spec.condition == "label":
        return torch.where(drop, torch.full_like(y, spec.null_label), y)
    if spec.condition == "text":
        return {"tokens": torch.where(drop[:, None], torch.zeros_like(y["tokens"]), y["tokens"])}
    return {"embedding": y["embedding"], "null": y.get("null", torch.zeros_like(drop)) | drop}


def drop_condition(y, p_uncond: float, spec: ModelSpec, generator: torch.Generator | None = None):
    """Condition dropout (cfg-math.md §4): each row's y becomes ∅ with probability p_uncond.

    ∅ per kind (module docstring): the null label; the empty caption (all [PAD]); the
    embedding's null flag set (the model substitutes its learned null vector).
    """
    if spec.condition == "label":
        from cfgd.diffusion.process import drop_labels

        return drop_labels(y, p_uncond, spec.null_label, generator)
    key = "tokens" if spec.condition == "text" else "embedding"
    B, device = y[key].shape[0], y[key].device
    drop = torch.rand(B, generator=generator, device=device) < p_uncond if p_uncond > 0 else \
        torch.zeros(B, dtype=torch.bool, device=device)
    if spec.condition == "text":
        return {"tokens": torch.where(drop[:, None], torch.zeros_like(y["tokens"]), y["tokens"])}
    return {"embedding": y["embedding"], "null": y.get("null", torch.zeros_like(drop)) | drop}


def build_condition(spec: ModelSpec, size: UNetSize, emb_dim: int) -> nn.Module | None:
    """The encoder of a text or embedding model; None for labels (the UNet's own class table,
    ``class_emb``, whose name every label checkpoint's weights carry)."""
    if spec.condition == "text":
        return TextCondition(spec, size, emb_dim)
    if spec.condition == "embedding":
        return EmbeddingCondition(spec, size, emb_dim)
    return None
