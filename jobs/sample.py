"""Sample a grid of guided images from a checkpoint: rows = classes (or prompts), columns = w.

    python jobs/sample.py --config jobs/configs/fashion_mnist.yaml \
        sample.checkpoint=outputs/runs/fashion_mnist_demo 'sample.w=[0,1,3]'

A text-conditioned checkpoint takes prompts instead of classes, and optionally a
negative prompt: 'sample.prompts=[a dark dress,a light bag]' sample.negative_prompt=dark
An embedding-conditioned one takes rows of a data set with an embedding column (image
variations): sample.data_root=outputs/data/fashion_mnist_embedded 'sample.data_rows=[0,1,2]';
an image-conditioned one the rows' labels and conditioning images (sample.image_scale: s_I).


sample.checkpoint is a checkpoint directory or a run directory (its newest
valid checkpoint is used). sample.solver, sample.rule and the rule's parameters choose
how (README: "Guidance rules and solvers"). Writes grid.png and samples.npz.
"""

from pathlib import Path

import numpy as np
import torch

from cfgd.cli import fail, job, refuse
from cfgd.config import ConfigError, SampleConfig, config_plan
from cfgd.data.images import to_uint8
from cfgd.data.split_loader import read_rows
from cfgd.diffusion.plan import Condition, Guidance, SamplingPlan, Solver
from cfgd.io.storage import StorageOptions, is_remote
from cfgd.sampling.checkpoint_sampler import CheckpointSampler
from cfgd.sampling.tiles import labelled_grid, zoom_for


def sample_grid(sc: SampleConfig, solver: Solver, columns: list[Guidance], device: str = "cpu",
                storage: StorageOptions | None = None) -> dict[str, str]:
    """Run ``jobs/sample.py``: a grid of rows = classes (prompts, or embedded data rows),
    columns = guidance (w values).

    ``solver`` and ``columns`` come from :func:`cfgd.config.config_plan`. Sample j of
    row key c (the class; the prompt's or data row's position) uses seed ``sc.seed +
    c·per_cell + j`` in every column, so the columns differ only by guidance. Writes
    ``grid.png`` (row names left of the rows, ``w = …`` above the columns, images
    magnified to >= 84 px) and ``samples.npz`` (images uint8 NHWC, labels (row keys), w,
    guidance_scale, seeds; a text model's prompts per sample; an embedding model's
    embedding_rows and their images, sources) and returns their paths.
    """
    gen = CheckpointSampler.load(sc.checkpoint, use_ema=sc.use_ema, device=device, storage=storage)
    grid_rows, names, extra = grid_conditions(sc, gen, storage)
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
    what = (f"{len(grid_rows)} row(s) of {sc.data_root}/{sc.data_split}" if sc.data_root
            else f"{len(grid_rows)} prompt(s)" if sc.prompts else f"classes {[k for k, _ in grid_rows]}")
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
    if gen.checkpoint.spec.condition == "text":  # per sample, like labels, w and seeds
        extra["prompts"] = np.asarray([c.prompt for c in conditions])
    np.savez_compressed(npz_path, images=u8, labels=np.asarray(labels, dtype=np.int64), w=w_arr,
                        guidance_scale=1 + w_arr, seeds=np.asarray(seeds, dtype=np.int64),
                        label_names=np.asarray(gen.checkpoint.label_names), **extra)
    return {"grid": str(grid_path), "samples": str(npz_path)}


def grid_conditions(sc: SampleConfig, gen: CheckpointSampler, storage: StorageOptions | None = None
                    ) -> tuple[list[tuple[int, object]], list[str], dict]:
    """The grid's rows: (key, condition), row names, and what samples.npz adds about them. A
    label model's rows are classes (key = class, as ``labels`` in samples.npz), a text model's
    the prompts; an embedding model's, and an image-conditioned model's, chosen rows of a data
    set (``sample.data_root``: their embeddings, or their labels and conditioning images; key
    = the row's position)."""
    spec = gen.checkpoint.spec
    kind = "image" if spec.has_image else spec.condition
    if kind == "image" and spec.condition != "label":
        raise ValueError(f"jobs/sample.py samples image-conditioned label models; this one's y is {spec.condition}")
    given = {"classes": sc.classes, "prompts": sc.prompts, "negative_prompt": sc.negative_prompt,
             "data_root": sc.data_root, "data_rows": sc.data_rows}
    own = {"label": ("classes",), "text": ("prompts", "negative_prompt"), "embedding": ("data_root", "data_rows"),
           "image": ("data_root", "data_rows")}[kind]
    if kind == "text" and not sc.prompts:
        raise ValueError("sample.prompts is required: this checkpoint is conditioned on text "
                         "(e.g. 'sample.prompts=[a dark dress,a light bag]')")
    if kind in ("embedding", "image") and not sc.data_root:
        what = "embeddings" if kind == "embedding" else "conditioning images"
        raise ValueError(f"sample.data_root is required: this checkpoint is conditioned on {what}; give the data "
                         f"set whose rows hold them (e.g. outputs/data/fashion_mnist_embedded)")
    for key, value in given.items():
        if value and key not in own:
            raise ValueError(f"sample.{key}: this checkpoint is conditioned on {kind} (give sample.{own[0]})")
    if kind == "text":
        neg = sc.negative_prompt or None
        rows = [(i, Condition(prompt=p, negative_prompt=neg)) for i, p in enumerate(sc.prompts)]
        return rows, list(sc.prompts), {"negative_prompt": np.asarray(sc.negative_prompt)}
    if kind in ("embedding", "image"):
        return data_rows(sc, gen, storage)
    classes = list(sc.classes) or list(range(gen.num_classes))
    names = gen.checkpoint.label_names
    return [(c, c) for c in classes], [names[c] for c in classes], {}


def data_rows(sc: SampleConfig, gen: CheckpointSampler, storage: StorageOptions | None
              ) -> tuple[list[tuple[int, object]], list[str], dict]:
    """Grid rows from rows ``sc.data_rows`` of ``sc.data_root``/``sc.data_split``: their
    embeddings (an embedding model) or their labels and conditioning images (an image model).
    samples.npz gets the rows' indices (``data_rows``) and their images (``sources``)."""
    picked = list(sc.data_rows) or list(range(8))
    try:
        data = read_rows(sc.data_root, sc.data_split, picked, storage)
    except (IndexError, FileNotFoundError) as err:
        raise ValueError(f"sample.data_rows / sample.data_root: {err}") from None
    spec, names = gen.checkpoint.spec, gen.checkpoint.label_names
    extra = {"data_rows": np.asarray(picked), "sources": to_uint8(torch.from_numpy(data["image"]))}
    row_names = [f"{sc.data_split}[{r}] {names[c]}" for r, c in zip(picked, data["label"])]
    if spec.has_image:
        want = (spec.cond_channels, spec.cond_height, spec.cond_width)
        if "cond_image" not in data or tuple(data["cond_image"].shape[1:]) != want:
            got = tuple(data["cond_image"].shape[1:]) if "cond_image" in data else "no cond_image column"
            raise ValueError(f"sample.data_root={sc.data_root!r}: the checkpoint takes conditioning images of "
                             f"(c, h, w) = {want}; {sc.data_split} has {got}")
        rows = [(i, Condition(label=int(c), image=bytes(png))) for i, (c, png) in enumerate(zip(data["label"],
                                                                                               data["cond_png"]))]
        return rows, row_names, {**extra, "cond_images": to_uint8(torch.from_numpy(data["cond_image"]))}
    want = (spec.embedding_tokens, spec.embedding_dim)
    if "embedding" not in data or tuple(data["embedding"].shape[1:]) != want:
        got = tuple(data["embedding"].shape[1:]) if "embedding" in data else "no embedding column"
        raise ValueError(f"sample.data_root={sc.data_root!r}: the checkpoint takes embeddings of (tokens, dim) "
                         f"= {want}; {sc.data_split} has {got}")
    rows = [(i, Condition(embedding=tuple(e.reshape(-1).tolist()))) for i, e in enumerate(data["embedding"])]
    return rows, row_names, extra


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
