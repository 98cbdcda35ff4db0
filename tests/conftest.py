import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The package is installed in editable mode by scripts/setup.sh; this keeps a plain
# `pytest` from a checkout working too.
sys.path.insert(0, str(ROOT / "platform"))
sys.path.insert(0, str(ROOT / "tests"))  # test helpers: readme, s3server
os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray for the whole session (starting Ray costs ~10 s)."""
    from cfgd.rayenv import init_ray

    ray = init_ray(num_cpus=2, dashboard=True)  # with Ray Train's dashboard, as the training job has
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A real S3-compatible server (SeaweedFS `weed mini` on 127.0.0.1) with bucket cfgd-test."""
    from s3server import S3Server

    server = S3Server(tmp_path_factory.mktemp("s3server"))
    server.start()
    try:
        server.make_bucket("cfgd-test")
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory):
    """scikit-learn's 8x8 digits (1797 images, 10 classes) as train Parquet shards of 300 rows."""
    import numpy as np
    from sklearn.datasets import load_digits

    from cfgd.data.shards import write_shards

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    root = tmp_path_factory.mktemp("digits")
    names = [str(i) for i in range(10)]
    write_shards(str(root), "train", images, d.target, names, rows_per_shard=300)
    write_shards(str(root), "test", images[:100], d.target[:100], names)
    return root
