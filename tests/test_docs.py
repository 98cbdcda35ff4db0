"""The documentation: the site builds with warnings as errors, the configuration reference
is the config classes' own, and README and docs state what the config says."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_the_site_builds_with_warnings_as_errors(tmp_path):
    mkdocs = Path(sys.executable).parent / "mkdocs"
    if not mkdocs.exists():
        pytest.skip("mkdocs is the docs extra: pip install -e '.[docs]' (scripts/setup.sh installs it)")
    r = subprocess.run([str(mkdocs), "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env={"NO_MKDOCS_2_WARNING": "1",
                                                                            "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "site" / "configuration" / "index.html").exists()
    shutil.rmtree(tmp_path / "site")


def test_the_configuration_reference_is_generated_from_the_config_classes():
    from cfgd.reference import config_reference

    page = (ROOT / "docs/configuration.md").read_text()
    assert page == config_reference(), "regenerate it: python -m cfgd.reference > docs/configuration.md"


def test_readme_and_docs_state_the_demo_as_its_config_does():
    demo = yaml.safe_load((ROOT / "jobs/configs/fashion_mnist.yaml").read_text())
    from cfgd.config import DiffusionConfig

    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    steps = demo["train"]["steps"]
    assert f"for {steps} steps of {demo['train']['batch_size']} images" in readme
    assert demo["diffusion"]["parameterization"] == DiffusionConfig().parameterization == "v"
    assert "The network predicts v by default" in readme
    assert "The network predicts v (the default" in (ROOT / "docs/training.md").read_text()
    assert "600 steps" not in readme  # the older 600-step runs are labelled as such in docs/results.md
