"""Each row's condition as the network takes it: class ids, or prompts and embeddings encoded once.

A row's condition (cfgd.diffusion.plan.Condition, or a bare int for a label) meets the
checkpoint here: what kind it must be, and its size, are the checkpoint's. Text is
tokenized with the checkpoint's own tokenizer and each distinct token sequence (prompts
and negative prompts together) goes through the text encoder once per call, not once
per solver step: the sampler then moves the encoded rows (cfgd.diffusion.conditions).
Errors name the field and row (``prompt[3]``, ``embedding[0]``): the edges turn them into
a 4xx or a config error.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from cfgd.data import tokenizer as tokenizers
from cfgd.data.images import decode_png, uint8_to_unit
from cfgd.data.tokenizer import CaptionTokenizer
from cfgd.diffusion import conditions as cond_ops
from cfgd.diffusion.conditions import Cond
from cfgd.diffusion.plan import Condition
from cfgd.io.checkpoint import Checkpoint
from cfgd.model.conditioning import image_input

KIND_FIELD = {"label": "label", "text": "prompt", "embedding": "embedding"}


def as_condition(row: Any) -> Condition:
    """An int (a class label), a Condition, or its fields as a mapping → Condition."""
    if isinstance(row, Condition):
        return row
    if isinstance(row, int) and not isinstance(row, bool):
        return Condition(label=row)
    if hasattr(row, "item") and not isinstance(row, (str, bytes)):  # a numpy / torch integer
        return Condition(label=int(row.item()))
    return Condition.model_validate(row)


def tokenizer_of(ck: Checkpoint) -> CaptionTokenizer:
    """The text model's caption tokenizer, from its checkpoint (parsed once per tokenizer)."""
    return tokenizers.cached(ck.tokenizer_json)


def check_kind(ck: Checkpoint, rows: Sequence[Condition]) -> None:
    """ValueError naming the first row whose condition this checkpoint cannot take."""
    kind = ck.spec.condition
    want = KIND_FIELD[kind]
    for i, r in enumerate(rows):
        for name in ("label", "prompt", "embedding"):
            if name != want and getattr(r, name) is not None:
                raise ValueError(f"{name}[{i}]: this checkpoint is conditioned on {kind} (give {want!r}, "
                                 f"not {name!r})")
        if r.negative_prompt is not None and kind != "text":
            raise ValueError(f"negative_prompt[{i}]: this checkpoint is conditioned on {kind}, not text")
        if kind == "label" and r.label is None:
            raise ValueError(f"label[{i}]: a class label is required by this checkpoint")
        if kind == "label" and not r.label < ck.spec.num_classes:
            raise ValueError(f"label[{i}]={r.label}: class labels are in [0, {ck.spec.num_classes})")
        if r.image is not None and not ck.spec.has_image:
            raise ValueError(f"image[{i}]: this checkpoint has no image condition")


def encode_rows(ck: Checkpoint, model: torch.nn.Module, rows: Sequence[Condition],
                device: torch.device) -> tuple[Cond, Cond, tuple[Cond, Cond] | None]:
    """(y, ε_u's condition, the two without the image) of every row, on ``device``.

    y and ε_u's condition: class ids and null labels, or the model's encoded conditions
    (cfgd.model.conditioning) of the prompts and negative prompts (∅ for none) or of the
    embeddings (the learned null for ε_u and rows without one). A model with an image
    condition: both encoded, with the row's image (∅ where it has none), and the third
    item the same pair with the image's ∅ (guidance over two conditions); else None.
    ``rows`` have passed :func:`check_kind` (CheckpointSampler.sample checks them all first)."""
    y, u = _encode_y(ck, model, rows, device)
    if not ck.spec.has_image:
        return y, u, None
    with torch.inference_mode():
        if not isinstance(y, dict):  # labels: encoded here, like the other kinds
            y, u = model.encode_y(y), model.encode_y(u)
        image, null = decode_images(ck, rows)
        size = (ck.spec.image_size, ck.spec.image_size)
        given = image_input(image.to(device), null.to(device), size)
        absent = image_input(image.to(device), torch.ones_like(null).to(device), size)
    return {**y, "image": given}, {**u, "image": given}, ({**y, "image": absent}, {**u, "image": absent})


def decode_images(ck: Checkpoint, rows: Sequence[Condition]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's conditioning image as float (B, c, h, w) in [-1, 1] (zeros where none) and
    null (B,) bool; ValueError naming ``image[i]`` for a PNG that is not the checkpoint's size."""
    spec = ck.spec
    want = (spec.cond_height, spec.cond_width, spec.cond_channels)
    out = np.zeros((len(rows), *want), dtype=np.uint8)
    for i, r in enumerate(rows):
        if r.image is None:
            continue
        try:
            arr = decode_png(r.image)
        except ValueError as err:
            raise ValueError(f"image[{i}]: {err}") from None
        if arr.shape != want:
            raise ValueError(f"image[{i}] decodes to (h, w, c) = {arr.shape}; this checkpoint takes {want}")
        out[i] = arr
    return torch.from_numpy(uint8_to_unit(out)), torch.tensor([r.image is None for r in rows])


def _encode_y(ck: Checkpoint, model: torch.nn.Module, rows: Sequence[Condition], device: torch.device) -> tuple:
    """(y, ε_u's condition) without any image: class ids, or encoded prompts / embeddings."""
    spec, B = ck.spec, len(rows)
    if spec.condition == "label":
        y = torch.tensor([r.label for r in rows], dtype=torch.long, device=device)
        return y, torch.full_like(y, spec.null_label)
    if spec.condition == "text":
        tok = tokenizer_of(ck)
        ids = torch.from_numpy(tok.encode([r.prompt or "" for r in rows], "prompt").ids)
        neg = torch.from_numpy(tok.encode([r.negative_prompt or "" for r in rows], "negative_prompt").ids)
        distinct, inverse = torch.unique(torch.cat([ids, neg]), dim=0, return_inverse=True)
        raw: dict = {"tokens": distinct.to(device)}
    else:
        L, D = spec.embedding_tokens, spec.embedding_dim
        values = torch.zeros(B, L, D)
        for i, r in enumerate(rows):
            if r.embedding is not None:
                if len(r.embedding) != L * D:
                    raise ValueError(f"embedding[{i}] has {len(r.embedding)} values; this checkpoint takes "
                                     f"{L}×{D} = {L * D} (tokens × dim, flat)")
                values[i] = torch.tensor(r.embedding, dtype=torch.float32).reshape(L, D)
        null = torch.tensor([r.embedding is None for r in rows])
        raw = {"embedding": torch.cat([values, values]).to(device),
               "null": torch.cat([null, torch.ones(B, dtype=torch.bool)]).to(device)}
        inverse = torch.arange(2 * B)
    with torch.inference_mode():
        encoded = model.encode_y(raw)
    inverse = inverse.to(device)
    return cond_ops.take(encoded, inverse[:B]), cond_ops.take(encoded, inverse[B:])
