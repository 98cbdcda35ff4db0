"""The UNet denoiser ε_θ(x_t, t, y), built from a cfgd.spec.ModelSpec.

Residual blocks with group norm, a sinusoidal timestep embedding and self-attention at
the low resolutions. The condition y enters as a vector added to the timestep
embedding: for labels a class table of ``num_classes + 1`` rows (the last is the
learned null condition ∅); for text and embeddings the pooled output of their encoder
(cfgd.model.conditioning), whose tokens the UNet also reads with cross-attention
wherever it has self-attention. A conditioning image, when the model has one, enters as
extra input channels (cfgd.model.conditioning.image_input). The network knows nothing of
diffusion: it maps (x_t, t, y) to a tensor shaped like x_t.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cfgd.model.conditioning import CrossAttention, build_condition, image_input, is_encoded
from cfgd.spec import MODEL_SIZES, ModelSpec


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps. t: (B,) → (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    """GroupNorm → SiLU → conv, with the (time + class) embedding added in between."""

    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, cout)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        # Zero-init the last conv so each block starts as the identity (stable early training).
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head self-attention over the H·W positions, residual."""

    def __init__(self, ch: int, groups: int, heads: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        if heads == 1:
            # With one head, forward's reshape hands proj a channels-last view of the
            # attention output (no copy), so proj's weight gradient comes back with
            # channels-last strides and DDP warned "Grad strides do not match bucket view
            # strides". A 1x1 weight has the same memory order in both layouts (only the
            # strides of its size-1 dimensions differ), so giving it channels-last strides
            # leaves the forward bit-identical and lets the gradient match DDP's bucket.
            # (With several heads the reshape copies into the default layout: nothing to do.)
            self.proj.weight = nn.Parameter(self.proj.weight.detach().to(memory_format=torch.channels_last))
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W).unbind(1)
        h = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.proj(h.transpose(-1, -2).reshape(B, C, H, W))


class UNet(nn.Module):
    """ε_θ(x_t, t, y): (B, C, H, W), (B,), y → (B, C, H, W).

    y: for a label model (B,) int64 in [0, num_classes], ``num_classes`` being the null
    condition (ModelSpec.null_label); for text and embedding models the raw condition of
    cfgd.model.conditioning, or what :meth:`encode` made of it (a sampler encodes each
    prompt once, not at every step).
    """

    def __init__(self, spec: ModelSpec):
        super().__init__()
        size = MODEL_SIZES[spec.size]
        levels = len(size.mults)
        self.spec = spec
        # Inputs are zero-padded up to a multiple of this (28 → 32 for 4 levels), then cropped.
        self.multiple = 2 ** (levels - 1)
        ch, emb_dim, g = size.channels, 4 * size.channels, size.groups
        attn = {lvl % levels for lvl in size.attn_levels}
        self.time_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.cond = build_condition(spec, size, emb_dim)
        if self.cond is None:
            # One extra row: the learned null embedding ∅ used by condition dropout and guidance.
            self.class_emb = nn.Embedding(spec.null_label + 1, emb_dim)
        cross = (lambda c: [CrossAttention(c, size.text_width, g, size.heads)]) if self.cond is not None \
            else (lambda c: [])
        extra = spec.cond_channels + 1 if spec.has_image else 0  # the conditioning image and its presence
        self.inp = nn.Conv2d(spec.in_channels + extra, ch, 3, padding=1)

        self.down = nn.ModuleList()
        skips, cur = [ch], ch
        for lvl, m in enumerate(size.mults):
            for _ in range(size.res_blocks):
                block = nn.ModuleList([ResBlock(cur, ch * m, emb_dim, g, size.dropout)])
                cur = ch * m
                if lvl in attn:
                    block.extend([Attention(cur, g, size.heads), *cross(cur)])
                self.down.append(block)
                skips.append(cur)
            if lvl < levels - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(cur, cur, 3, stride=2, padding=1)]))
                skips.append(cur)

        self.mid = nn.ModuleList([ResBlock(cur, cur, emb_dim, g, size.dropout), Attention(cur, g, size.heads),
                                  *cross(cur), ResBlock(cur, cur, emb_dim, g, size.dropout)])

        self.up = nn.ModuleList()
        for lvl, m in reversed(list(enumerate(size.mults))):
            for i in range(size.res_blocks + 1):
                block = nn.ModuleList([ResBlock(cur + skips.pop(), ch * m, emb_dim, g, size.dropout)])
                cur = ch * m
                if lvl in attn:
                    block.extend([Attention(cur, g, size.heads), *cross(cur)])
                if lvl > 0 and i == size.res_blocks:
                    block.append(nn.Upsample(scale_factor=2, mode="nearest"))
                    block.append(nn.Conv2d(cur, cur, 3, padding=1))
                self.up.append(block)
        self.out = nn.Sequential(nn.GroupNorm(g, cur), nn.SiLU(), nn.Conv2d(cur, spec.in_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    @staticmethod
    def _run(block, h: torch.Tensor, emb: torch.Tensor, c: dict) -> torch.Tensor:
        for layer in block:
            if isinstance(layer, ResBlock):
                h = layer(h, emb)
            elif isinstance(layer, CrossAttention):
                h = layer(h, c)
            else:
                h = layer(h)
        return h

    def encode(self, y) -> dict:
        """The raw condition y → {"pooled" (B, E), for text/embeddings "context", "mask", and
        with an image condition "image" (B, c + 1, H, W)}."""
        if self.spec.has_image:
            size = (self.spec.image_size, self.spec.image_size)
            return {**self.encode_y(y["y"]),
                    "image": image_input(y["image"], y["image_null"], size)}
        return self.encode_y(y)

    def encode_y(self, y) -> dict:
        """y alone (a model with an image condition: without the image) → its encoded form."""
        if self.cond is None:
            return {"pooled": self.class_emb(y)}
        return self.cond(y)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y) -> torch.Tensor:
        c = y if is_encoded(y) else self.encode(y)
        emb = self.time_mlp(timestep_embedding(t, self.inp.out_channels)) + c["pooled"].to(x.dtype)
        if "image" in c:
            x = torch.cat([x, c["image"].to(x.dtype)], dim=1)
        H, W = x.shape[-2:]
        pad_h, pad_w = -H % self.multiple, -W % self.multiple
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        h = self.inp(x)
        hs = [h]
        for block in self.down:
            h = self._run(block, h, emb, c)
            hs.append(h)
        h = self._run(self.mid, h, emb, c)
        for block in self.up:
            h = self._run(block, torch.cat([h, hs.pop()], dim=1), emb, c)
        return self.out(h)[..., :H, :W]


def build_model(spec: ModelSpec) -> UNet:
    if spec.size not in MODEL_SIZES:
        raise ValueError(f"unknown model size {spec.size!r}; choose one of {list(MODEL_SIZES)}")
    return UNet(spec)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
