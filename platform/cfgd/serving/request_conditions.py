"""A request's condition fields → the row's Condition, checked against the checkpoint.

Which fields a request must give is the checkpoint's kind (label: class_label or
class_name; text: prompt, optionally negative_prompt; embedding: embedding); the others
are refused, naming them. Prompts are tokenized here with the checkpoint's tokenizer, so
too long a prompt is a 422 before any sampling; unknown words are the tokenizer's
``[UNK]`` and are counted in the response. An embedding arrives as a JSON list or base64
float32, and must have the checkpoint's tokens × dim values, all finite. A conditioning
image (a model with an image condition) arrives as base64 PNG of the checkpoint's size and
channels, within the server's byte limit.
"""

from __future__ import annotations

import base64
import binascii
import math
from dataclasses import dataclass

import numpy as np

from cfgd.data.images import decode_png
from cfgd.diffusion.plan import Condition
from cfgd.sampling.checkpoint_sampler import CheckpointSampler
from cfgd.sampling.row_conditions import tokenizer_of
from cfgd.serving.schemas import RequestError
from cfgd.serving.settings import ServeSettings

_FIELDS = {"label": ("class_label", "class_name"), "text": ("prompt", "negative_prompt"), "embedding": ("embedding",)}


@dataclass(frozen=True)
class RequestCondition:
    condition: Condition
    class_name: str | None = None
    unknown_words: int = 0  # words of the prompts the tokenizer does not know ([UNK])

    def describe(self) -> dict:
        """What a response says about its condition."""
        c = self.condition
        image = {} if c.image is None else {"image_bytes": len(c.image)}
        if c.label is not None:
            return {"label": c.label, "class_name": self.class_name, **image}
        if c.prompt is not None:
            return {"prompt": c.prompt, "negative_prompt": c.negative_prompt, "unknown_words": self.unknown_words,
                    **image}
        return {"embedding_values": len(c.embedding or ()), **image}


def request_condition(req, gen: CheckpointSampler, s: ServeSettings, resolve_class) -> RequestCondition:
    """The Condition of a /generate request for ``gen``'s checkpoint; RequestError (422) naming the field."""
    got = _condition_y(req, gen, s, resolve_class)
    image = request_image(getattr(req, "image", None), gen, s)
    if image is None:
        return got
    return RequestCondition(got.condition.model_copy(update={"image": image}), got.class_name, got.unknown_words)


def request_image(value: str | None, gen: CheckpointSampler, s: ServeSettings) -> bytes | None:
    """A request's base64 PNG conditioning image → its bytes, checked against the checkpoint's
    size and channels; RequestError (422) naming ``image``."""
    if value is None:
        return None
    spec = gen.checkpoint.spec
    if not spec.has_image:
        raise RequestError(422, "image", "this checkpoint has no image condition")
    if _is_uri(value):
        raw = _read_image_uri(value, s)
    else:
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(422, "image", "image is not base64 (nor a URI under the server's image_prefix)") from None
    if len(raw) > s.max_image_bytes:
        raise RequestError(422, "image", f"image has {len(raw)} bytes; the limit is {s.max_image_bytes}")
    try:
        arr = decode_png(raw)
    except ValueError as err:
        raise RequestError(422, "image", f"image does not decode: {err}") from None
    want = (spec.cond_height, spec.cond_width, spec.cond_channels)
    if arr.shape != want:
        raise RequestError(422, "image", f"image decodes to (h, w, c) = {arr.shape}; this checkpoint takes {want}")
    return raw


def _is_uri(value: str) -> bool:
    return value.startswith(("s3://", "file://", "/"))


def _read_image_uri(uri: str, s: ServeSettings) -> bytes:
    """The bytes of an image named by URI, which must lie under ``image_prefix`` (the same
    rule as bulk destinations: no '..', no symlink out); 422 naming ``image`` otherwise."""
    from cfgd.io.retry import StorageError
    from cfgd.io.transfers import read_bytes
    from cfgd.serving.bulk import resolve_destination

    if not s.image_prefix:
        raise RequestError(422, "image", "this server takes images as base64 PNG only (no image_prefix set)")
    try:
        path = resolve_destination(uri, s.image_prefix)
    except RequestError as err:
        raise RequestError(422, "image", err.message.replace("destination", "image").replace("output prefix", "image_prefix")) from None
    try:
        return read_bytes(path, s.storage_options())
    except (FileNotFoundError, IsADirectoryError):
        raise RequestError(422, "image", f"image {uri!r} does not exist") from None
    except (OSError, StorageError) as err:
        raise RequestError(503, "image", f"image {uri!r} cannot be read now: {type(err).__name__}") from None


def _condition_y(req, gen: CheckpointSampler, s: ServeSettings, resolve_class) -> RequestCondition:
    spec = gen.checkpoint.spec
    kind = spec.condition
    for other, names in _FIELDS.items():
        for name in names:
            if other != kind and getattr(req, name, None) is not None:
                want = " or ".join(_FIELDS[kind])
                raise RequestError(422, name, f"this checkpoint is conditioned on {kind}: give {want}, not {name}")
    if kind == "label":
        names = gen.checkpoint.label_names
        label = resolve_class(req.class_label, req.class_name, names, "class_label", "class_name")
        return RequestCondition(Condition(label=label), names[label])
    if kind == "text":
        if req.prompt is None:
            raise RequestError(422, "prompt", "this checkpoint is conditioned on text: give prompt (\"\" for ∅)")
        unknown = sum(check_prompt(gen, s, name, getattr(req, name)) for name in ("prompt", "negative_prompt")
                      if getattr(req, name) is not None)
        return RequestCondition(Condition(prompt=req.prompt, negative_prompt=req.negative_prompt), unknown_words=unknown)
    if req.embedding is None:
        raise RequestError(422, "embedding", f"this checkpoint is conditioned on embeddings: give embedding "
                                             f"({spec.embedding_tokens}×{spec.embedding_dim} float32 values)")
    values = decode_embedding(req.embedding, spec.embedding_tokens * spec.embedding_dim, s.max_embedding_values)
    return RequestCondition(Condition(embedding=values))


def check_prompt(gen: CheckpointSampler, s: ServeSettings, name: str, text: str) -> int:
    """Words of ``text`` the checkpoint's tokenizer does not know; RequestError (422) naming
    ``name`` for a prompt over the server's character limit or the model's token limit."""
    if len(text) > s.max_prompt_chars:
        raise RequestError(422, name, f"{name} has {len(text)} characters; the limit is {s.max_prompt_chars}")
    try:
        return int(tokenizer_of(gen.checkpoint).encode([text], name).unknown[0])
    except ValueError as err:
        raise RequestError(422, name, str(err).replace(f"{name}[0]", name)) from None


def decode_embedding(value, expected: int, limit: int) -> tuple[float, ...]:
    """A JSON list or base64 little-endian float32 → ``expected`` finite floats; RequestError naming ``embedding``."""
    if isinstance(value, str):
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(422, "embedding", "embedding is a string but not base64") from None
        if len(raw) % 4:
            raise RequestError(422, "embedding", f"embedding decodes to {len(raw)} bytes, not a whole number of "
                                                 f"float32 values (4 bytes each)")
        values = np.frombuffer(raw, dtype="<f4").astype(np.float64).tolist()
    else:
        values = [float(v) for v in value]
    if len(values) > limit:
        raise RequestError(422, "embedding", f"embedding has {len(values)} values; the limit is {limit}")
    if len(values) != expected:
        raise RequestError(422, "embedding", f"embedding has {len(values)} values; this checkpoint takes {expected} "
                                             f"(tokens × dim, flat)")
    if not all(math.isfinite(v) for v in values):
        raise RequestError(422, "embedding", "embedding values must be finite (no NaN or infinity)")
    return tuple(values)
