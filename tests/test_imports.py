"""The seams between modules, checked from sys.modules in a fresh interpreter."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _loaded_after(module: str) -> set[str]:
    code = f"import sys; sys.path.insert(0, {str(ROOT / 'platform')!r}); import {module}; print(*sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_config_loads_without_torch():
    loaded = _loaded_after("cfgd.config")
    assert "torch" not in loaded and not any(m.startswith("cfgd.model") for m in loaded)


def test_the_network_knows_nothing_of_guidance():
    loaded = _loaded_after("cfgd.model.unet")
    assert not any(m.startswith(("cfgd.diffusion", "cfgd.sampling")) for m in loaded), loaded


def test_plan_and_spec_load_without_torch():
    for module in ("cfgd.diffusion.plan", "cfgd.spec", "cfgd.checks"):
        assert "torch" not in _loaded_after(module), module


def test_the_data_layer_loads_without_ray_or_torch():
    loaded = _loaded_after("cfgd.data.shards, cfgd.data.split_loader, cfgd.data.sources, cfgd.data.images")
    assert "torch" not in loaded and "ray" not in loaded


def test_storage_and_artifacts_load_without_the_model():
    loaded = _loaded_after("cfgd.io.checkpoint, cfgd.io.artifact, cfgd.io.transfers, cfgd.io.access")
    assert not any(m.startswith("cfgd.model") for m in loaded) and "ray" not in loaded
