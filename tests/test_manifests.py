"""Deployment manifests parse and carry what their controllers require."""

from pathlib import Path

import yaml

from cfgd.cli import parse

ROOT = Path(__file__).resolve().parents[1]


def test_rayjob_manifest_has_the_fields_kuberay_requires():
    job = yaml.safe_load((ROOT / "jobs/rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["metadata"]["name"]
    spec = job["spec"]
    assert spec["entrypoint"].startswith("python jobs/train.py")
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    assert "rayStartParams" in head and head["template"]["spec"]["containers"][0]["image"]
    workers = cluster["workerGroupSpecs"]
    assert workers and all(w["groupName"] and "rayStartParams" in w for w in workers)
    gpu = workers[0]["template"]["spec"]["containers"][0]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"]
    env_names = {e["name"] for e in gpu["env"]}
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= env_names
    assert all("valueFrom" in e for e in gpu["env"] if "SECRET" in e["name"] or "KEY_ID" in e["name"])
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"]


def test_rayjob_entrypoint_overrides_are_valid_config():
    job = yaml.safe_load((ROOT / "jobs/rayjob.yaml").read_text())
    args = job["spec"]["entrypoint"].split()[2:]
    cfg = parse("check", args)
    assert cfg.train.use_gpu and cfg.train.num_workers == 4


def test_runtime_env_keeps_the_upload_small():
    env = yaml.safe_load((ROOT / "jobs/runtime_env.yaml").read_text())
    assert env["py_modules"] == ["platform/cfgd"]
    for excluded in (".git/", ".venv/", "outputs/"):
        assert excluded in env["excludes"]
