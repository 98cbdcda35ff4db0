"""A batch's condition y as the sampler moves it, without knowing what it is.

y is a tensor with the batch first (class ids (B,)) or a mapping of such tensors (token
ids; an embedding with its null flags; or what a network encoded them to, see
cfgd.model.conditioning), possibly nested (a model with an image condition: {"y": …,
"image": …, "image_null": …}). The sampler only ever counts rows, selects rows, joins two
batches and moves y to a device: these four functions, so guidance (cfgd.diffusion.guidance)
is written once for every kind of condition.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence, Union

import torch

Cond = Union[torch.Tensor, Mapping[str, Any]]


def rows(c: Cond) -> int:
    """The batch size of y."""
    if isinstance(c, torch.Tensor):
        return c.shape[0]
    sizes = {rows(v) for v in c.values()}
    if len(sizes) != 1:
        raise ValueError(f"a condition's tensors must share their first (batch) dimension, got {sorted(sizes)}")
    return sizes.pop()


def take(c: Cond, idx: torch.Tensor | slice) -> Cond:
    """Rows ``idx`` (a LongTensor of indices or a slice) of y."""
    if isinstance(c, torch.Tensor):
        return c[idx]
    return {k: take(v, idx) for k, v in c.items()}


def cat(parts: Sequence[Cond]) -> Cond:
    """The batches ``parts`` one after the other (same kind and keys)."""
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(list(parts))
    return {k: cat([p[k] for p in parts]) for k in parts[0]}


def to(c: Cond, device: torch.device | str) -> Cond:
    if isinstance(c, torch.Tensor):
        return c.to(device)
    return {k: to(v, device) for k, v in c.items()}
