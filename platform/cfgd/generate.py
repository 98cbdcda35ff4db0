"""Guided samples from a checkpoint: binds a network to the sampler's ``eps_fn`` seam.

Used by ``jobs/sample.py`` (and later by serving and sweeps), so every consumer
runs the same sampler on the same weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from cfgd.checkpoint import Checkpoint, fetch_checkpoint, load_checkpoint
from cfgd.config import SampleConfig
from cfgd.diffusion import EpsFn, as_eps_fn
from cfgd.grid import labelled_grid, zoom_for
from cfgd.images import to_uint8
from cfgd.plan import Guidance, SamplingPlan, Solver
from cfgd.sampling import sample
from cfgd.storage import StorageOptions, is_remote


# Rows per network call on CPU. Measured with the demo model (bench/bench_sampling.py):
# per-row cost grows past ~32 rows as activations spill out of the caches, so a guided
# batch of 2B rows runs faster as 2B/32 calls. GPUs want the biggest batch: no cap.
CPU_ROWS_PER_CALL = 32


def eps_fn_of(model: torch.nn.Module, rows_per_call: int = 0, channels_last: bool = False) -> EpsFn:
    """The network as the sampler sees it: eps_fn(x_t (B,C,H,W), t (B,), labels (B,)) → ε (B,C,H,W).

    How the network is run, never what it computes:

    * ``rows_per_call`` > 0 splits a call into calls of at most that many rows (each
      row's ε depends only on its own inputs, so this only changes float rounding of
      small batches; see serving.RowPadded);
    * ``channels_last`` feeds x in NHWC layout, for a model converted with
      ``model.to(memory_format=torch.channels_last)`` (oneDNN's faster CPU convolutions).
    """
    def run(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return model(x, t, y).contiguous()

    if rows_per_call <= 0:
        return run

    def chunked(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= rows_per_call:
            return run(x, t, y)
        return torch.cat([run(x[i:i + rows_per_call], t[i:i + rows_per_call], y[i:i + rows_per_call])
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


class RowPadded(torch.nn.Module):
    """The network with every forward batch padded to a multiple of ``multiple`` rows.

    Why: CPU kernels (oneDNN convolutions, MKL GEMM) choose their algorithm by batch
    size, and for small batches that changes each row's rounding. The DDIM step at
    t = T divides ε̂ by sqrt(ᾱ_T) ≈ 0.01, so a seed gave visibly different images alone
    and inside a batch (up to 1e-2; torch 2.13 CPU, measured). Every batch of >= 16 rows
    gave bit-identical rows, so padding makes an image's bytes independent of what it
    was batched with. Pad rows copy row 0's timestep and label; their output is dropped.
    """

    def __init__(self, net: torch.nn.Module, multiple: int):
        super().__init__()
        self.net = net
        self.multiple = multiple

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        pad = -B % self.multiple
        if pad == 0:
            return self.net(x, t, y)
        nhwc = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
        x = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))])
        if nhwc:  # cat returns NCHW; keep the layout the network was converted to
            x = x.contiguous(memory_format=torch.channels_last)
        t = torch.cat([t, t[:1].expand(pad)])
        y = torch.cat([y, y[:1].expand(pad)])
        return self.net(x, t, y)[:B]


@dataclass
class Generator:
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
             channels_last: bool | None = None) -> "Generator":
        """A checkpoint or run directory, local or ``s3://`` (newest valid checkpoint).

        ``rows_per_call`` / ``channels_last``: see prepare_network (None: per device).
        """
        ck = load_checkpoint(fetch_checkpoint(str(path), storage))
        model, rows, nhwc = prepare_network(ck.build(ema=use_ema), device, rows_per_call, channels_last)
        return cls(ck, model, torch.device(device), rows, nhwc, storage)

    def eps_fn(self) -> EpsFn:
        """This generator's network behind the sampler's seam, its output turned into ε
        (and x̂0) from the checkpoint's parameterization (cfgd.diffusion.as_eps_fn)."""
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

    def check_guide(self, guide: "Generator", name: str) -> None:
        """Autoguidance needs a guiding network that denoises the same problem."""
        # Parameterisations may differ: each network is turned into ε by its own eps_fn.
        mine, theirs = ((g.timesteps, g.checkpoint.schedule_name, g.checkpoint.zero_terminal_snr, g.shape,
                         g.num_classes) for g in (self, guide))
        if mine != theirs:
            raise ValueError(f"guide {name!r} does not match the checkpoint: (T, schedule, zero terminal SNR, "
                             f"image shape, classes) {theirs} vs {mine}")

    def guide_fns(self, plan: SamplingPlan, guides: Mapping[str, "Generator"] | None = None) -> dict[str, EpsFn]:
        """eps_fns of the plan's guiding networks: from ``guides`` (name → Generator), else
        each ``guide`` loaded as a checkpoint URI (once per Generator)."""
        out = {}
        for name in plan.guides:
            if guides is not None and name in guides:
                gen = guides[name]
            else:
                if name not in self._guides:
                    self._guides[name] = Generator.load(name, device=str(self.device), storage=self.storage,
                                                        rows_per_call=self.rows_per_call,
                                                        channels_last=self.channels_last)
                gen = self._guides[name]
            self.check_guide(gen, name)
            out[name] = gen.eps_fn()
        return out

    def sample(self, labels: Sequence[int], seeds: Sequence[int], plan: SamplingPlan,
               guides: Mapping[str, "Generator"] | None = None, batch_size: int = 256,
               progress: bool = False) -> torch.Tensor:
        """Images in [-1, 1], (N, C, H, W) float32 CPU; ``plan`` has one row per image.

        Rows are sampled in chunks of ``batch_size``; each row depends only on its own
        label, plan row and seed, so the chunking does not change the result.
        """
        labels_t = torch.as_tensor(list(labels), dtype=torch.long)
        bad = [int(v) for v in labels_t if not 0 <= v < self.num_classes]
        if bad:
            raise ValueError(f"class labels {bad} are outside [0, {self.num_classes})")
        plan.check(self.timesteps)
        guide_fns = self.guide_fns(plan, guides)
        schedule, eps_fn, n = self.schedule(), self.eps_fn(), len(labels_t)
        outs = []
        for lo in range(0, n, batch_size):
            hi = min(n, lo + batch_size)
            outs.append(sample(eps_fn, schedule, labels_t[lo:hi], list(seeds)[lo:hi], self.shape,
                               plan.select(lo, hi), null_label=self.checkpoint.null_label, guides=guide_fns,
                               device=self.device, progress=progress).cpu())
        return torch.cat(outs)


def sample_grid(sc: SampleConfig, solver: Solver, columns: list[Guidance], device: str = "cpu",
                storage: StorageOptions | None = None) -> dict[str, str]:
    """Run ``jobs/sample.py``: a grid of rows = classes, columns = guidance (w values).

    ``solver`` and ``columns`` come from :func:`cfgd.config.config_plan`. Sample j of
    class c uses seed ``sc.seed + c·per_cell + j`` in every column, so the columns differ
    only by guidance. Writes ``grid.png`` (class names left of the rows, ``w = …`` above
    the columns, images magnified to >= 84 px) and ``samples.npz`` (images uint8 NHWC,
    labels, w, guidance_scale, seeds) and returns their paths.
    """
    gen = Generator.load(sc.checkpoint, use_ema=sc.use_ema, device=device, storage=storage)
    classes = list(sc.classes) or list(range(gen.num_classes))
    labels, rows, seeds = [], [], []
    for c in classes:
        for g in columns:
            for j in range(sc.per_cell):
                labels.append(c)
                rows.append(g)
                seeds.append(sc.seed + c * sc.per_cell + j)
    plan = SamplingPlan(solver=solver, rows=tuple(rows))
    ws = [g.w for g in columns]
    rule = columns[0].rule
    print(f"[cfgd.sample] checkpoint {gen.checkpoint.path} (step {gen.checkpoint.step}); "
          f"{len(labels)} samples: classes {classes} × w {ws} × {sc.per_cell}, rule {rule}, "
          f"{solver.steps} {solver.name} steps, eta {solver.eta}", flush=True)
    images = gen.sample(labels, seeds, plan, batch_size=sc.batch_size, progress=True)
    u8 = to_uint8(images)
    if sc.out:
        out = Path(sc.out)
    elif is_remote(sc.checkpoint):
        out = Path("outputs/samples") / sc.checkpoint.rstrip("/").rsplit("/", 1)[-1]
    else:
        out = Path(gen.checkpoint.path).parent / "samples"
    out.mkdir(parents=True, exist_ok=True)
    grid_path, npz_path = out / "grid.png", out / "samples.npz"
    names = gen.checkpoint.label_names
    labelled_grid(u8, [names[c] for c in classes], len(ws), col_labels=[f"w = {w:g}" for w in ws],
                  per_cell=sc.per_cell, zoom=zoom_for(gen.shape[1])).save(grid_path)
    w_arr = np.asarray([g.w for g in rows], dtype=np.float64)
    np.savez_compressed(npz_path, images=u8, labels=np.asarray(labels, dtype=np.int64), w=w_arr,
                        guidance_scale=1 + w_arr, seeds=np.asarray(seeds, dtype=np.int64),
                        label_names=np.asarray(gen.checkpoint.label_names))
    return {"grid": str(grid_path), "samples": str(npz_path)}
