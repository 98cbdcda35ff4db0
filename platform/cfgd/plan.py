"""The sampling plan: everything about how a batch of rows is sampled, validated once.

A :class:`SamplingPlan` is the solver and its settings plus, per row, the guidance rule
and its parameters (:class:`Guidance`). It is built once, at the edge (the CLI config,
an HTTP request, a bulk plan, a sweep grid point), and handed unchanged to
:func:`cfgd.sampling.sample`. Every numeric setting is bounded here, so nothing invalid
reaches a solver; what depends on the checkpoint (T, the guiding network) is checked
by :meth:`SamplingPlan.check` when the plan meets one.

``w`` and ``guidance_scale`` (s = 1 + w) are resolved to ``w`` in exactly one place:
:meth:`Guidance._resolve_w`. An edge that has its own default strength (Serve's
``default_w``) passes it as validation context: ``Guidance.model_validate(d,
context={"default_w": 1.0})``.

No torch here: the plan is plain data (formulas: shared/docs/guidance-methods.md).
"""

from __future__ import annotations

import re
from typing import Any, Literal, Mapping, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, model_validator

RULES = ("cfg", "cfg++", "apg", "cfg_zero_star", "autoguidance")
WEIGHT_SCHEDULES = ("constant", "linear", "cosine")
SOLVERS = ("ddim", "dpm++2m")
RULE_PARAMS = {"cfg++": ("lam",), "apg": ("apg_beta", "apg_r", "apg_eta")}  # parameters only that rule reads
SPACINGS = ("leading", "trailing", "linspace", "logsnr")
# Per solver, the spacing used when none is given (measured: README, "Solvers").
DEFAULT_SPACING = {"ddim": "trailing", "dpm++2m": "logsnr"}

# Bounds, and why. w < −1 pushes away from the condition harder than ε_u itself; past
# ~20 every sample saturates; 100 leaves room for experiments while keeping ε̂ finite.
W_RANGE = (-1.0, 100.0)
# η = 0 is deterministic DDIM, η = 1 the DDPM posterior variance; beyond 1 the noise
# exceeds what the step removes (σ² > 1 − ᾱ_t') and the formula stops being a sampler.
ETA_RANGE = (0.0, 1.0)
# A norm cap above this on an update of a [-1, 1] image is the same as none.
APG_R_MAX = 1e6
MAX_STEPS = 10_000  # any T a checkpoint can have; the checkpoint's own T is checked later


def _bad(field: str, message: str) -> ValueError:
    """A cross-field error that still names its field (pydantic gives such errors no location)."""
    return ValueError(f"[{field}] {message}")


def _field(default, lo=None, hi=None, *, gt=None, lt=None, description: str = ""):
    return Field(default, ge=lo, le=hi, gt=gt, lt=lt, allow_inf_nan=False, description=description)


class Guidance(BaseModel):
    """One row's guidance rule and its parameters (guidance-methods.md).

    rule           cfg: ε_c + w(ε_c − ε_u) · cfg++: ε_u + λ(ε_c − ε_u), re-noised with ε_u (DDIM)
                   apg: projected CFG in x̂0 space with momentum β and norm cap r
                   cfg_zero_star: CFG around s*·ε_u, s* = ⟨ε_c, ε_u⟩ / ‖ε_u‖²
                   autoguidance: ε_c + w(ε_c − ε_c^guide), ε_c^guide from ``guide``
    schedule       w_t = w·g(u), u = 1 − t/T: constant 1, linear 2u, cosine 1 − cos(πu)
    interval       [t_lo, t_hi]: guided only there (ε_c elsewhere, one network row)
    rescale        φ of Lin et al. 2023 (0 = off)
    clip           clamp x̂0 to [−1, 1] · threshold: dynamic thresholding at quantile p
                   (replaces clipping for the row when given)
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    rule: Literal[RULES] = "cfg"  # type: ignore[valid-type]
    w: float = _field(0.0, *W_RANGE, description="guidance strength, paper form (s = 1 + w)")
    guidance_scale: Optional[float] = Field(None, exclude=True, description="= 1 + w; give it or w")
    lam: float = _field(1.0, 0.0, 1.0, description="CFG++ λ")
    apg_beta: float = _field(0.0, -1.0, lt=1.0, description="APG momentum β (the paper uses β ≤ 0)")
    apg_r: Optional[float] = _field(None, hi=APG_R_MAX, gt=0.0, description="APG norm cap r on the update; null = no cap")
    apg_eta: float = _field(1.0, 0.0, 1.0, description="APG weight of the parallel component")
    schedule: Literal[WEIGHT_SCHEDULES] = "constant"  # type: ignore[valid-type]
    interval: Optional[tuple[int, int]] = Field(None, description="[t_lo, t_hi] in 1..T: guide only there")
    rescale: float = _field(0.0, 0.0, 1.0, description="guidance rescale φ")
    clip: bool = Field(True, description="clamp x̂0 to [-1, 1]")
    threshold: Optional[float] = _field(None, 0.5, 1.0, description="dynamic thresholding quantile p of |x̂0|")
    guide: Optional[str] = Field(None, description="autoguidance: the guiding checkpoint")

    @model_validator(mode="before")
    @classmethod
    def _resolve_w(cls, data: Any, info: ValidationInfo) -> Any:
        """The one place that turns ``w`` / ``guidance_scale`` into ``w``."""
        if not isinstance(data, dict):
            return data
        w, gs = data.get("w"), data.get("guidance_scale")
        if w is not None and gs is not None:
            raise _bad("w", "give w or guidance_scale, not both (guidance_scale = 1 + w)")
        data = {k: v for k, v in data.items() if k != "guidance_scale"}
        if gs is not None:
            if isinstance(gs, bool) or not isinstance(gs, (int, float)):
                raise _bad("guidance_scale", f"guidance_scale must be a number, got {gs!r}")
            data["w"] = gs - 1.0
        elif w is None:
            data["w"] = (info.context or {}).get("default_w", 0.0)
        if data.get("rule") == "cfg++":
            # CFG++'s strength is λ; a w would be a second, silently ignored knob.
            if (w is not None or gs is not None) and data["w"] != 0:
                raise _bad("w", "rule 'cfg++' is steered by lam, not by w or guidance_scale (leave them out)")
            data["w"] = 0.0
        return data

    @model_validator(mode="after")
    def _combination(self) -> "Guidance":
        if self.interval is not None and not 1 <= self.interval[0] <= self.interval[1]:
            raise _bad("interval", f"interval {list(self.interval)} must satisfy 1 <= t_lo <= t_hi")
        if (self.rule == "autoguidance") != (self.guide is not None):
            raise _bad("guide", "guide (the guiding checkpoint) is required with rule 'autoguidance' and only there")
        if self.rule == "cfg++" and (self.schedule != "constant" or self.rescale > 0):
            raise _bad("rule", "cfg++ takes lam, not a weight schedule or rescale")
        return self


class Solver(BaseModel):
    """The solver and its settings: one per batch."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Literal[SOLVERS] = "ddim"  # type: ignore[valid-type]
    steps: int = Field(50, ge=1, le=MAX_STEPS)
    spacing: Literal[SPACINGS] = Field(None, description="timestep spacing; default: the solver's")  # type: ignore
    eta: float = _field(0.0, *ETA_RANGE, description="DDIM η (0 = deterministic)")

    @model_validator(mode="before")
    @classmethod
    def _default_spacing(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("spacing") is None:
            data = {**data, "spacing": DEFAULT_SPACING.get(data.get("name") or "ddim", "trailing")}
        return data

    @model_validator(mode="after")
    def _combination(self) -> "Solver":
        if self.name != "ddim" and self.eta != 0:
            raise _bad("eta", f"eta is DDIM's; solver {self.name!r} is deterministic (eta must be 0)")
        return self


class SamplingPlan(BaseModel):
    """How a batch is sampled: one solver, and per row its :class:`Guidance`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    solver: Solver = Field(default_factory=Solver)
    rows: tuple[Guidance, ...]

    @model_validator(mode="after")
    def _combination(self) -> "SamplingPlan":
        if not self.rows:
            raise _bad("rows", "a plan needs at least one row")
        if self.solver.name != "ddim" and any(g.rule == "cfg++" for g in self.rows):
            raise _bad("rule", f"rule 'cfg++' is defined for the DDIM solver only, not {self.solver.name!r}")
        return self

    @classmethod
    def uniform(cls, n: int, guidance: Guidance | None = None, solver: Solver | None = None) -> "SamplingPlan":
        """``n`` rows with the same guidance (default: plain CFG at w = 0)."""
        return cls(solver=solver or Solver(), rows=(guidance or Guidance(),) * n)

    def __len__(self) -> int:
        return len(self.rows)

    def select(self, lo: int, hi: int) -> "SamplingPlan":
        """Rows [lo, hi) with the same solver (batching a long plan)."""
        return SamplingPlan.model_construct(solver=self.solver, rows=self.rows[lo:hi])

    @property
    def guides(self) -> list[str]:
        """The guiding checkpoints the rows name (autoguidance), in first-use order."""
        return list(dict.fromkeys(g.guide for g in self.rows if g.guide is not None))

    def check(self, T: int) -> None:
        """What needs the checkpoint: steps and intervals within its T. Raises PlanError."""
        if self.solver.steps > T:
            raise PlanError("steps", f"steps={self.solver.steps} exceeds the checkpoint's T={T} timesteps")
        for g in self.rows:
            if g.interval is not None and g.interval[1] > T:
                raise PlanError("interval", f"interval {list(g.interval)} must lie within 1..T={T}")


class PlanError(ValueError):
    """A plan that cannot be used, naming the field."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def first_error(err: ValidationError) -> tuple[str, str]:
    """(field, message naming it) of a pydantic error: what an edge reports to its user.

    The field is the last name in the error's location, or the one a cross-field check
    named (``[field] …``).
    """
    e = err.errors()[0]
    names = [str(p) for p in e["loc"] if not isinstance(p, int)]
    msg = e["msg"].removeprefix("Value error, ")
    m = re.match(r"\[(\w+)\] (.*)", msg, re.S)
    if m:
        return m.group(1), m.group(2)
    field = names[-1] if names else "plan"
    return field, f"{field}={e.get('input')!r}: {msg}" if names else msg


def from_fields(values: Mapping[str, Any], keys: Mapping[str, str], default_w: float = 0.0,
                solver: "Solver | None" = None) -> tuple[Solver, Guidance]:
    """An edge's own fields → (Solver, Guidance), validated as one plan row.

    ``keys`` maps the edge's field names to ``solver.<field>`` or ``guidance.<field>``
    (e.g. ``{"guidance_interval": "guidance.interval"}``); a given ``solver`` is reused
    (several rows of one batch). Raises :class:`PlanError` naming the *edge's* field.
    """
    back = {v: k for k, v in keys.items()}
    part = {"solver": {}, "guidance": {}}
    for k, target in keys.items():
        if k in values:
            group, name = target.split(".")
            part[group][name] = values[k]
    try:
        if solver is None:
            where = "solver"
            solver = Solver.model_validate(part["solver"])
        where = "guidance"
        guidance = Guidance.model_validate(part["guidance"], context={"default_w": default_w})
        SamplingPlan(solver=solver, rows=(guidance,))
    except ValidationError as err:
        name, msg = first_error(err)
        edge = back.get(f"{where}.{name}") or back.get(f"guidance.{name}") or back.get(f"solver.{name}") or name
        gs_key = back.get("guidance.guidance_scale")
        if name == "w" and gs_key and values.get(gs_key) is not None and msg.startswith("w="):
            # The user gave the scale: say so in its terms (w = guidance_scale − 1).
            edge, msg = gs_key, f"{gs_key}={values[gs_key]!r} (w = {msg[2:]}"
            msg = msg.replace(": ", "): ", 1)
        else:
            msg = edge + msg[len(name):] if msg.startswith(f"{name}=") else f"{edge}: {msg}"
        raise PlanError(edge, msg) from None
    return solver, guidance


def strength_columns(w: Any, guidance_scale: Any, default: Optional[list] = None) -> list[dict]:
    """Lists of strengths (``w`` or ``guidance_scale``, one per column) → one
    ``{"w", "guidance_scale"}`` dict per column, for :class:`Guidance` to resolve (and to
    refuse when both are given). Neither: ``default`` as w values."""
    def items(v):
        return None if v is None else list(v) if isinstance(v, (list, tuple)) else [v]

    ws, gss = items(w), items(guidance_scale)
    if ws is None and gss is None:
        ws = list(default or [])
    n = max(len(ws or []), len(gss or []))
    return [{"w": ws[i] if ws and i < len(ws) else None,
             "guidance_scale": gss[i] if gss and i < len(gss) else None} for i in range(n)]
