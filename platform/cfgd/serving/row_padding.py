"""Batch-invariant bytes: the network run on batches padded to a fixed multiple of rows."""

from __future__ import annotations

import torch

from cfgd.diffusion import conditions as cond_ops


class RowPadded(torch.nn.Module):
    """The network with every forward batch padded to a multiple of ``multiple`` rows.

    Why: CPU kernels (oneDNN convolutions, MKL GEMM) choose their algorithm by batch
    size, and for small batches that changes each row's rounding. The DDIM step at
    t = T divides ε̂ by sqrt(ᾱ_T) ≈ 0.01, so a seed gave visibly different images alone
    and inside a batch (up to 1e-2; torch 2.13 CPU, measured). Every batch of >= 16 rows
    gave bit-identical rows, so padding makes an image's bytes independent of what it
    was batched with. Pad rows copy row 0's timestep and condition; their output is dropped.
    The condition encoders (``encode``, ``encode_y``) are padded the same way.
    """

    def __init__(self, net: torch.nn.Module, multiple: int):
        super().__init__()
        self.net = net
        self.multiple = multiple

    def _pad_rows(self, y, pad: int):
        return cond_ops.cat([y, cond_ops.take(y, torch.zeros(pad, dtype=torch.long, device=_device(y)))])

    def encode(self, y) -> dict:
        return self._padded(self.net.encode, y)

    def encode_y(self, y) -> dict:
        return self._padded(self.net.encode_y, y)

    @property
    def spec(self):
        return self.net.spec

    def _padded(self, fn, y) -> dict:
        B = cond_ops.rows(y)
        pad = -B % self.multiple
        out = fn(self._pad_rows(y, pad) if pad else y)
        return cond_ops.take(out, slice(0, B))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y) -> torch.Tensor:
        B = x.shape[0]
        pad = -B % self.multiple
        if pad == 0:
            return self.net(x, t, y)
        nhwc = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
        x = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))])
        if nhwc:  # cat returns NCHW; keep the layout the network was converted to
            x = x.contiguous(memory_format=torch.channels_last)
        t = torch.cat([t, t[:1].expand(pad)])
        return self.net(x, t, self._pad_rows(y, pad))[:B]


def _device(y) -> torch.device:
    """The device of a condition (a tensor or a mapping of tensors)."""
    return y.device if isinstance(y, torch.Tensor) else _device(next(iter(y.values())))
