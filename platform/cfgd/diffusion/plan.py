"""The sampling plan: everything about how a batch of rows is sampled, validated once.

A :class:`SamplingPlan` is the solver and its settings plus, per row, the guidance rule
and its parameters (:class:`Guidance`). It is built once, at the edge (the CLI config,
an HTTP request, a bulk plan, a sweep grid point), and handed unchanged to
:func:`cfgd.diffusion.solvers.sample`. Every numeric setting is bounded here, so nothing invalid
reaches a solver; what depends on the checkpoint (T, the guiding network) is checked
by :meth:`SamplingPlan.check` when the plan meets one.

``w`` and ``guidance_scale`` (s = 1 + w) are resolved to ``w`` in exactly one place:
:meth:`Guidance._resolve_w`. An edge that has its own default strength (Serve's
``default_w``) passes it as validation context: ``Guidance.model_validate(d,
context={"default_w": 1.0})``.

The fields are declared once, here (:data:`FIELDS`); the CLI's ``sample.*`` keys, the
sweep's grid keys and the HTTP request fields are derived from them.

No torch here: the plan is plain data (formulas: docs/guidance-methods.md).
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal, Mapping, Optional

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, ValidationInfo,
                      model_validator)
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

RULES = ("cfg", "cfg++", "apg", "cfg_zero_star", "autoguidance")
WEIGHT_SCHEDULES = ("constant", "linear", "cosine")
SOLVERS = ("ddim", "dpm++2m")
# Parameters only that rule reads (a model with an image condition: its scale and how the two combine).
RULE_PARAMS = {"cfg++": ("lam",), "apg": ("apg_beta", "apg_r", "apg_eta"), "cfg": ("image_scale", "combine")}
COMBINES = ("sequential", "independent")
IMAGE_SCALE_RANGE = (0.0, 100.0)
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


def _bad(field: str, message: str, *value: Any) -> PydanticCustomError:
    """A cross-field error that still names its field: pydantic gives model-level errors no
    location, so the field (and the value, if one is at fault) travel in the error's
    structured context (``ctx``)."""
    return PydanticCustomError("plan", "{message}", {"field": field, "message": message,
                                                     **({"value": value[0]} if value else {})})


def _field(default, lo=None, hi=None, *, gt=None, lt=None, description: str = ""):
    return Field(default, ge=lo, le=hi, gt=gt, lt=lt, allow_inf_nan=False, description=description)


def _as_tuple(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v  # JSON and YAML give lists; a row is hashable


# The declaration of every plan field: its type, bounds, default and description. Every
# edge (``sample.*`` keys, sweep keys, HTTP fields, bulk plans) is derived from these two
# models (:data:`FIELDS`), so a new field is one edit here. Strict types: ``true`` is not
# a number and ``"3"`` is not a step count at any edge.
class Guidance(BaseModel):
    """One row's guidance rule and its parameters (docs/guidance-methods.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    rule: Literal[RULES] = Field(  # type: ignore[valid-type]
        "cfg", description="guidance rule: cfg (ε_c + w(ε_c − ε_u)), cfg++ (steered by lam; DDIM only), "
                           "apg (projected, with momentum and a norm cap), cfg_zero_star (CFG around s*·ε_u), "
                           "autoguidance (ε_u from the guide checkpoint)")
    w: Optional[float] = _field(None, *W_RANGE, description=f"guidance strength, paper form (s = 1 + w), "
                                                            f"in [{W_RANGE[0]:g}, {W_RANGE[1]:g}]; null: the "
                                                            f"edge's default (0; Serve: default_w)")
    guidance_scale: Optional[float] = Field(
        None, ge=W_RANGE[0] + 1, le=W_RANGE[1] + 1, allow_inf_nan=False, exclude=True,
        description="alternative to w: s = 1 + w (give one of them)")
    lam: float = _field(1.0, 0.0, 1.0, description="CFG++ λ in [0, 1]")
    apg_beta: float = _field(0.0, -1.0, lt=1.0, description="APG momentum β in [-1, 1) (the paper uses β ≤ 0)")
    apg_r: Optional[float] = _field(None, hi=APG_R_MAX, gt=0.0, description="APG norm cap r > 0 on the update; "
                                                                             "null: no cap")
    apg_eta: float = _field(1.0, 0.0, 1.0, description="APG weight of the parallel component, in [0, 1]")
    weight_schedule: Literal[WEIGHT_SCHEDULES] = Field(  # type: ignore[valid-type]
        "constant", description="w_t = w·g(u), u = 1 − t/T: constant 1, linear 2u, cosine 1 − cos(πu)")
    interval: Annotated[Optional[tuple[int, int]], BeforeValidator(_as_tuple)] = Field(
        None, description="[t_lo, t_hi] within 1..T: guide only there (ε_c elsewhere, one network row); "
                          "null: everywhere")
    rescale: float = _field(0.0, 0.0, 1.0, description="guidance rescale φ in [0, 1] (Lin et al. 2023); 0: off")
    clip: bool = Field(True, description="clamp x̂0 to [-1, 1]")
    threshold: Optional[float] = _field(None, 0.5, 1.0, description="dynamic thresholding: clamp x̂0 at the "
                                                                     "quantile p in [0.5, 1] of its absolute values (replaces clip); null: off")
    guide: Optional[str] = Field(None, max_length=1024, description="autoguidance: the guiding checkpoint (Serve: a configured "
                                                   "checkpoint name)")
    image_scale: float = _field(1.0, *IMAGE_SCALE_RANGE, description="a model with an image condition: the image's "
                                "guidance scale s_I (1: condition on it without guiding; 0: ignore it); rule cfg")
    combine: Literal[COMBINES] = Field(  # type: ignore[valid-type]
        "sequential", description="a model with an image condition: sequential (InstructPix2Pix, image first: "
                                  "ε(∅,∅) + s_I(ε(I,∅) − ε(∅,∅)) + s(ε(I,y) − ε(I,∅))) or independent (Composable "
                                  "Diffusion: ε(∅,∅) + s_I(ε(I,∅) − ε(∅,∅)) + s(ε(∅,y) − ε(∅,∅))); s = 1 + w")

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        # Plans stored before the rename (bulk manifests) said "schedule".
        if isinstance(data, dict) and "schedule" in data and "weight_schedule" not in data:
            data = {("weight_schedule" if k == "schedule" else k): v for k, v in data.items()}
        return data

    @model_validator(mode="after")
    def _resolve_w(self, info: ValidationInfo) -> "Guidance":
        """The one place that turns ``w`` / ``guidance_scale`` into ``w``; an edge with its
        own default strength (Serve's ``default_w``) passes it as ``context``."""
        w, gs = self.w, self.guidance_scale
        if w is not None and gs is not None:
            raise _bad("w", "give w or guidance_scale, not both (guidance_scale = 1 + w)")
        if self.rule == "cfg++":
            # CFG++'s strength is λ; a w would be a second, silently ignored knob.
            if (w or 0.0) != 0 or (gs is not None and gs != 1):
                raise _bad("w", "rule 'cfg++' is steered by lam, not by w or guidance_scale (leave them out)")
            w = 0.0
        elif gs is not None:
            w = gs - 1.0
        elif w is None:
            w = float((info.context or {}).get("default_w", 0.0))
        # Frozen: set once, here, before anyone holds the row.
        object.__setattr__(self, "w", float(w))
        object.__setattr__(self, "guidance_scale", None)
        if self.interval is not None and not 1 <= self.interval[0] <= self.interval[1]:
            raise _bad("interval", "must satisfy 1 <= t_lo <= t_hi", list(self.interval))
        if (self.rule == "autoguidance") != (self.guide is not None):
            raise _bad("guide", "guide (the guiding checkpoint) is required with rule 'autoguidance' and only there")
        if self.rule == "cfg++" and (self.weight_schedule != "constant" or self.rescale > 0):
            raise _bad("rule", "cfg++ takes lam, not a weight schedule or rescale")
        if self.multi and self.rule != "cfg":
            raise _bad("image_scale", f"guidance over two conditions (image_scale != 1 or combine 'independent') "
                                      f"is a cfg rule; rule {self.rule!r} guides the one condition y", self.image_scale)
        if self.multi and self.rescale > 0:
            raise _bad("rescale", "rescale matches ε̂ to ε(I,y); guidance over two conditions does not compose with it")
        return self

    @property
    def multi(self) -> bool:
        """Whether this row guides two conditions (an image and y), not y alone."""
        return self.image_scale != 1.0 or self.combine != "sequential"


MAX_PROMPT_CHARS = 1000  # as a training caption (cfgd.data.shards.MAX_CAPTION_CHARS); tokens are capped too
MAX_EMBEDDING_VALUES = 1 << 20  # an embedding's L·D; a checkpoint's own shape is checked when the row meets it
MAX_IMAGE_BYTES = 16 << 20  # a conditioning image's PNG; its size and channels are checked against the checkpoint


class Condition(BaseModel):
    """One row's condition y: a class label, a prompt (and a negative prompt), or an embedding;
    and, for a model with an image condition, the conditioning image.

    Which one a row needs is the checkpoint's (cfgd.sampling.row_conditions checks it). A
    negative prompt takes ∅'s place in ε_u (docs/guidance.md); "" is ∅ itself.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    label: Optional[int] = Field(None, ge=0, le=2**31, description="class index (a label model)")
    prompt: Optional[str] = Field(None, max_length=MAX_PROMPT_CHARS,
                                  description=f"text condition, at most {MAX_PROMPT_CHARS} characters and the "
                                              "checkpoint's token limit; \"\" is the null condition (a text model)")
    negative_prompt: Optional[str] = Field(None, max_length=MAX_PROMPT_CHARS,
                                           description="text that ε_u is evaluated with in place of ∅ (a text "
                                                       "model); null or \"\": ∅")
    embedding: Annotated[Optional[tuple[float, ...]], BeforeValidator(_as_tuple)] = Field(
        None, max_length=MAX_EMBEDDING_VALUES, description="a precomputed condition vector, flat (L·D float32 "
                                                           "values of the checkpoint's shape; an embedding model)")
    image: Optional[bytes] = Field(None, max_length=MAX_IMAGE_BYTES,
                                   description="a conditioning image, PNG bytes of the checkpoint's size and channels "
                                               "(a model with an image condition; besides the row's y); null: ∅")

    @model_validator(mode="after")
    def _one(self) -> "Condition":
        given = [k for k in ("label", "prompt", "embedding") if getattr(self, k) is not None]
        if len(given) > 1:
            raise _bad(given[1], f"give one condition per row, not {' and '.join(given)}")
        if self.negative_prompt is not None and self.label is not None:
            raise _bad("negative_prompt", "a negative prompt needs a text model and a prompt, not a label")
        if self.embedding is not None and not all(math.isfinite(v) for v in self.embedding):
            raise _bad("embedding", "every value must be finite (no NaN or infinity)")
        return self


class Solver(BaseModel):
    """The solver and its settings: one per batch."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    name: Literal[SOLVERS] = Field("ddim", description="solver: ddim (first order; eta > 0 adds noise) or "  # type: ignore
                                                       "dpm++2m (DPM-Solver++(2M), second order, deterministic)")
    steps: int = Field(50, ge=1, le=MAX_STEPS, description="solver steps (at most the checkpoint's T)")
    spacing: Optional[Literal[SPACINGS]] = Field(  # type: ignore[valid-type]
        None, description="timestep spacing: leading, trailing, linspace or logsnr; null: the solver's default "
                          f"({', '.join(f'{k}: {v}' for k, v in DEFAULT_SPACING.items())})")
    eta: float = _field(0.0, *ETA_RANGE, description="DDIM η in [0, 1]: 0 deterministic, 1 DDPM-like "
                                                     "(other solvers: 0)")

    @model_validator(mode="after")
    def _defaults(self) -> "Solver":
        if self.spacing is None:
            object.__setattr__(self, "spacing", DEFAULT_SPACING[self.name])
        if self.name != "ddim" and self.eta != 0:
            raise _bad("eta", f"eta is DDIM's; solver {self.name!r} is deterministic (eta must be 0)", self.eta)
        return self


# An edge's flat name → (model, field). One name per concept at every edge; the solver's
# ``name`` is ``solver`` there.
FIELDS: dict[str, tuple[type[BaseModel], str]] = {
    **{("solver" if k == "name" else k): (Solver, k) for k in Solver.model_fields},
    **{k: (Guidance, k) for k in Guidance.model_fields},
}
# Old CLI keys: still read, with a one-line notice naming the new key.
RENAMED = {"guidance_interval": "interval", "clip_denoised": "clip"}


def field_info(name: str):
    """The declaration (pydantic FieldInfo) of the edge field ``name``."""
    model, key = FIELDS[name]
    return model.model_fields[key]


def field_default(name: str) -> Any:
    return field_info(name).default


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
            raise PlanError("steps", f"exceeds the checkpoint's T={T} timesteps", self.solver.steps)
        for g in self.rows:
            if g.interval is not None and g.interval[1] > T:
                raise PlanError("interval", f"must lie within 1..T={T}", list(g.interval))

    def check_image(self, has_image: bool) -> None:
        """Rows that guide an image condition need a model that has one. Raises PlanError."""
        if not has_image:
            for g in self.rows:
                if g.multi:
                    field = "image_scale" if g.image_scale != 1.0 else "combine"
                    raise PlanError(field, "this checkpoint has no image condition (leave image_scale at 1 and "
                                           "combine sequential)", getattr(g, field))


_UNSET = object()


class PlanError(ValueError):
    """A plan that cannot be used, naming the edge's field, the value and what is valid."""

    def __init__(self, field: str, message: str, value: Any = _UNSET):
        self.field, self.message, self.value = field, message, value
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.value is _UNSET else f"{self.field}={self.value!r}: {self.message}"


def first_error(err: ValidationError, rename: Mapping[str, str] | None = None) -> PlanError:
    """The first error of a pydantic validation as a :class:`PlanError`, from its structured
    parts: the field is the last name of ``loc`` (or ``ctx["field"]`` of a cross-field
    check), ``rename``d to the edge's name; ``input`` is the value; ``msg`` what is wrong."""
    e = err.errors()[0]
    ctx = e.get("ctx") or {}
    names = [str(p) for p in e["loc"] if not isinstance(p, int)]
    if "field" in ctx:
        return PlanError((rename or {}).get(ctx["field"], ctx["field"]), ctx["message"], ctx.get("value", _UNSET))
    msg = str(ctx["error"]) if e["type"] == "value_error" else e["msg"]  # a validator's own ValueError
    if not names:
        return PlanError("plan", msg)
    return PlanError((rename or {}).get(names[-1], names[-1]), msg, e.get("input"))


def plan_row(values: Mapping[str, Any], default_w: float = 0.0,
             solver: "Solver | None" = None) -> tuple[Solver, Guidance]:
    """An edge's flat fields (names of :data:`FIELDS`) → (Solver, Guidance), validated as
    one plan row; a given ``solver`` is reused (the rows of one batch). Fields left out take
    their declared defaults. Raises :class:`PlanError` naming the field as the edge does.
    """
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise PlanError(unknown[0], f"not a sampling-plan field; valid: {sorted(FIELDS)}")
    part: dict = {Solver: {}, Guidance: {}}
    for k, v in values.items():
        model, key = FIELDS[k]
        part[model][key] = v
    try:
        if solver is None:
            solver = Solver.model_validate(part[Solver])
        guidance = Guidance.model_validate(part[Guidance], context={"default_w": default_w})
        SamplingPlan(solver=solver, rows=(guidance,))
    except ValidationError as err:
        raise first_error(err, rename={"name": "solver"}) from None
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


def edge_field(name: str, default: Any = _UNSET, annotation: Any = _UNSET, note: str = "") -> tuple[Any, Any]:
    """``(annotation, FieldInfo)`` of the edge field ``name`` as the plan declares it (type,
    bounds, description), for ``pydantic.create_model``; an edge with its own default
    (Serve's ``steps`` → ``default_steps``) passes it, and a ``note`` saying so."""
    info = field_info(name)
    kw: dict = {"exclude": None}  # the plan drops guidance_scale once resolved; a request must keep it
    if default is not _UNSET:
        kw["default"] = default
    if note:
        kw["description"] = f"{info.description}; {note}"
    return (info.annotation if annotation is _UNSET else annotation), FieldInfo.merge_field_infos(info, **kw)

