"""The sweep's pictures: sample grids (rows = w, the same seeds in every row) and the plots."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cfgd.data.images import decode_png, figure_png
from cfgd.sampling.tiles import labelled_grid
from cfgd.sweep.point_store import SweepOutput
from cfgd.sweep.sweep_grid import GridPoint
from cfgd.sweep.sweep_table import group_name


def write_grids(out: SweepOutput, points: list[GridPoint], ids: dict[GridPoint, str], columns: int,
                 zoom: int) -> dict[str, str]:
    """grid.png for the first group (rows = w, the same seeds in every row), grids/* for every group."""
    groups: dict[tuple, list[GridPoint]] = {}
    for p in points:
        groups.setdefault(p.group, []).append(p)
    paths = {}
    for gi, (group, members) in enumerate(groups.items()):
        images, seeds = [], None
        for p in members:
            t = pq.read_table(pa.BufferReader(out.read(f"points/{ids[p]}.samples.parquet")), columns=["seed", "image"])
            t = t.slice(0, columns)
            s = t.column("seed").to_pylist()
            assert seeds is None or s == seeds, "grid rows must share seeds"
            seeds = s
            images += [decode_png(b) for b in t.column("image").to_pylist()]
        png = io.BytesIO()
        labelled_grid(np.stack(images), [f"w={p.w:g}" for p in members], len(seeds), zoom=zoom, left=48,
                      font_size=None).save(png, format="PNG")
        if gi == 0:
            paths["grid"] = out.write("grid.png", png.getvalue())
        if len(groups) > 1:
            paths[f"grid:{group_name(group)}"] = out.write(f"grids/{group_name(group)}.png", png.getvalue())
    return paths


def plot_sweep(rows: list[dict]) -> bytes:
    """PNG: FID vs w; accuracy and IS vs w; FID vs IS (as in Ho & Salimans' Fig. 4). Floor dashed."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, Agg renders the PNG

    gen = [r for r in rows if r["kind"] == "generated"]
    floor = next((r for r in rows if r["kind"] == "real_floor"), None)
    groups: dict[tuple, list[dict]] = {}
    for r in gen:
        groups.setdefault(r["group"], []).append(r)
    fig = Figure(figsize=(16, 4.6), layout="constrained")
    ax_fid, ax_acc, ax_tradeoff = fig.subplots(1, 3)
    ax_is = ax_acc.twinx()
    for gi, (key, rs) in enumerate(groups.items()):
        rs = sorted(rs, key=lambda r: r["w"])
        w = [r["w"] for r in rs]
        name = key if len(groups) > 1 else None
        color = f"C{gi % 10}"
        ax_fid.plot(w, [r["fid"] for r in rs], "o-", color=color, label=name)
        ax_acc.plot(w, [r["accuracy"] for r in rs], "o-", color=color, label=name and f"accuracy {name}")
        ax_is.plot(w, [r["inception_score"] for r in rs], "s--", color=color, alpha=0.6)
        ax_tradeoff.plot([r["inception_score"] for r in rs], [r["fid"] for r in rs], "o-", color=color, label=name)
        for r in rs:
            ax_tradeoff.annotate(f"w={r['w']:g}", (r["inception_score"], r["fid"]), textcoords="offset points",
                                 xytext=(4, 4), fontsize=8)
    if floor is not None:
        ax_fid.axhline(floor["fid"], color="gray", ls=":", label="real vs real (floor)")
        ax_acc.axhline(floor["accuracy"], color="gray", ls=":", label="real data accuracy")
        ax_is.axhline(floor["inception_score"], color="gray", ls="-.", alpha=0.5)
        ax_tradeoff.plot([floor["inception_score"]], [floor["fid"]], "k*", ms=10, label="real vs real")
    ax_fid.set(xlabel="guidance strength w", ylabel="FID (evaluator features)", title="FID vs w")
    ax_acc.set(xlabel="guidance strength w", ylabel="conditional accuracy (o-)", title="accuracy and IS vs w")
    ax_is.set_ylabel("Inception Score (s--)")
    ax_tradeoff.set(xlabel="Inception Score", ylabel="FID", title="FID vs IS (trade-off)")
    for ax in (ax_fid, ax_acc, ax_tradeoff):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return figure_png(fig)
