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
    assert "torch" not in loaded and "cfgd.model" not in loaded


def test_the_network_knows_nothing_of_guidance():
    loaded = _loaded_after("cfgd.model")
    assert "cfgd.guidance" not in loaded and "cfgd.plan" not in loaded and "cfgd.sampling" not in loaded


def test_plan_and_spec_load_without_torch():
    for module in ("cfgd.plan", "cfgd.spec", "cfgd.checks"):
        assert "torch" not in _loaded_after(module), module
