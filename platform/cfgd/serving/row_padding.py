"""Batch-invariant bytes: the network run on batches padded to a fixed multiple of rows."""

from __future__ import annotations

import torch


class RowPadded(torch.nn.Module):
    """The network with every forward batch padded to a multiple of ``multiple`` rows.

    Why: CPU kernels (oneDNN convolutions, MKL GEMM) choose their algorithm by batch
    size, and for small batches that changes each row's rounding. The DDIM step at
    t = T divides ε̂ by sqrt(ᾱ_T) ≈ 0.01, so a seed gave visibly different images alone
    and inside a batch (up to 1e-2; torch 2.13 CPU, measured). Every batch of >= 16 rows
    gave bit-identical rows, so padding makes an image's bytes independent of what it
    was batched with. Pad rows copy row 0's timestep and label; their output is dropped.
    """

    def __init__(self, net: torch.nn.Module, multiple: int):
        super().__init__()
        self.net = net
        self.multiple = multiple

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        pad = -B % self.multiple
        if pad == 0:
            return self.net(x, t, y)
        nhwc = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
        x = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))])
        if nhwc:  # cat returns NCHW; keep the layout the network was converted to
            x = x.contiguous(memory_format=torch.channels_last)
        t = torch.cat([t, t[:1].expand(pad)])
        y = torch.cat([y, y[:1].expand(pad)])
        return self.net(x, t, y)[:B]
