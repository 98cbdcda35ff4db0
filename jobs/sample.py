"""Sample a grid of guided images from a checkpoint: rows = classes (or prompts), columns = w.

    python jobs/sample.py --config jobs/configs/fashion_mnist.yaml \
        sample.checkpoint=outputs/runs/fashion_mnist_demo 'sample.w=[0,1,3]'

A text-conditioned checkpoint takes prompts instead of classes, and optionally a
negative prompt: 'sample.prompts=[a dark dress,a light bag]' sample.negative_prompt=dark

sample.checkpoint is a checkpoint directory or a run directory (its newest
valid checkpoint is used). sample.solver, sample.rule and the rule's parameters choose
how (README: "Guidance rules and solvers"). Writes grid.png and samples.npz.
"""

from pathlib import Path

import numpy as np

from cfgd.cli import fail, job, refuse
from cfgd.config import ConfigError, SampleConfig, config_plan
from cfgd.data.images import to_uint8
from cfgd.diffusion.plan import Condition, Guidance, SamplingPlan, Solver
from cfgd.io.storage import StorageOptions, is_remote
from cfgd.sampling.checkpoint_sampler import CheckpointSampler
from cfgd.sampling.tiles import labelled_grid, zoom_for


def sample_grid(sc: SampleConfig, solver: Solver, columns: list[Guidance], device: str = "cpu",
                storage: StorageOptions | None = None) -> dict[str, str]:
    """Run ``jobs/sample.py``: a grid of rows = classes, columns = guidance (w values).

    ``solver`` and ``columns`` come from :func:`cfgd.config.config_plan`. Sample j of
    class c uses seed ``sc.seed + c·per_cell + j`` in every column, so the columns differ
    only by guidance. Writes ``grid.png`` (class names left of the rows, ``w = …`` above
    the columns, images magnified to >= 84 px) and ``samples.npz`` (images uint8 NHWC,
    labels, w, guidance_scale, seeds) and returns their paths.
    """
    gen = CheckpointSampler.load(sc.checkpoint, use_ema=sc.use_ema, device=device, storage=storage)
    grid_rows, names = grid_conditions(sc, gen)
    labels, rows, seeds, conditions = [], [], [], []
    for r, (key, cond) in enumerate(grid_rows):
        for g in columns:
            for j in range(sc.per_cell):
                labels.append(key)
                conditions.append(cond)
                rows.append(g)
                seeds.append(sc.seed + key * sc.per_cell + j)
    plan = SamplingPlan(solver=solver, rows=tuple(rows))
    ws = [g.w for g in columns]
    rule = columns[0].rule
    what = f"classes {[k for k, _ in grid_rows]}" if not sc.prompts else f"{len(sc.prompts)} prompt(s)"
    print(f"[cfgd.sample] checkpoint {gen.checkpoint.path} (step {gen.checkpoint.step}); "
          f"{len(labels)} samples: {what} × w {ws} × {sc.per_cell}, rule {rule}, "
          f"{solver.steps} {solver.name} steps, eta {solver.eta}"
          + (f", negative prompt {sc.negative_prompt!r}" if sc.negative_prompt else ""), flush=True)
    images = gen.sample(conditions, seeds, plan, batch_size=sc.batch_size, progress=True)
    u8 = to_uint8(images)
    if sc.out:
        out = Path(sc.out)
    elif is_remote(sc.checkpoint):
        out = Path("outputs/samples") / sc.checkpoint.rstrip("/").rsplit("/", 1)[-1]
    else:
        out = Path(gen.checkpoint.path).parent / "samples"
    out.mkdir(parents=True, exist_ok=True)
    grid_path, npz_path = out / "grid.png", out / "samples.npz"
    labelled_grid(u8, names, len(ws), col_labels=[f"w = {w:g}" for w in ws],
                  per_cell=sc.per_cell, zoom=zoom_for(gen.shape[1])).save(grid_path)
    w_arr = np.asarray([g.w for g in rows], dtype=np.float64)
    extra = ({"prompts": np.asarray([c.prompt for c in conditions]),
              "negative_prompt": np.asarray(sc.negative_prompt)} if sc.prompts else {})
    np.savez_compressed(npz_path, images=u8, labels=np.asarray(labels, dtype=np.int64), w=w_arr,
                        guidance_scale=1 + w_arr, seeds=np.asarray(seeds, dtype=np.int64),
                        label_names=np.asarray(gen.checkpoint.label_names), **extra)
    return {"grid": str(grid_path), "samples": str(npz_path)}


def grid_conditions(sc: SampleConfig, gen: CheckpointSampler) -> tuple[list[tuple[int, object]], list[str]]:
    """The grid's rows: (key, condition) and row names. A label model's rows are classes (key =
    class, as ``labels`` in samples.npz), a text model's the prompts (key = prompt index)."""
    kind = gen.checkpoint.spec.condition
    if kind == "text":
        if not sc.prompts:
            raise ValueError("sample.prompts is required: this checkpoint is conditioned on text "
                             "(e.g. 'sample.prompts=[a dark dress,a light bag]')")
        if sc.classes:
            raise ValueError("sample.classes: this checkpoint is conditioned on text; give sample.prompts")
        neg = sc.negative_prompt or None
        return [(i, Condition(prompt=p, negative_prompt=neg)) for i, p in enumerate(sc.prompts)], list(sc.prompts)
    if sc.prompts or sc.negative_prompt:
        raise ValueError(f"sample.{'prompts' if sc.prompts else 'negative_prompt'}: this checkpoint is "
                         f"conditioned on {kind}, not text (give sample.classes)")
    if kind != "label":
        raise ValueError(f"jobs/sample.py samples label and text models; this checkpoint is conditioned on {kind}")
    classes = list(sc.classes) or list(range(gen.num_classes))
    names = gen.checkpoint.label_names
    return [(c, c) for c in classes], [names[c] for c in classes]


if __name__ == "__main__":
    with job(__doc__, "sample", sections=("sample", "storage")) as cfg:
        if not cfg.sample.checkpoint:
            refuse(ValueError("sample.checkpoint is required: a checkpoint or run directory"))
        try:
            solver, columns = config_plan(cfg.sample)  # the sampling plan, built once, here
        except ConfigError as err:
            refuse(err)
        try:
            paths = sample_grid(cfg.sample, solver, columns, storage=cfg.storage)
        except ValueError as err:
            fail(err)
        print(f"grid: {paths['grid']}\nsamples: {paths['samples']}")
