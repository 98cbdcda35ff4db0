"""The HTTP side of a request: schemas (OpenAPI comes from them) and refusals naming the field."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, FiniteFloat, StrictBool, StrictInt, StringConstraints, ValidationError

from cfgd.plan import MAX_STEPS, RULES, SOLVERS, SPACINGS, WEIGHT_SCHEDULES

MAX_SEED = 2**63 - 1
# Caps on what one request may carry, so no field can make the server allocate or loop
# without bound (the settings cap images per request; these cap the request's shape).
MAX_LIST = 1024  # classes, class_names, counts
MAX_W_VALUES = 64  # strengths per bulk request
MAX_NAME = 256  # class, checkpoint and guide names
MAX_PATH = 1024  # bulk destinations
MAX_COUNT = 10_000_000  # images per (class, w) cell; the total is capped by max_bulk_images
Name = Annotated[str, StringConstraints(max_length=MAX_NAME)]
Count = Annotated[StrictInt, Field(ge=0, le=MAX_COUNT)]


class RequestError(Exception):
    """A request the server refuses: HTTP ``status`` and the ``field`` at fault."""

    def __init__(self, status: int, field_name: str, message: str):
        super().__init__(status, field_name, message)
        self.status = status
        self.field = field_name
        self.message = message

    def __str__(self) -> str:
        return f"{self.status} {self.field}: {self.message}"

    def to_json(self) -> dict:
        return {"detail": self.message, "field": self.field}

    def as_result(self) -> dict:
        """The refusal as a return value: deployments return it instead of raising, so an
        expected 4xx costs no traceback in the replica's log."""
        return {"refused": {"status": self.status, **self.to_json()}}


def short_error(err: BaseException, limit: int = 300) -> str:
    """An error for a response or a job status: its type and first line, bounded (a Ray
    task error is shown as the exception it wraps)."""
    err = getattr(err, "cause", None) or err
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:limit] if lines else ''}"


def sampling_failure(err: Exception) -> RequestError:
    """The refusal of a request whose own sampling raised: 422 when its input caused it
    (a value the network or solver cannot take), else 503 (try again)."""
    text = short_error(err)
    if isinstance(err, (ValueError, ArithmeticError)):
        return RequestError(422, "body", f"this request could not be sampled: {text}")
    return RequestError(503, "body", f"sampling failed, try again: {text}")


def refused(result: Any) -> dict | None:
    """The refusal in a deployment's or actor's return value, if it is one."""
    return result.get("refused") if isinstance(result, dict) else None


def validation_message(exc: ValidationError | list) -> tuple[str, str]:
    """(field, message) from a pydantic error list, e.g. ("w", "w: Input should be ...")."""
    errors = exc.errors() if isinstance(exc, ValidationError) else exc
    parts, first = [], ""
    for e in errors:
        loc = [str(p) for p in e.get("loc", ()) if p != "body"]
        # A JSON syntax error's loc is a character offset, not a field.
        name = "body" if e.get("type") == "json_invalid" else ".".join(loc) or "body"
        first = first or name
        parts.append(f"{name}: {e.get('msg', 'invalid')}")
    return first or "body", "; ".join(parts) or "invalid request"


class PlanFields(BaseModel):
    """The sampling plan's fields of a request (cfgd.plan checks bounds and combinations)."""

    model_config = ConfigDict(extra="forbid")

    solver: Literal[SOLVERS] = "ddim"  # type: ignore[valid-type]
    steps: Optional[StrictInt] = Field(None, ge=1, le=MAX_STEPS, description="solver steps (default: server's default_steps)")
    eta: FiniteFloat = Field(0.0, description="DDIM eta in [0, 1]: 0 deterministic, 1 DDPM-like")
    spacing: Optional[Literal[SPACINGS]] = Field(None, description="timestep spacing (default: the solver's)")  # type: ignore
    rule: Literal[RULES] = "cfg"  # type: ignore[valid-type]
    lam: FiniteFloat = Field(1.0, description="CFG++ lambda in [0, 1]")
    apg_beta: FiniteFloat = Field(0.0, description="APG momentum in [-1, 1)")
    apg_r: Optional[FiniteFloat] = Field(None, description="APG norm cap r > 0 (null: none)")
    apg_eta: FiniteFloat = Field(1.0, description="APG weight of the parallel component in [0, 1]")
    weight_schedule: Literal[WEIGHT_SCHEDULES] = "constant"  # type: ignore[valid-type]
    guidance_interval: Optional[tuple[StrictInt, StrictInt]] = Field(
        None, description="[t_lo, t_hi]: guide only at timesteps inside (1..T)")  # T is checked per checkpoint
    rescale: FiniteFloat = Field(0.0, description="guidance rescale phi in [0, 1]")
    clip: StrictBool = Field(True, description="clamp x0 to [-1, 1]")
    threshold: Optional[FiniteFloat] = Field(None, description="dynamic thresholding quantile in [0.5, 1]")
    guide: Optional[Name] = Field(None, description="autoguidance: a configured checkpoint name")


class GenerateRequest(PlanFields):
    """POST /generate. Image i uses seed ``seed + i``; same request → same bytes."""

    class_label: Optional[StrictInt] = Field(None, ge=0, le=2**31, description="class index; or give class_name")
    class_name: Optional[Name] = Field(None, description="a label name of the checkpoint")
    num_images: StrictInt = Field(1, ge=1, le=MAX_LIST, description="images (the server caps it: max_images)")
    seed: StrictInt = Field(0, ge=0, le=MAX_SEED)
    format: Literal["png_list", "grid"] = "png_list"
    checkpoint: Optional[Name] = Field(None, description="a configured checkpoint name (default: the server's)")
    w: Optional[FiniteFloat] = Field(None, description="guidance strength (paper form); or guidance_scale")
    guidance_scale: Optional[FiniteFloat] = Field(None, description="= 1 + w; or w")


# Where a request field lands in the sampling plan (the same for /generate and /bulk).
PLAN_KEYS = {
    "solver": "solver.name", "steps": "solver.steps", "spacing": "solver.spacing", "eta": "solver.eta",
    "rule": "guidance.rule", "w": "guidance.w", "guidance_scale": "guidance.guidance_scale", "lam": "guidance.lam",
    "apg_beta": "guidance.apg_beta", "apg_r": "guidance.apg_r", "apg_eta": "guidance.apg_eta",
    "weight_schedule": "guidance.schedule", "guidance_interval": "guidance.interval", "rescale": "guidance.rescale",
    "clip": "guidance.clip", "threshold": "guidance.threshold", "guide": "guidance.guide",
}


class BulkRequest(PlanFields):
    """POST /bulk: ``counts`` images for every (class, w), written as Parquet shards."""

    destination: str = Field(..., max_length=MAX_PATH, description="a sub-path of the server's output_prefix, or a URI under it")
    classes: Optional[list[StrictInt]] = Field(None, max_length=MAX_LIST, description="class indices (default: every class)")
    class_names: Optional[list[Name]] = Field(None, max_length=MAX_LIST, description="alternative to classes")
    counts: Union[Count, Annotated[list[Count], Field(max_length=MAX_LIST)]] = Field(
        1, description="per (class, w): one number or one per class")
    w: Optional[list[FiniteFloat]] = Field(None, max_length=MAX_W_VALUES)
    guidance_scale: Optional[list[FiniteFloat]] = Field(None, max_length=MAX_W_VALUES)
    seed: StrictInt = Field(0, ge=0, le=MAX_SEED)
    png_files: StrictBool = False
    checkpoint: Optional[Name] = None


def parse(model: type[BaseModel], body: dict | BaseModel) -> Any:
    if isinstance(body, model):
        return body
    try:
        return model.model_validate(body)
    except ValidationError as err:
        name, msg = validation_message(err)
        raise RequestError(422, name, msg) from None
