"""Classifier-free guidance, in one place (shared/docs/cfg-math.md §3, §5).

``ε̂ = (1 + w)·ε_θ(x_t, t, y) − w·ε_θ(x_t, t, ∅)``, with ``guidance_scale = 1 + w``.
``w`` may differ per row, so one batch can mix classes and guidance strengths.
The conditional and unconditional halves run as one batched forward pass, and
rows that do not need a half do not pay for it.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from cfgd.diffusion import EpsFn, bcast


def null_label(num_classes: int) -> int:
    """Index of the learned null condition ∅: the extra embedding row after the classes.

    The only place that decides it; the model sizes its table from it and
    condition dropout and guidance use it.
    """
    return num_classes


def resolve_w(w=None, guidance_scale=None, batch: int | None = None) -> torch.Tensor:
    """Guidance strength in the paper's form, from ``w`` or ``guidance_scale`` (= 1 + w).

    Either may be a number, a sequence or a tensor of shape (B,). Giving both is an
    error; giving neither means w = 0 (plain conditional sampling). Returns float64 (B,)
    when ``batch`` is given (a scalar is broadcast), else the values' own shape.
    """
    if w is not None and guidance_scale is not None:
        raise ValueError("give w or guidance_scale, not both (guidance_scale = 1 + w)")
    if guidance_scale is not None:
        w = torch.as_tensor(guidance_scale, dtype=torch.float64) - 1.0
    w = torch.as_tensor(0.0 if w is None else w, dtype=torch.float64).cpu()
    if not torch.isfinite(w).all():
        raise ValueError(f"w must be finite, got {w.tolist()}")
    if batch is not None:
        if w.dim() == 0:
            w = w.expand(batch).clone()
        elif w.shape != (batch,):
            raise ValueError(f"w must be a scalar or have shape ({batch},), got {tuple(w.shape)}")
    return w


def combine(eps_c: torch.Tensor, eps_u: torch.Tensor, w: torch.Tensor, rescale: float = 0.0) -> torch.Tensor:
    """ε̂ = (1 + w)·ε_c − w·ε_u, optionally with guidance rescale φ (Lin et al. 2023).

    eps_c, eps_u: (B, C, H, W); w: (B,). Rescale matches ε̂'s per-sample std to ε_c's,
    then mixes: φ·ε̂_rescaled + (1 − φ)·ε̂, curbing over-exposure at large w.
    """
    wb = bcast(w, eps_c)
    eps = eps_c + wb * (eps_c - eps_u)
    if rescale > 0:
        dims = tuple(range(1, eps.dim()))
        std_c = eps_c.std(dim=dims, keepdim=True)
        std_g = eps.std(dim=dims, keepdim=True).clamp_min(1e-12)
        # An unconditional row (w = −1) has no ε_c to match: leave it as it is.
        factor = torch.where(wb == -1, torch.ones_like(std_c), std_c / std_g)
        eps = rescale * eps * factor + (1 - rescale) * eps
    return eps


class GuidedEps:
    """An ``eps_fn(x_t, t, labels)`` that applies per-row classifier-free guidance.

    Built once per sampling run. At timestep t, row i has the effective strength
    ``w_i`` inside its guidance interval and 0 outside it (guidance off, ε̂ = ε_c, as in
    Kynkäänniemi et al. 2024). One forward pass then covers

    * the conditional half for rows with effective w ≠ −1, and
    * the unconditional half for rows with effective w ≠ 0,

    so w = 0 rows cost one evaluation, w = −1 rows one, guided rows two.
    ``interval`` is (t_lo, t_hi), inclusive, in timesteps 1..T; each bound may be a
    number or a per-row tensor (B,).
    """

    def __init__(self, eps_fn: EpsFn, labels: torch.Tensor, w: torch.Tensor, null: int,
                 interval: Sequence | None = None, rescale: float = 0.0):
        self.eps_fn = eps_fn
        self.labels = labels
        self.null = null
        self.rescale = rescale
        self.w = w.to(torch.float64).cpu()
        B = self.w.shape[0]
        lo, hi = (-math.inf, math.inf) if interval is None else interval
        self.lo = torch.as_tensor(lo, dtype=torch.float64).expand(B).clone()
        self.hi = torch.as_tensor(hi, dtype=torch.float64).expand(B).clone()
        if (self.lo > self.hi).any():
            raise ValueError(f"guidance interval needs t_lo <= t_hi, got {interval}")
        self._plans: dict[int, tuple] = {}
        self.rows_evaluated = 0  # network rows run so far (cost accounting, tests)

    def plan(self, t: int, device: torch.device) -> tuple:
        """(w_eff (B,), cond rows, uncond rows) at timestep t; computed once per t."""
        key = (t, str(device))
        if key not in self._plans:
            inside = (self.lo <= t) & (t <= self.hi)
            w_eff = torch.where(inside, self.w, torch.zeros_like(self.w))
            cond = (w_eff != -1).nonzero().flatten()
            uncond = (w_eff != 0).nonzero().flatten()
            self._plans[key] = (w_eff.to(device), cond.to(device), uncond.to(device))
        return self._plans[key]

    def __call__(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C, H, W); t: (B,), one timestep for the whole batch → ε̂ (B, C, H, W)."""
        labels = self.labels if labels is None else labels
        w, cond, uncond = self.plan(int(t.reshape(-1)[0]), x.device)
        B, n_c, n_u = x.shape[0], len(cond), len(uncond)
        self.rows_evaluated += n_c + n_u
        if n_u == 0:  # nobody guided at this step: ε̂ = ε_c
            return self.eps_fn(x, t, labels)
        null = torch.full((n_u,), self.null, dtype=labels.dtype, device=labels.device)
        if n_c == B and n_u == B:
            # The common case: both halves for every row in one forward of 2B rows.
            out = self.eps_fn(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]))
            return combine(out[:B], out[B:], w, self.rescale)
        out = self.eps_fn(torch.cat([x[cond], x[uncond]]), torch.cat([t[cond], t[uncond]]),
                          torch.cat([labels[cond], null]))
        # A missing half always has weight 0 (w = 0 ignores ε_u, w = −1 ignores ε_c),
        # so zeros stand in for it.
        eps_c = torch.zeros_like(x).index_copy_(0, cond, out[:n_c])
        eps_u = torch.zeros_like(x).index_copy_(0, uncond, out[n_c:])
        return combine(eps_c, eps_u, w, self.rescale)
