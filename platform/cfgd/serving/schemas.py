"""The HTTP side of a request: schemas (OpenAPI comes from them) and refusals naming the field."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictInt, StringConstraints, ValidationError,
                      create_model, model_validator)

from cfgd.diffusion.plan import (FIELDS, MAX_IMAGE_BYTES, MAX_PROMPT_CHARS, RENAMED, Condition, edge_field,
                                 field_info)

MAX_SEED = 2**63 - 1
# Caps on what one request may carry, so no field can make the server allocate or loop
# without bound (the settings cap images per request; these cap the request's shape).
MAX_LIST = 1024  # classes, class_names, counts
MAX_W_VALUES = 64  # strengths per bulk request
MAX_NAME = 256  # class, checkpoint and guide names
MAX_PATH = 1024  # bulk destinations
MAX_COUNT = 10_000_000  # images per (class, w) cell; the total is capped by max_bulk_images
MAX_EMBEDDING_JSON = 16_384  # values of an embedding given as a JSON list (the server's own cap is lower)
Name = Annotated[str, StringConstraints(max_length=MAX_NAME)]
Prompt = Annotated[str, StringConstraints(max_length=MAX_PROMPT_CHARS)]
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


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        """Old field names (``guidance_interval``) still read as the new ones."""
        if isinstance(data, dict) and any(k in RENAMED for k in data):
            data = {RENAMED.get(k, k): v for k, v in data.items()}
        return data


# The sampling plan's fields of a request: derived from cfgd.diffusion.plan (types, bounds, defaults,
# descriptions), so /openapi.json documents exactly what the plan accepts. Steps default to
# the server's setting.
PlanFields = create_model(
    "PlanFields", __base__=_Strict,
    **{n: edge_field(n) for n in FIELDS if n != "steps"},
    steps=edge_field("steps", default=None, annotation=Optional[int], note="null: the server's default_steps"),
)


class ConditionFields(_Strict):
    """The condition of a request's images: which one is needed is the checkpoint's
    (``condition`` in its model spec, meta.json): a class (label models), a prompt (text models) or an
    embedding (embedding models)."""

    class_label: Optional[StrictInt] = Field(None, ge=0, le=2**31, description="class index; or give class_name")
    class_name: Optional[Name] = Field(None, description="a label name of the checkpoint")
    prompt: Optional[Prompt] = Field(None, description=Condition.model_fields["prompt"].description)
    negative_prompt: Optional[Prompt] = Field(None, description=Condition.model_fields["negative_prompt"].description)
    embedding: Optional[Union[Annotated[list[float], Field(max_length=MAX_EMBEDDING_JSON)],
                              Annotated[str, StringConstraints(max_length=4 * MAX_EMBEDDING_JSON)]]] = Field(
        None, description="the condition vector, flat (tokens × dim of the checkpoint): a list of numbers, or "
                          "base64 of little-endian float32")
    image: Optional[Annotated[str, StringConstraints(max_length=4 * MAX_IMAGE_BYTES // 3 + 4)]] = Field(
        None, description="a conditioning image (a model with an image condition, besides y): base64 PNG of the "
                          "checkpoint's size and channels (its model spec: cond_height, cond_width, cond_channels); null: ∅")


class GenerateRequest(PlanFields, ConditionFields):
    """POST /generate. Image i uses seed ``seed + i``; same request → same bytes."""

    num_images: StrictInt = Field(1, ge=1, le=MAX_LIST, description="images (the server caps it: max_images)")
    seed: StrictInt = Field(0, ge=0, le=MAX_SEED)
    format: Literal["png_list", "grid"] = "png_list"
    checkpoint: Optional[Name] = Field(None, description="a configured checkpoint name (default: the server's)")


class BulkRequest(PlanFields):
    """POST /bulk: ``counts`` images for every (class, w) — or (prompt, w) for a text
    checkpoint — written as Parquet shards."""

    destination: str = Field(..., max_length=MAX_PATH, description="a sub-path of the server's output_prefix, or a URI under it")
    classes: Optional[list[StrictInt]] = Field(None, max_length=MAX_LIST, description="class indices (default: every class)")
    class_names: Optional[list[Name]] = Field(None, max_length=MAX_LIST, description="alternative to classes")
    prompts: Optional[list[Prompt]] = Field(None, max_length=MAX_LIST,
                                            description="a text checkpoint: the prompts (in place of classes)")
    negative_prompt: Optional[Prompt] = Field(None, description=Condition.model_fields["negative_prompt"].description)
    images: Optional[list[Annotated[str, StringConstraints(max_length=4 * MAX_IMAGE_BYTES // 3 + 4)]]] = Field(
        None, max_length=MAX_LIST, description="an image-conditioned checkpoint: one conditioning image per cell "
                                               "(base64 PNG), paired with classes / class_names or prompts in order")
    counts: Union[Count, Annotated[list[Count], Field(max_length=MAX_LIST)]] = Field(
        1, description="per (class or prompt, w): one number or one per class or prompt")
    # Several strengths: one plan row each (each value is checked as the plan's w / guidance_scale).
    w: Optional[list[float]] = Field(None, max_length=MAX_W_VALUES, description=f"{field_info('w').description}; "
                                                                              "a list: one set of images per value")
    guidance_scale: Optional[list[float]] = Field(None, max_length=MAX_W_VALUES,
                                                  description=f"{field_info('guidance_scale').description}; a list")
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
