"""Guided samples from a checkpoint: binds a network to the sampler's ``eps_fn`` seam.

:class:`CheckpointSampler` is what ``jobs/sample.py``, serving, sweeps and evaluation
during training sample with, so every consumer runs the same sampler
(:func:`cfgd.diffusion.solvers.sample`) on the same weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch

from cfgd.diffusion import conditions as cond_ops
from cfgd.diffusion.plan import Condition, SamplingPlan
from cfgd.diffusion.process import EpsFn, as_eps_fn
from cfgd.diffusion.solvers import sample
from cfgd.io.checkpoint import Checkpoint, fetch_checkpoint, load_checkpoint
from cfgd.io.storage import StorageOptions
from cfgd.model.from_checkpoint import build_network
from cfgd.sampling.row_conditions import as_condition, check_kind, encode_rows


# Rows per network call on CPU. Measured with the demo model (bench/bench_sampling.py):
# per-row cost grows past ~32 rows as activations spill out of the caches, so a guided
# batch of 2B rows runs faster as 2B/32 calls. GPUs want the biggest batch: no cap.
CPU_ROWS_PER_CALL = 32


def eps_fn_of(model: torch.nn.Module, rows_per_call: int = 0, channels_last: bool = False) -> EpsFn:
    """The network as the sampler sees it: eps_fn(x_t (B,C,H,W), t (B,), y (B, …)) → ε (B,C,H,W).

    How the network is run, never what it computes:

    * ``rows_per_call`` > 0 splits a call into calls of at most that many rows (each
      row's ε depends only on its own inputs, so this only changes float rounding of
      small batches; see cfgd.serving.row_padding.RowPadded);
    * ``channels_last`` feeds x in NHWC layout, for a model converted with
      ``model.to(memory_format=torch.channels_last)`` (oneDNN's faster CPU convolutions).
    """
    def run(x: torch.Tensor, t: torch.Tensor, y) -> torch.Tensor:
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return model(x, t, y).contiguous()

    if rows_per_call <= 0:
        return run

    def chunked(x: torch.Tensor, t: torch.Tensor, y) -> torch.Tensor:
        if x.shape[0] <= rows_per_call:
            return run(x, t, y)
        return torch.cat([run(x[i:i + rows_per_call], t[i:i + rows_per_call],
                              cond_ops.take(y, slice(i, i + rows_per_call)))
                          for i in range(0, x.shape[0], rows_per_call)])

    return chunked


def prepare_network(model: torch.nn.Module, device: str | torch.device, rows_per_call: int | None = None,
                    channels_last: bool | None = None) -> tuple[torch.nn.Module, int, bool]:
    """(model on ``device`` in the chosen layout, rows_per_call, channels_last) for eps_fn_of.

    None picks what measured fastest for the device: on CPU, calls of CPU_ROWS_PER_CALL
    rows in channels-last layout; on a GPU, one call for all rows in the default layout.
    """
    cpu = torch.device(device).type == "cpu"
    rows = (CPU_ROWS_PER_CALL if cpu else 0) if rows_per_call is None else rows_per_call
    nhwc = cpu if channels_last is None else channels_last
    model = model.to(device)
    if nhwc:
        model = model.to(memory_format=torch.channels_last)
    return model, rows, nhwc


@dataclass
class CheckpointSampler:
    """A loaded checkpoint ready to sample: network (EMA weights by default) + schedule.

    ``rows_per_call`` and ``channels_last`` say how the network is run (see eps_fn_of);
    ``load`` picks them for the device.
    """

    checkpoint: Checkpoint
    model: torch.nn.Module
    device: torch.device
    rows_per_call: int = 0
    channels_last: bool = False
    storage: StorageOptions | None = field(default=None, repr=False)
    _guides: dict = field(default_factory=dict, repr=False)  # autoguidance networks loaded by URI

    @classmethod
    def load(cls, path: str | Path, use_ema: bool = True, device: str = "cpu",
             storage: StorageOptions | None = None, rows_per_call: int | None = None,
             channels_last: bool | None = None) -> "CheckpointSampler":
        """A checkpoint or run directory, local or ``s3://`` (newest valid checkpoint).

        ``rows_per_call`` / ``channels_last``: see prepare_network (None: per device).
        """
        ck = load_checkpoint(fetch_checkpoint(str(path), storage))
        model, rows, nhwc = prepare_network(build_network(ck, ema=use_ema), device, rows_per_call, channels_last)
        return cls(ck, model, torch.device(device), rows, nhwc, storage)

    def eps_fn(self) -> EpsFn:
        """This sampler's network behind the sampler's seam, its output turned into ε
        (and x̂0) from the checkpoint's parameterization (cfgd.diffusion.process.as_eps_fn)."""
        return as_eps_fn(eps_fn_of(self.model, self.rows_per_call, self.channels_last), self.schedule(),
                         self.checkpoint.parameterization)

    @property
    def num_classes(self) -> int:
        return self.checkpoint.spec.num_classes

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.checkpoint.shape

    @property
    def timesteps(self) -> int:
        return self.checkpoint.timesteps

    def schedule(self):
        return self.checkpoint.schedule()

    def check_guide(self, guide: "CheckpointSampler", name: str) -> None:
        """Autoguidance needs a guiding network that denoises the same problem."""
        if self.checkpoint.spec.condition != "label":
            # The main network encodes each row's prompt once; a guide would need its own encoding.
            raise ValueError(f"guide {name!r}: rule 'autoguidance' is available for label models, and this "
                             f"checkpoint is conditioned on {self.checkpoint.spec.condition}")
        # Parameterisations may differ: each network is turned into ε by its own eps_fn.
        mine, theirs = ((g.timesteps, g.checkpoint.schedule_name, g.checkpoint.zero_terminal_snr, g.shape,
                         g.num_classes) for g in (self, guide))
        if mine != theirs:
            raise ValueError(f"guide {name!r} does not match the checkpoint: (T, schedule, zero terminal SNR, "
                             f"image shape, classes) {theirs} vs {mine}")

    def guide_fns(self, plan: SamplingPlan,
                  guides: Mapping[str, "CheckpointSampler"] | None = None) -> dict[str, EpsFn]:
        """eps_fns of the plan's guiding networks: from ``guides`` (name → CheckpointSampler), else
        each ``guide`` loaded as a checkpoint URI (once per CheckpointSampler)."""
        out = {}
        for name in plan.guides:
            if guides is not None and name in guides:
                gen = guides[name]
            else:
                if name not in self._guides:
                    self._guides[name] = CheckpointSampler.load(name, device=str(self.device), storage=self.storage,
                                                        rows_per_call=self.rows_per_call,
                                                        channels_last=self.channels_last)
                gen = self._guides[name]
            self.check_guide(gen, name)
            out[name] = gen.eps_fn()
        return out

    def sample(self, conditions: Sequence[int | Condition], seeds: Sequence[int], plan: SamplingPlan,
               guides: Mapping[str, "CheckpointSampler"] | None = None, batch_size: int = 256,
               progress: bool = False) -> torch.Tensor:
        """Images in [-1, 1], (N, C, H, W) float32 CPU; ``plan`` has one row per image.

        ``conditions``: per image a class label (an int) or a Condition (label, prompt and
        negative prompt, or embedding: the checkpoint's kind). Rows are sampled in chunks
        of ``batch_size``; each row depends only on its own condition, plan row and seed,
        so the chunking does not change the result.
        """
        rows = [as_condition(c) for c in conditions]
        check_kind(self.checkpoint, rows)
        plan.check(self.timesteps)
        plan.check_image(self.checkpoint.spec.has_image)
        guide_fns = self.guide_fns(plan, guides)
        schedule, eps_fn, n = self.schedule(), self.eps_fn(), len(rows)
        outs = []
        for lo in range(0, n, batch_size):
            hi = min(n, lo + batch_size)
            cond, uncond, no_image = encode_rows(self.checkpoint, self.model, rows[lo:hi], self.device)
            outs.append(sample(eps_fn, schedule, cond, list(seeds)[lo:hi], self.shape, plan.select(lo, hi),
                               guides=guide_fns, device=self.device, progress=progress, uncond=uncond,
                               no_image=no_image).cpu())
        return torch.cat(outs)
