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


def test_rayservice_gives_every_pod_the_api_token_from_a_secret():
    svc = yaml.safe_load((ROOT / "serve/rayservice.yaml").read_text())
    cluster = svc["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        for c in pod["spec"]["containers"]:
            assert {"secretRef": {"name": "cfgd-api"}} in c["envFrom"], c["name"]
    serve_config = yaml.safe_load(svc["spec"]["serveConfigV2"])
    assert "CFGD_API_TOKEN" not in svc["spec"]["serveConfigV2"]  # never in the printed config
    assert serve_config["http_options"]["request_timeout_s"] > 0
    sampler = next(d for d in serve_config["applications"][0]["deployments"] if d["name"] == "Sampler")
    assert sampler["max_queued_requests"] > 0 and sampler["graceful_shutdown_timeout_s"] >= 120
