"""Sweep guidance strength (and optionally steps, eta, guidance interval, checkpoints).

    python jobs/sweep.py --config jobs/configs/sweep.yaml \
        checkpoint=outputs/runs/fashion_mnist_demo evaluator=outputs/evaluators/fashion_mnist \
        'w=[0,0.5,1,2,4]' samples_per_w=500 steps=25 seed=0

Keys are top level (see cfgd.sweep.SweepConfig); ``checkpoint``, ``steps``, ``eta``
and ``interval`` accept a list to add a grid dimension, e.g. 'steps=[10,25]'
'interval=[null,[1,600]]'. Object storage under ``storage.``. Rerunning with the
same ``out`` skips the grid points already done. Writes table.parquet/.csv,
plot.png, grid.png and per-point results under ``out``.
"""

from cfgd.cli import fail, parse
from cfgd.sweep import SweepConfig, run_sweep, sweep_axes


if __name__ == "__main__":
    cfg = parse(__doc__, schema=SweepConfig, check=sweep_axes)
    try:
        result = run_sweep(cfg)
    except ValueError as err:
        fail(err)
    cols = ["w", "guidance_scale", "fid", "inception_score", "accuracy", "precision", "recall", "n_samples",
            "seconds", "samples_per_s"]
    print("\t".join(["kind"] + cols))
    for r in result.rows:
        print("\t".join([r["kind"]] + ["" if r.get(c) is None else f"{r[c]:.4g}" for c in cols]))
    for name, path in result.paths.items():
        print(f"{name}: {path}")
