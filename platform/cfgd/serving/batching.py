"""One dynamic batch of /generate requests → one ``CheckpointSampler.sample`` call per solver,
and each request's images rendered as its response."""

from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass

import torch

from cfgd.data.images import encode_png, to_uint8
from cfgd.diffusion.plan import Guidance, SamplingPlan, Solver
from cfgd.sampling.checkpoint_sampler import CheckpointSampler
from cfgd.serving.request_conditions import RequestCondition
from cfgd.sampling.tiles import make_grid


@dataclass
class SampleSpec:
    """One validated /generate request: ``n`` rows of one condition and one w."""

    gen: CheckpointSampler
    checkpoint: str
    condition: RequestCondition
    seeds: list[int]
    solver: Solver
    guidance: Guidance
    guides: dict  # guide name -> CheckpointSampler (autoguidance)
    format: str

    @property
    def n(self) -> int:
        return len(self.seeds)

    def schedule_key(self) -> tuple:
        """Requests with equal keys share one ``CheckpointSampler.sample`` call: condition, seed and
        the whole guidance rule may differ per row; the checkpoint and solver may not."""
        return (id(self.gen), self.solver)


def _sample_group(members: list[SampleSpec]) -> list[torch.Tensor]:
    """One ``CheckpointSampler.sample`` call for requests that share a checkpoint and solver."""
    first = members[0]
    labels = [s.condition.condition for s in members for _ in range(s.n)]
    seeds = [seed for s in members for seed in s.seeds]
    plan = SamplingPlan(solver=first.solver, rows=tuple(s.guidance for s in members for _ in range(s.n)))
    guides = {k: g for s in members for k, g in s.guides.items()}
    # One chunk: the whole group is one forward pass per step, the point of batching.
    images = first.gen.sample(labels, seeds, plan, guides=guides, batch_size=len(labels))
    return list(torch.split(images, [s.n for s in members]))


def sample_specs(specs: list[SampleSpec]) -> tuple[list[torch.Tensor | Exception], int]:
    """Images (n, C, H, W) in [-1, 1] per spec, and how many sample calls it took.

    A request that fails fails alone: when a group's call raises, its requests are
    sampled one by one (each row depends only on its own inputs, so batch-mates get the
    same images they would have got), and the failing ones get their exception.
    """
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(specs):
        groups.setdefault(s.schedule_key(), []).append(i)
    out: list[torch.Tensor | Exception | None] = [None] * len(specs)
    calls = 0
    for idxs in groups.values():
        calls += 1
        try:
            for i, images in zip(idxs, _sample_group([specs[i] for i in idxs])):
                out[i] = images
            continue
        except Exception as err:  # noqa: BLE001 - isolated below
            if len(idxs) == 1:
                out[idxs[0]] = err
                continue
        for i in idxs:
            calls += 1
            try:
                out[i] = _sample_group([specs[i]])[0]
            except Exception as err:  # noqa: BLE001 - this request's own failure
                out[i] = err
    return out, calls


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def render(spec: SampleSpec, images: torch.Tensor) -> dict:
    """The response body of one request (PNG bytes, not yet base64)."""
    u8 = to_uint8(images)
    g, sol = spec.guidance, spec.solver
    meta = {**spec.condition.describe(), "w": g.w, "guidance_scale": 1.0 + g.w,
            "seeds": spec.seeds, "checkpoint": spec.checkpoint, "solver": sol.name, "steps": sol.steps,
            "eta": sol.eta, "spacing": sol.spacing, "rule": g.rule,
            "interval": list(g.interval) if g.interval else None, "format": spec.format}
    if spec.format == "grid":
        cols = math.ceil(math.sqrt(spec.n))
        rows = math.ceil(spec.n / cols)
        return {**meta, "grid": png_bytes(make_grid(u8, rows, cols))}
    return {**meta, "images": [encode_png(img) for img in u8]}


def to_http_json(result: dict) -> dict:
    """PNG bytes → base64 strings for a JSON response."""
    out = dict(result)
    out["images"] = [base64.b64encode(b).decode("ascii") for b in result["images"]]
    return out
