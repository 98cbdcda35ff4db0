"""Sweep guidance strength (and optionally solver, steps, eta, guidance rule and its
parameters, guidance interval, checkpoints).

    python jobs/sweep.py --config jobs/configs/sweep.yaml \
        checkpoint=outputs/runs/fashion_mnist_demo evaluator=outputs/evaluators/fashion_mnist \
        'w=[0,0.5,1,2,4]' samples_per_w=500 steps=25 seed=0

Keys are top level (see cfgd.sweep.sweep_grid.SweepConfig); ``checkpoint``, ``solver``,
``steps``, ``eta``, ``interval``, ``rule`` and each rule parameter accept a list to add
a grid dimension, e.g. 'steps=[10,25]' 'interval=[null,[1,600]]' 'rule=[cfg,apg]'. A text
checkpoint takes prompt templates, "{class}" standing for sample i's class word (class i mod C):
'prompt=["a {class}","a dark {class}"]' 'negative_prompt=[null,"a light {class}"]'. An
image-conditioned checkpoint samples the real split's held-out rows (class and conditioning
image): 'image_scale=[1,2,4]' 'combine=[sequential,independent]'. Object storage under ``storage.``. Rerunning with the
same ``out`` skips the grid points already done. Writes table.parquet/.csv,
plot.png, grid.png and per-point results under ``out``.
"""

from cfgd.cli import fail, parse, refuse
from cfgd.config import ConfigError
from cfgd.sweep.runner import run_sweep
from cfgd.sweep.sweep_grid import SweepConfig, sweep_axes


if __name__ == "__main__":
    cfg = parse(__doc__, schema=SweepConfig, check=None)
    try:
        points = sweep_axes(cfg)  # every grid point's sampling plan, built once, here
    except ConfigError as err:
        refuse(err)
    try:
        result = run_sweep(cfg, points)
    except ValueError as err:
        fail(err)
    cols = ["solver", "steps", "rule", "params", "w", "rows_per_image", "fid", "fid_std", "inception_score",
            "accuracy", "precision", "recall", "n_samples", "seconds", "samples_per_s"]
    if cfg.prompt is not None:
        cols[3:3] = ["prompt", "negative_prompt"]
    if cfg.inception_weights:
        cols.insert(cols.index("fid_std") + 1, "fid_inception")
    print("\t".join(["kind"] + cols))
    for r in result.rows:
        print("\t".join([r["kind"]] + ["" if r.get(c) is None else f"{r[c]:.4g}" if isinstance(r[c], float)
                                        else str(r[c]) for c in cols]))
    for name, path in result.paths.items():
        print(f"{name}: {path}")
