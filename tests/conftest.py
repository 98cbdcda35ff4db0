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
    from builders import write_digits

    return write_digits(tmp_path_factory.mktemp("digits"), test=slice(0, 100), rows_per_shard=300)


# Test tiers, per file (markers registered in pyproject.toml). The fast tier,
# `pytest -m "not slow"`, is the listed files without Ray, S3, Serve or long subprocess
# runs; a file not listed here is slow until someone times it.
TIERS = {
    "test_math": {"math"}, "test_guidance_rules": {"math"}, "test_convergence": {"math"},
    "test_images": {"math"}, "test_config": set(), "test_mnist_files": set(), "test_imports": set(), "test_layers": set(),
    "test_readme": set(), "test_model_checkpoint": set(), "test_serve_unit": set(), "test_captions": set(), "test_conditions": set(), "test_image_conditions": set(),
    "test_parameterization": {"math", "slow"},
    "test_artifact": {"s3", "slow"}, "test_data": {"ray", "slow"}, "test_evaluate": {"s3", "slow"},
    "test_fid_inception": {"ray", "slow"}, "test_resume": {"s3", "slow"}, "test_storage": {"s3", "slow"},
    "test_storage_faults": {"s3", "ray", "slow"}, "test_s3_pipeline": {"s3", "ray", "slow"},
    "test_sweep": {"ray", "slow"}, "test_train_ray": {"ray", "slow"}, "test_text_train": {"ray", "slow"}, "test_embed": {"ray", "slow"}, "test_image_train": {"ray", "slow"}, "test_train_eval": {"ray", "slow"},
    "test_failures": {"ray", "slow"}, "test_cluster": {"ray", "slow"}, "test_manifests": {"serve", "slow"},
    "test_serve": {"serve", "ray", "s3", "slow"}, "test_serve_cli": {"serve", "slow"},
    "test_output": {"ray", "slow"}, "test_docs": {"slow"},
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        for name in TIERS.get(item.path.stem, {"slow"}):
            item.add_marker(getattr(pytest.mark, name))
