"""Train a class-conditional diffusion model with condition dropout on Ray Train.

    python jobs/train.py --config jobs/configs/fashion_mnist.yaml train.steps=2000

Runs on an embedded local Ray unless train.ray_address is set. Rerunning with the
same train.run_name resumes from the newest checkpoint. Prints its progress; Ray's
output goes to the log file it names (--verbose: to the console).
"""

from cfgd.cli import fail, job
from cfgd.train.trainer import fit

if __name__ == "__main__":
    with job(__doc__, "train", sections=("data", "model", "diffusion", "train", "storage")) as cfg:
        try:
            fit(cfg)
        except ValueError as err:
            fail(err)
