"""Sample a grid of guided images from a checkpoint: rows = classes, columns = w.

    python jobs/sample.py --config jobs/configs/fashion_mnist.yaml \
        sample.checkpoint=outputs/runs/fashion_mnist_demo 'sample.w=[0,1,3]'

sample.checkpoint is a checkpoint directory or a run directory (its newest
valid checkpoint is used). sample.solver, sample.rule and the rule's parameters choose
how (README: "Guidance rules and solvers"). Writes grid.png and samples.npz.
"""

from cfgd.cli import fail, job, refuse
from cfgd.config import ConfigError, config_plan
from cfgd.generate import sample_grid

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
