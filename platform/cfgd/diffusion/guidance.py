"""Guidance, in one place: every rule, per row, and its cost in network rows.

Formulas: docs/guidance-methods.md (CFG: cfg-math.md §3, §5). One batch may
mix rules and parameters row by row (a :class:`cfgd.diffusion.plan.SamplingPlan`).
:class:`GuidedDenoiser` turns the network(s) into what a solver needs at timestep t,
per row: the guided x̂0 (after clipping or dynamic thresholding) and the ε that
re-noises it (ε̂ itself, except for CFG++, which re-noises with ε_u). Where ᾱ_t = 0
(zero terminal SNR, t = T) ε carries nothing about x0, so there the rules act on the
networks' x̂0 instead (:meth:`GuidedDenoiser._terminal`).

At each step one forward pass of the main network covers the conditional rows and the
rows that need ε_u, and one pass of each guiding network (autoguidance) covers its
rows. A row that is not guided at t (w_t = 0, or outside its interval) costs one
network row; a CFG row at w = −1 costs one (ε_u only). :func:`evaluations` is the rule,
and :func:`plan_cost` its total, used by the sweep's and Serve's cost estimates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch

from cfgd.diffusion import conditions as cond_ops
from cfgd.diffusion.conditions import Cond
from cfgd.diffusion.plan import RULES, WEIGHT_SCHEDULES, Guidance, SamplingPlan
from cfgd.diffusion.process import EpsFn, Schedule, bcast, x0_fn

CFG, CFGPP, APG, ZERO, AUTO = (RULES.index(r) for r in ("cfg", "cfg++", "apg", "cfg_zero_star", "autoguidance"))


def combine(eps_c: torch.Tensor, eps_u: torch.Tensor, w: torch.Tensor, rescale: float = 0.0) -> torch.Tensor:
    """CFG: ε̂ = (1 + w)·ε_c − w·ε_u, optionally with guidance rescale φ (Lin et al. 2023).

    eps_c, eps_u: (B, C, H, W); w: (B,). Rescale matches ε̂'s per-sample std to ε_c's,
    then mixes: φ·ε̂_rescaled + (1 − φ)·ε̂, curbing over-exposure at large w.
    """
    wb = bcast(w, eps_c)
    return _rescale(eps_c, eps_c + wb * (eps_c - eps_u), torch.full_like(w, float(rescale), dtype=torch.float64),
                    wb == -1)


def _rescale(eps_c: torch.Tensor, eps: torch.Tensor, phi: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """Per-row rescale φ (B,); rows where ``skip`` (B,1,1,1) is true are left as they are."""
    if not bool((phi > 0).any()):
        return eps
    dims = tuple(range(1, eps.dim()))
    std_c = eps_c.std(dim=dims, keepdim=True)
    std_g = eps.std(dim=dims, keepdim=True).clamp_min(1e-12)
    # An unconditional row (CFG at w = −1) has no ε_c to match.
    factor = torch.where(skip, torch.ones_like(std_c), std_c / std_g)
    p = bcast(phi, eps)
    return p * eps * factor + (1 - p) * eps


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row inner product over (C, H, W): (B, 1, 1, 1)."""
    return (a * b).sum(dim=tuple(range(1, a.dim())), keepdim=True)


# ----------------------------------------------------------------------------- rows


class Rows:
    """The plan's per-row parameters as tensors (B,), built once per run."""

    def __init__(self, rows: tuple[Guidance, ...], T: int):
        f64 = lambda vals: torch.tensor(vals, dtype=torch.float64)  # noqa: E731
        self.T = T
        self.rule = torch.tensor([RULES.index(g.rule) for g in rows])
        self.w = f64([g.w for g in rows])
        self.lam = f64([g.lam for g in rows])
        self.beta = f64([g.apg_beta for g in rows])
        self.r = f64([math.inf if g.apg_r is None else g.apg_r for g in rows])
        self.apg_eta = f64([g.apg_eta for g in rows])
        self.sched = torch.tensor([WEIGHT_SCHEDULES.index(g.weight_schedule) for g in rows])
        self.lo = f64([g.interval[0] if g.interval else -math.inf for g in rows])
        self.hi = f64([g.interval[1] if g.interval else math.inf for g in rows])
        self.rescale = f64([g.rescale for g in rows])
        self.clip = torch.tensor([g.clip for g in rows])
        self.threshold = f64([math.nan if g.threshold is None else g.threshold for g in rows])
        guides = list(dict.fromkeys(g.guide for g in rows if g.guide is not None))
        self.guides = guides
        self.guide = torch.tensor([guides.index(g.guide) if g.guide is not None else -1 for g in rows])
        self.used = {int(v) for v in self.rule.unique()}
        # Two conditions (an image I and y): rows that guide both, their s_I and combination.
        self.multi = torch.tensor([g.multi for g in rows])
        self.any_multi = bool(self.multi.any())
        self.image_scale = f64([g.image_scale for g in rows])
        self.independent = torch.tensor([g.combine == "independent" for g in rows])

    def strength(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(w_t (B,) float64, guided (B,) bool) at timestep t.

        w_t = w·g(u), u = 1 − t/T, inside the row's interval and 0 outside. A CFG++
        row is guided wherever it is inside its interval (its strength is λ).
        """
        u = 1.0 - t / self.T
        g = torch.tensor([1.0, 2.0 * u, 1.0 - math.cos(math.pi * u)], dtype=torch.float64)[self.sched]
        inside = (self.lo <= t) & (t <= self.hi)
        w_t = torch.where(inside, self.w * g, torch.zeros_like(self.w))
        guided = torch.where(self.rule == CFGPP, inside, w_t != 0)
        return w_t, guided


def coefficients(rows: Rows, t: int) -> torch.Tensor:
    """The two-condition rows' ε̂ as a sum over condition subsets at t: (B, 4) float64, the
    weights of ε(I,y), ε(I,∅), ε(∅,y), ε(∅,∅) (docs/guidance.md, "Two conditions").

    With s = 1 + w_t and s_I = 1 + (image_scale − 1)·g(u) (the row's schedule and interval
    apply to both strengths; outside the interval s = s_I = 1, so ε̂ = ε(I,y)):
    sequential = (s, s_I − s, 0, 1 − s_I); independent = (0, s_I, s, 1 − s_I − s).
    """
    w_t, _ = rows.strength(t)
    u = 1.0 - t / rows.T
    g = torch.tensor([1.0, 2.0 * u, 1.0 - math.cos(math.pi * u)], dtype=torch.float64)[rows.sched]
    inside = (rows.lo <= t) & (t <= rows.hi)
    s = 1.0 + w_t
    s_i = torch.where(inside, 1.0 + (rows.image_scale - 1.0) * g, torch.ones_like(s))
    zero = torch.zeros_like(s)
    seq = torch.stack([s, s_i - s, zero, 1.0 - s_i], dim=1)
    ind = torch.stack([zero, s_i, s, 1.0 - s_i - s], dim=1)
    return torch.where(rows.independent[:, None], ind, seq)


def evaluations(rows: Rows, t: int) -> tuple[torch.Tensor, ...]:
    """Which rows need which network evaluation at t: (ε_c, ε_u, guide, ε(∅,y), ε(∅,∅)) masks (B,).

    ε_c for every row but CFG rows at w_t = −1 (ε̂ = ε_u); ε_u for guided rows of the
    rules that use ∅; the guiding network's ε_c for guided autoguidance rows. A row
    guiding two conditions needs each subset whose weight is not 0 (:func:`coefficients`;
    there ε_c is ε(I,y) and ε_u is ε(I,∅)).
    """
    w_t, guided = rows.strength(t)
    need_c = ~((rows.rule == CFG) & (w_t == -1))
    need_g = guided & (rows.rule == AUTO)
    need_u = guided & ~need_g
    if not rows.any_multi:
        none = torch.zeros_like(need_c)
        return need_c, need_u, need_g, none, none
    k = coefficients(rows, t) != 0
    m = rows.multi
    return (torch.where(m, k[:, 0], need_c), torch.where(m, k[:, 1], need_u), need_g & ~m, m & k[:, 2],
            m & k[:, 3])


def plan_cost(plan: SamplingPlan, T: int, timesteps: list[int]) -> list[int]:
    """Network rows each plan row costs over the run (main and guiding networks together)."""
    rows = Rows(plan.rows, T)
    total = torch.zeros(len(plan.rows), dtype=torch.long)
    for t in timesteps:
        total += sum(m.long() for m in evaluations(rows, t))
    return total.tolist()


# ----------------------------------------------------------------------- denoiser


@dataclass
class Denoised:
    """What a solver gets for x_t: x̂0 (after clipping/thresholding) and the ε to re-noise with."""

    x0: torch.Tensor  # (B, C, H, W)
    eps: torch.Tensor  # (B, C, H, W)


class GuidedDenoiser:
    """``(x_t, t) → Denoised``: the guided x̂0 and ε of every row of a plan at timestep t.

    Built once per sampling run (APG's momentum lives here and starts at 0).
    ``guides`` maps a row's ``guide`` name to the guiding network's eps_fn.
    """

    def __init__(self, eps_fn: EpsFn, schedule: Schedule, cond: Cond, plan: SamplingPlan,
                 uncond: Cond | int | None, guides: Mapping[str, EpsFn] | None = None,
                 no_image: tuple[Cond, Cond] | None = None):
        """``cond``: each row's condition y; ``uncond``: what ε_u is evaluated with per row, the
        null condition ∅ or, for a row with a negative prompt, that prompt (same kind as ``cond``);
        an int is the null label of a batch of labels. A model with an image condition: ``cond``
        and ``uncond`` carry the image (ε(I,y), ε(I,∅)) and ``no_image`` the rows with the
        image's ∅, (ε(∅,y)'s, ε(∅,∅)'s), for rows that guide both conditions."""
        if isinstance(uncond, int):
            uncond = torch.full_like(cond, uncond)
        self.eps_fn, self.schedule, self.cond, self.uncond = eps_fn, schedule, cond, uncond
        self.no_image = no_image
        self.rows = Rows(plan.rows, schedule.T)
        missing = [g for g in self.rows.guides if g not in (guides or {})]
        if missing:
            raise ValueError(f"no guiding network given for guide {missing}")
        self.guide_fns = [guides[g] for g in self.rows.guides] if self.rows.guides else []
        self.momentum: torch.Tensor | None = None  # APG, (B, C, H, W)
        self._masks: dict[int, tuple] = {}
        self.rows_evaluated = 0  # network rows run so far (cost accounting, tests)

    def _plan(self, t: int, device: torch.device) -> tuple:
        if t not in self._masks:
            w_t, guided = self.rows.strength(t)
            c, u, g, i01, i00 = evaluations(self.rows, t)
            idx = lambda m: m.nonzero().flatten().to(device)  # noqa: E731
            per_guide = [idx(g & (self.rows.guide == k)) for k in range(len(self.guide_fns))]
            coef = coefficients(self.rows, t).to(device) if self.rows.any_multi else None
            self._masks[t] = (w_t.to(device), guided, idx(c), idx(u), per_guide, (idx(i01), idx(i00)), coef)
        return self._masks[t]

    def _with_subsets(self, x: torch.Tensor, tt: torch.Tensor, main: EpsFn, cond, uncond, subsets) -> tuple:
        """ε_c, ε_u (None if no row needs it) and (ε(∅,y), ε(∅,∅)) of a step where some row guides
        two conditions: every subset any row needs, in one forward pass (zeros in other rows)."""
        if self.no_image is None:
            raise ValueError("guidance over two conditions needs the rows' conditions without their image")
        take = cond_ops.take
        parts = [(i, c) for i, c in ((cond, self.cond), (uncond, self.uncond), (subsets[0], self.no_image[0]),
                                     (subsets[1], self.no_image[1])) if len(i)]
        out = main(torch.cat([x[i] for i, _ in parts]), torch.cat([tt[i] for i, _ in parts]),
                   cond_ops.cat([take(c, i) for i, c in parts])).split([len(i) for i, _ in parts])
        full = {id(i): torch.zeros_like(x).index_copy_(0, i, o) for (i, _), o in zip(parts, out)}
        eps = [full.get(id(i), torch.zeros_like(x)) for i in (cond, uncond, *subsets)]
        return eps[0], eps[1] if len(uncond) else None, (eps[2], eps[3])

    def _eps(self, x: torch.Tensor, t: int, main: EpsFn, guide_fns: list[EpsFn]) -> tuple:
        """(ε_c, ε_u, ε_guide, w_t, guided): None for an evaluation no row needed; zeros
        in the rows of an evaluation that did not need it. ``main`` / ``guide_fns``: the
        networks as eps_fns (or as x̂0 functions, at ᾱ_t = 0). Rows guiding two conditions
        leave theirs in ``self._two`` (ε(∅,y), ε(∅,∅), weights) for :meth:`_guide`."""
        w_t, guided, cond, uncond, per_guide, subsets, coef = self._plan(t, x.device)
        B, n_c, n_u = x.shape[0], len(cond), len(uncond)
        y, take = self.cond, cond_ops.take
        tt = torch.full((B,), t, dtype=torch.long, device=x.device)
        self.rows_evaluated += n_c + n_u + sum(len(i) for i in per_guide) + sum(len(i) for i in subsets)
        self._two = None if coef is None else (None, coef)
        eps_g = None
        if any(len(rows) for rows in per_guide):
            eps_g = torch.zeros_like(x)
            for fn, rows in zip(guide_fns, per_guide):
                if len(rows):
                    eps_g.index_copy_(0, rows, fn(x[rows], tt[rows], take(y, rows)))
        if sum(len(i) for i in subsets):
            eps_c, eps_u, two = self._with_subsets(x, tt, main, cond, uncond, subsets)
            self._two = (two, coef)
            return eps_c, eps_u, eps_g, w_t, guided
        if n_u == 0:
            if n_c == B:
                return main(x, tt, y), None, eps_g, w_t, guided
            eps_c = torch.zeros_like(x).index_copy_(0, cond, main(x[cond], tt[cond], take(y, cond)))
            return eps_c, None, eps_g, w_t, guided
        if self.uncond is None:
            raise ValueError("guidance needs ε_u's condition: the null label, ∅, or a negative prompt per row")
        if n_c == B and n_u == B:
            # The common case: both halves for every row in one forward of 2B rows.
            out = main(torch.cat([x, x]), torch.cat([tt, tt]), cond_ops.cat([y, self.uncond]))
            return out[:B], out[B:], eps_g, w_t, guided
        out = main(torch.cat([x[cond], x[uncond]]), torch.cat([tt[cond], tt[uncond]]),
                   cond_ops.cat([take(y, cond), take(self.uncond, uncond)]))
        # A missing half always has weight 0 (w = 0 ignores ε_u, w = −1 ignores ε_c),
        # so zeros stand in for it.
        eps_c = out[:B] if n_c == B else torch.zeros_like(x).index_copy_(0, cond, out[:n_c])
        eps_u = torch.zeros_like(x).index_copy_(0, uncond, out[n_c:])
        return eps_c, eps_u, eps_g, w_t, guided

    def __call__(self, x: torch.Tensor, t: int) -> Denoised:
        """x: (B, C, H, W) at timestep t (one t for the whole batch) → Denoised."""
        a = float(self.schedule.alphas_cumprod[t - 1])
        if a == 0:
            return self._terminal(x, t)
        sa, s1a = math.sqrt(a), math.sqrt(1 - a)
        eps_c, eps_u, eps_g, w_t, guided = self._eps(x, t, self.eps_fn, self.guide_fns)
        renoise = None
        if eps_u is None and eps_g is None and self._two_free():  # nobody guided at this step: ε̂ = ε_c
            eps = eps_c
        else:
            # APG works on x̂0: the maps between ε and x̂0 at this t.
            space = (lambda e: (x - s1a * e) / sa, lambda d: (x - sa * d) / s1a)
            eps, renoise = self._guide(x, space, eps_c, eps_u, eps_g, w_t, guided)
        # x̂_0 = (x_t − sqrt(1−ᾱ_t)·ε̂) / sqrt(ᾱ_t)
        x0 = (x - s1a * eps) / sa
        x0, changed = self._process(x0)
        if changed is not None:
            # Keep ε consistent with the processed x̂_0 so both DDIM terms agree.
            eps = torch.where(changed, (x - sa * x0) / s1a, eps)
        if renoise is not None:  # CFG++ rows re-noise with ε_u, not with ε̂
            mask, eps_u = renoise
            eps = torch.where(mask, eps_u, eps)
        return Denoised(x0, eps)

    def _terminal(self, x: torch.Tensor, t: int) -> Denoised:
        """The step at ᾱ_t = 0: x_t = ε exactly, and x̂0 comes from the networks' own x̂0.

        Every rule is applied to the x̂0 predictions in place of ε: for the linear rules
        (CFG, autoguidance, CFG++) that is the limit of ε-space guidance as ᾱ_t → 0, APG
        is defined on x̂0 anyway, and CFG-Zero* / rescale act on x̂0 as they would on a
        v-model's output. Needs v or x0 networks (cfgd.diffusion.process.x0_fn).
        """
        x0_c, x0_u, x0_g, w_t, guided = self._eps(x, t, x0_fn(self.eps_fn), [x0_fn(g) for g in self.guide_fns])
        x0 = x0_c
        if x0_u is not None or x0_g is not None or not self._two_free():
            same = lambda v: v  # noqa: E731 - already in x̂0 space
            x0, _ = self._guide(x, (same, same), x0_c, x0_u, x0_g, w_t, guided)
        x0, _ = self._process(x0)
        return Denoised(x0, x)  # every ε here, CFG++'s ε_u too, is x_t itself

    def _guide(self, x, space, eps_c, eps_u, eps_g, w_t, guided):
        """ε̂ per row, and (CFG++ mask, ε_u) when a CFG++ row is guided (else None).

        ``space`` = (to_x0, from_x0): the maps from the branches' space to x̂0 and back (APG).
        """
        rows, used = self.rows, self.rows.used
        zeros = torch.zeros_like(x)
        eps_u = zeros if eps_u is None else eps_u
        wb = bcast(w_t, x)
        rule = rows.rule.to(x.device).reshape(-1, 1, 1, 1)
        on = guided.to(x.device).reshape(-1, 1, 1, 1)
        eps = eps_c + wb * (eps_c - eps_u)  # CFG (exactly as cfg-math.md writes it)
        if AUTO in used:
            eps = torch.where(rule == AUTO, eps_c + wb * (eps_c - (zeros if eps_g is None else eps_g)), eps)
        if ZERO in used:
            uu = _dot(eps_u, eps_u)
            s_star = torch.where(uu > 0, _dot(eps_c, eps_u) / uu.clamp_min(1e-12), torch.ones_like(uu))
            zero = s_star * eps_u + (1 + wb) * (eps_c - s_star * eps_u)
            eps = torch.where(rule == ZERO, zero, eps)
        if APG in used:
            eps = torch.where(rule == APG, self._apg(x, space, eps_c, eps_u, wb, on & (rule == APG)), eps)
        eps = _rescale(eps_c, eps, rows.rescale, (rule == CFG) & (wb == -1))
        if self._two is not None:
            eps = torch.where(bcast(rows.multi, x).bool(), self._combine(eps_c, eps_u, *self._two), eps)
        if CFGPP not in used:
            return eps, None
        pp = rule == CFGPP
        lam = bcast(rows.lam, x)
        # ε_λ = ε_u + λ(ε_c − ε_u) inside the interval; a plain conditional step outside.
        eps = torch.where(pp & on, eps_u + lam * (eps_c - eps_u), torch.where(pp, eps_c, eps))
        return eps, (pp & on, eps_u)

    def _two_free(self) -> bool:
        """Whether this step's ε̂ is ε_c for every two-condition row (weights (1, 0, 0, 0))."""
        if self._two is None:
            return True
        coef = self._two[1][self.rows.multi.to(self._two[1].device)]
        return bool((coef[:, 1:] == 0).all() and (coef[:, 0] == 1).all())

    @staticmethod
    def _combine(eps_c, eps_u, no_image, coef) -> torch.Tensor:
        """Two conditions: Σ_k weight_k · ε(subset_k) (:func:`coefficients`); ε(I,y) = ε_c, ε(I,∅) = ε_u."""
        e01, e00 = no_image if no_image is not None else (torch.zeros_like(eps_c),) * 2
        parts = (eps_c, eps_u, e01, e00)
        return sum(bcast(coef[:, k], eps_c) * p for k, p in enumerate(parts))

    def _apg(self, x, space, eps_c, eps_u, wb, on) -> torch.Tensor:
        """Adaptive projected guidance (Sadat et al. 2024) in x̂0 space; ``on``: guided APG rows."""
        rows, (to_x0, from_x0) = self.rows, space
        d_c = to_x0(eps_c)
        d_u = to_x0(eps_u)
        if self.momentum is None:
            self.momentum = torch.zeros_like(x)
        # m ← Δ + β·m, only at a row's guided steps; reset per run (a new denoiser).
        m = torch.where(on, (d_c - d_u) + bcast(rows.beta, x) * self.momentum, self.momentum)
        self.momentum = m
        norm = _dot(m, m).sqrt()
        delta = m * torch.minimum(torch.ones_like(norm), bcast(rows.r, x) / norm.clamp_min(1e-12))
        par = (_dot(delta, d_c) / _dot(d_c, d_c).clamp_min(1e-12)) * d_c
        d_hat = d_c + wb * ((delta - par) + bcast(rows.apg_eta, x) * par)
        return torch.where(on, from_x0(d_hat), eps_c)

    def _process(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Clipping / dynamic thresholding of x̂0 per row; (x̂0, rows changed (B,1,1,1) or None)."""
        rows = self.rows
        thr = ~torch.isnan(rows.threshold)
        if not bool(thr.any()):
            if not bool(rows.clip.any()):
                return x0, None
            if bool(rows.clip.all()):  # the default: every row clipped, no per-row selection
                return x0.clamp(-1, 1), torch.ones((), dtype=torch.bool, device=x0.device)
        out = torch.where(bcast(rows.clip, x0).bool(), x0.clamp(-1, 1), x0)
        if bool(thr.any()):
            # Imagen: s = max(1, quantile_p |x̂0|); x̂0 ← clamp(x̂0, −s, s) / s.
            flat = x0.abs().flatten(1).sort(dim=1).values  # (B, N)
            pos = rows.threshold.nan_to_num(1.0).to(x0.device) * (flat.shape[1] - 1)
            lo = pos.floor().long().clamp(0, flat.shape[1] - 1)
            hi = pos.ceil().long().clamp(0, flat.shape[1] - 1)
            frac = (pos - lo).to(x0.dtype)
            q = flat.gather(1, lo[:, None])[:, 0] * (1 - frac) + flat.gather(1, hi[:, None])[:, 0] * frac
            s = bcast(q.clamp_min(1.0), x0)
            out = torch.where(bcast(thr, x0).bool(), torch.maximum(torch.minimum(x0, s), -s) / s, out)
        return out, bcast(rows.clip | thr, x0).bool()
