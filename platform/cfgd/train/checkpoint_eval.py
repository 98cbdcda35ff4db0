"""Evaluation during training: checkpoints scored by the dataset's evaluator while training goes on.

Ray Train runs it (its ``ValidationConfig``): when rank 0 reports a checkpoint with
``validation=True`` (every ``train.eval_every`` steps and at the last step), the
controller queues a Ray task, one at a time, next to the training workers. The task
loads that checkpoint from storage (verified, like any consumer), samples guided images
at each ``train.eval_w`` and scores them against the real test split exactly as a sweep
does (:func:`score_generator`: the sweep's rows, seeds, DDIM sampler and metrics), so an
evaluation at ``eval_samples`` = a sweep's ``samples_per_w`` reproduces its point. The
workers never wait for it.

Its metrics are merged into the checkpoint's reported metrics (``fid`` is the best FID
over the w values, per w ``fid_w1``, ``accuracy_w0``, …), so ``train.keep_best_by=fid``
keeps the best checkpoints through Ray Train's own retention. Each evaluation is also
stored as ``<run>/eval/step_XXXXXXXX.json``, and the run's curve is rebuilt from those
files after each one: ``<run>/eval.parquet`` (a row per step and w) and
``<run>/eval.png`` (FID and accuracy against the step, the real-data floor dashed).
"""

from __future__ import annotations

import io
import json
import math
import sys
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from cfgd.data.images import figure_png
from cfgd.io import storage, transfers
from cfgd.io.storage import StorageOptions

# The curve's columns and their Arrow types: eval.parquet's schema.
CURVE = (("step", "int64"), ("w", "float64"), ("fid", "float64"), ("accuracy", "float64"),
         ("precision", "float64"), ("recall", "float64"), ("inception_score", "float64"), ("n_samples", "int64"),
         ("seconds", "float64"), ("checkpoint", "string"))
CURVE_COLUMNS = tuple(name for name, _ in CURVE)
REAL_SPLIT = "test"
# Sampled rows per forward chunk: bounds the task's memory, not its result (rows are independent).
BATCH = 256


def _log(msg: str) -> None:
    sys.stdout.write(f"[cfgd.eval] {msg}\n")  # the tag keeps it on a quiet job's console (cfgd.console)
    sys.stdout.flush()


def metric_key(name: str, w: float) -> str:
    """Reported metric name of ``name`` at guidance strength w: fid_w1, accuracy_w0.5."""
    return f"{name}_w{w:g}"


def score_generator(gen, evaluator, real, ws: Sequence[float], n: int, steps: int, seed: int,
                    k: int = 3, solver: str = "ddim") -> dict[float, dict[str, float]]:
    """Metrics per w of ``n`` samples of ``gen`` (a cfgd.sampling.checkpoint_sampler.CheckpointSampler): what a sweep computes.

    Rows and seeds as a sweep draws them (class i mod C, seed + i, the same in every w),
    plain CFG with ``solver`` (ddim or dpm++2m) at ``steps`` (its default spacing), images scored as
    uint8 like the real data; FID against ``real.reference``, precision/recall against
    ``n`` reference rows (cfgd.evaluate.metrics.compute_metrics).
    """
    from cfgd.data.images import to_uint8
    from cfgd.diffusion.plan import Guidance, SamplingPlan, Solver
    from cfgd.evaluate.metrics import compute_metrics
    from cfgd.sweep.sweep_grid import sample_rows

    labels, seeds = sample_rows(n, gen.num_classes, seed)
    plan = SamplingPlan(solver=Solver(name=solver, steps=steps),
                        rows=tuple(Guidance(w=w) for w in ws for _ in range(n)))
    images = to_uint8(gen.sample(np.tile(labels, len(ws)), np.tile(seeds, len(ws)), plan, batch_size=BATCH))
    out = {}
    for i, w in enumerate(ws):
        emb = evaluator.embed(images[i * n:(i + 1) * n])
        out[w] = compute_metrics(emb, labels, real.reference, real.pr_reference(n), k)
    return out


_SCORERS: dict[tuple, tuple] = {}  # per process: Ray reuses its workers, so later evaluations skip the set-up


def _scorer(evaluator_uri: str, data_root: str, opts: StorageOptions | None, seed: int, n: int):
    """(Evaluator, RealSplit of the test split, its floor at n samples or None), once per process."""
    from cfgd.evaluate.evaluator import Evaluator, RealSplit

    key = (evaluator_uri, data_root, seed, n)
    if key not in _SCORERS:
        ev = Evaluator.load(evaluator_uri, opts)
        real = RealSplit.load(ev, data_root, REAL_SPLIT, opts, seed)
        floor = real.floor(n) if n <= len(real.held_out) else None  # the plot's dotted line
        _SCORERS[key] = (ev, real, floor)
    return _SCORERS[key]


@dataclass
class CheckpointEval:
    """The validation function Ray Train calls with each checkpoint to evaluate.

    Built once on the driver from the resolved config (:func:`from_config`); Ray ships
    it to the evaluation task. It holds the storage options because the task reads the
    evaluator and the test split and writes the curve; nothing here is printed or saved.
    """

    evaluator: str
    data_root: str
    run_uri: str
    w: tuple[float, ...]
    samples: int
    steps: int
    seed: int
    threads: int
    storage: StorageOptions | None = None
    solver: str = "ddim"

    def __call__(self, checkpoint, **_: Any) -> dict[str, float]:
        """checkpoint: a ray.train.Checkpoint. Returns the metrics merged into its report."""
        try:
            with checkpoint.as_directory() as local:
                return self.evaluate(local, checkpoint.path)
        except Exception as err:
            # Ray Train records the failure (the checkpoint keeps fid = inf) and goes on; say so here.
            _log(f"evaluation of {checkpoint.path} failed: {type(err).__name__}: {str(err).splitlines()[0][:300]}")
            raise

    def evaluate(self, local_dir: str, name: str) -> dict[str, float]:
        """Score the checkpoint in ``local_dir`` (``name``: its path in storage), store the
        record, rewrite the curve; returns the flat metrics (fid, fid_w1, accuracy_w0, …)."""
        import torch

        from cfgd.sampling.checkpoint_sampler import CheckpointSampler

        torch.set_num_threads(self.threads)  # Ray sets 1 thread per task; say it deliberately
        t0 = time.perf_counter()
        evaluator, real, floor = _scorer(self.evaluator, self.data_root, self.storage, self.seed, self.samples)
        gen = CheckpointSampler.load(local_dir)
        step = gen.checkpoint.step
        per_w = score_generator(gen, evaluator, real, self.w, self.samples, self.steps, self.seed,
                                solver=self.solver)
        seconds = time.perf_counter() - t0
        rows = [{"step": step, "w": w, **{c: m[c] for c in ("fid", "accuracy", "precision", "recall",
                                                             "inception_score")},
                 "n_samples": self.samples, "seconds": seconds, "checkpoint": name}
                for w, m in per_w.items()]
        record = {"step": step, "rows": rows, "floor": floor}
        self._store(step, record)
        best_w = min(per_w, key=lambda w: per_w[w]["fid"])
        _log(f"step {step}: " + " | ".join(f"w={w:g} FID {m['fid']:.1f} acc {m['accuracy']:.3f}"
                                           for w, m in per_w.items()) + f" ({seconds:.0f} s)")
        metrics = {"fid": per_w[best_w]["fid"], "fid_best_w": best_w, "eval_step": step, "eval_seconds": seconds}
        for w, m in per_w.items():
            for metric in ("fid", "accuracy", "precision", "recall"):
                metrics[metric_key(metric, w)] = m[metric]
        return metrics

    def _store(self, step: int, record: dict) -> None:
        """This evaluation's record, then the curve rebuilt from every record so far."""
        transfers.write_bytes_atomic(f"{self.run_uri}/eval/step_{step:08d}.json",
                                   json.dumps(record, indent=2).encode(), self.storage)
        write_curve(self.run_uri, self.storage)


def read_records(run_uri: str, opts: StorageOptions | None = None) -> list[dict]:
    """Every stored evaluation of a run, by step."""
    fs = storage.fsspec_fs(run_uri, opts)
    base = storage.arrow_path(run_uri).rstrip("/") + "/eval"
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.glob(base + "/step_*.json"))
    return [json.loads(transfers.read_bytes(f"{run_uri}/eval/{name}", opts)) for name in names]


def write_curve(run_uri: str, opts: StorageOptions | None = None) -> dict[str, str]:
    """(Re)write ``<run>/eval.parquet`` and ``<run>/eval.png`` from the run's records; their URIs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = read_records(run_uri, opts)
    rows = [{c: r.get(c) for c in CURVE_COLUMNS} for rec in records for r in rec["rows"]]
    floors = [rec["floor"] for rec in records if rec.get("floor")]
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=_curve_schema()), buf)
    paths = {"table": f"{run_uri}/eval.parquet", "plot": f"{run_uri}/eval.png"}
    transfers.write_bytes_atomic(paths["table"], buf.getvalue(), opts)
    transfers.write_bytes_atomic(paths["plot"], plot_curves({run_uri.rstrip("/").rsplit("/", 1)[-1]: rows},
                                                          floors[-1] if floors else None), opts)
    return paths


def _curve_schema():
    import pyarrow as pa

    return pa.schema([(name, getattr(pa, kind)()) for name, kind in CURVE])


def plot_curves(runs: dict[str, list[dict]], floor: dict | None = None, fid_w: float | None = None,
                acc_w: float | None = None) -> bytes:
    """PNG: FID and accuracy against the training step, a line per (run, w).

    One run, every w: the training curve of eval.png. Several runs at one ``fid_w`` /
    ``acc_w`` each: a convergence comparison.
    """
    from matplotlib.figure import Figure  # no pyplot: no GUI backend

    fig = Figure(figsize=(12, 4.4), layout="constrained")
    axes = dict(zip(("fid", "accuracy"), fig.subplots(1, 2)))
    for metric, only in (("fid", fid_w), ("accuracy", acc_w)):
        i = 0
        for name, rows in runs.items():
            for w in sorted({r["w"] for r in rows}):
                if only is not None and w != only:
                    continue
                rs = sorted((r for r in rows if r["w"] == w), key=lambda r: r["step"])
                label = name if only is not None else (f"{name} w={w:g}" if len(runs) > 1 else f"w={w:g}")
                axes[metric].plot([r["step"] for r in rs], [r[metric] for r in rs], "o-", color=f"C{i % 10}",
                                  label=label)
                i += 1
    if floor is not None:
        axes["fid"].axhline(floor["fid"], color="gray", ls=":", label="real vs real (floor)")
        axes["accuracy"].axhline(floor["accuracy"], color="gray", ls=":", label="real data accuracy")
    at = {m: f" at w = {w:g}" if w is not None else "" for m, w in (("fid", fid_w), ("accuracy", acc_w))}
    axes["fid"].set(xlabel="training step", ylabel="FID (evaluator features)", title="FID" + at["fid"],
                    yscale="log")
    axes["accuracy"].set(xlabel="training step", ylabel="conditional accuracy", title="accuracy" + at["accuracy"],
                         ylim=(0, 1))
    for ax in axes.values():
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return figure_png(fig)


def from_config(cfg, run_uri: str) -> CheckpointEval:
    """The evaluation of a training config (``train.eval_*``), resolved at the job's edge."""
    tc = cfg.train
    return CheckpointEval(evaluator=tc.evaluator, data_root=cfg.data.root, run_uri=run_uri, w=tuple(tc.eval_w),
                          samples=tc.eval_samples, steps=tc.eval_steps, seed=tc.seed,
                          threads=max(1, math.floor(tc.eval_cpus)), storage=cfg.storage, solver=tc.eval_solver)


def check_evaluator(cfg, shape: tuple[int, int, int], num_classes: int) -> None:
    """Fail on the driver, before training, when the evaluator cannot score this data."""
    from cfgd.config import ConfigError
    from cfgd.evaluate.evaluator import Evaluator

    ev = Evaluator.load(cfg.train.evaluator, cfg.storage)
    if ev.image_shape != shape or len(ev.class_names) != num_classes:
        raise ConfigError(f"train.evaluator {cfg.train.evaluator!r} was trained on {len(ev.class_names)} classes "
                          f"of {ev.image_shape} images, but the data has {num_classes} classes of {shape}")


def latest(reported) -> dict[str, Any] | None:
    """The metrics of the newest evaluated checkpoint among ``ray.train`` reported checkpoints."""
    done = [r.metrics for r in reported if "eval_step" in (r.metrics or {})]
    return max(done, key=lambda m: m["eval_step"]) if done else None


def progress_note(m: dict[str, Any] | None, ws: Sequence[float]) -> str:
    """What the progress line says of the newest evaluation: ' | eval @200: FID 19.7 (w=1), acc 0.51 (w=0)'."""
    if not m:
        return ""
    best = m["fid_best_w"]
    acc_w = 0.0 if 0.0 in ws else best
    acc = m.get(metric_key("accuracy", acc_w))
    return (f" | eval @{m['eval_step']}: FID {m['fid']:.1f} (w={best:g})"
            + (f", acc {acc:.3f} (w={acc_w:g})" if acc is not None else ""))
