"""Serving on a real local Ray: Serve, HTTP on 127.0.0.1, the S3 test server. No mocks.

One app (tiny 8x8 checkpoints, T = 100) is deployed once for the module; the
autoscaling test deploys a second app next to it.
"""

import base64
import concurrent.futures as cf
import json
import os
import socket
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import requests

import readme
from cfgd import serving
from cfgd.data.images import decode_png
from cfgd.data.sources import FASHION_MNIST_CLASSES
from cfgd.io import storage, transfers
from builders import tiny_image_checkpoint, tiny_text_checkpoint, tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # serve/ is a namespace package at the repo root

APP = "cfgd-test"
AUTOSCALE_APP = "cfgd-autoscale"
LABELS = FASHION_MNIST_CLASSES  # the class names the README's curl examples use
T = 100
BULK_PREFIX = "s3://cfgd-test/bulk/"


def _tiny_checkpoint(directory: Path, seed: int) -> str:
    return str(tiny_checkpoint(directory, seed, overrides=[f"diffusion.timesteps={T}"], label_names=LABELS))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-ckpts")
    return {"a": _tiny_checkpoint(root / "a", 1), "b": _tiny_checkpoint(root / "b", 2),
            "text": str(tiny_text_checkpoint(root / "text", 3)), "sr": str(tiny_image_checkpoint(root / "sr", 4))}


def _settings(checkpoints, s3, **over):
    return {"checkpoints": checkpoints, "default_checkpoint": "a", "max_models_per_replica": 2,
            "max_images": 16, "max_steps": 250, "default_steps": 5, "max_batch_size": 4,
            # Long enough that two requests sent together always meet in one batch.
            "batch_wait_timeout_s": 0.5, "output_prefix": BULK_PREFIX, "shard_size": 16,
            "shard_num_cpus": 0.25, "max_bulk_images": 1000, "storage": asdict(s3.storage_options()), **over}


@pytest.fixture(scope="module")
def server(ray_local, checkpoints, s3):
    from ray import serve

    from serve.app import build_app

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(_settings(checkpoints, s3)), name=APP, route_prefix="/")
        yield {"url": f"http://127.0.0.1:{port}", "settings": _settings(checkpoints, s3)}
    finally:
        serve.shutdown()
        for app in (APP, AUTOSCALE_APP):  # our detached state actors, nobody else's
            try:
                ray_local.kill(ray_local.get_actor(serving.state_actor_name(app), namespace=serving.STATE_NAMESPACE))
            except ValueError:
                pass


def _post(server, path, body, **kw):
    data = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return requests.post(server["url"] + path, data=data, headers={"Content-Type": "application/json"},
                         timeout=kw.pop("timeout", 60), **kw)


def _images(resp) -> list[bytes]:
    assert resp.status_code == 200, resp.text
    return [base64.b64decode(s) for s in resp.json()["images"]]


def test_generate_returns_pngs_and_same_seed_same_bytes(server):
    body = {"class_label": 3, "w": 2.0, "num_images": 3, "seed": 7, "steps": 5}
    r = _post(server, "/generate", body)
    imgs = _images(r)
    meta = r.json()
    assert len(imgs) == 3 and meta["seeds"] == [7, 8, 9] and meta["checkpoint"] == "a"
    assert meta["label"] == 3 and meta["class_name"] == "Dress" and meta["guidance_scale"] == 3.0
    assert all(decode_png(b).shape == (8, 8, 1) for b in imgs)
    assert _images(_post(server, "/generate", body)) == imgs
    # The same request spelled with class_name and guidance_scale is the same request.
    same = {"class_name": "Dress", "guidance_scale": 3.0, "num_images": 3, "seed": 7, "steps": 5}
    assert _images(_post(server, "/generate", same)) == imgs
    # Image i uses seed + i: the second image is the first image of seed 8.
    assert _images(_post(server, "/generate", {**body, "seed": 8, "num_images": 1}))[0] == imgs[1]
    other = _images(_post(server, "/generate", {**body, "class_label": 4}))
    assert other != imgs  # labels matter


def test_concurrent_requests_share_one_batch_and_match_solo_results(server):
    a = {"class_label": 1, "w": 0.5, "num_images": 2, "seed": 11, "steps": 5}
    b = {"class_label": 7, "w": 4.0, "num_images": 1, "seed": 99, "steps": 5, "interval": [20, 80]}
    _post(server, "/generate", a)  # warm: the batch below must not wait on anything else
    before = requests.get(server["url"] + "/stats", timeout=30).json()
    barrier = threading.Barrier(2)

    def send(body):
        barrier.wait()
        return _post(server, "/generate", body)

    with cf.ThreadPoolExecutor(2) as pool:
        ra, rb = pool.map(send, [a, b])
    together_a, together_b = _images(ra), _images(rb)
    after = requests.get(server["url"] + "/stats", timeout=30).json()
    assert after["replica"] == before["replica"]
    assert after["batches"] - before["batches"] == 1
    assert after["requests"] - before["requests"] == 2
    assert after["sample_calls"] - before["sample_calls"] == 1  # one CheckpointSampler.sample for both
    assert _images(_post(server, "/generate", a)) == together_a
    assert _images(_post(server, "/generate", b)) == together_b


def test_requests_with_different_rules_share_one_batch_and_match_solo_results(server):
    """CFG++, APG and autoguidance (guided by checkpoint b) in one batch: one sample call,
    the same bytes as each alone; a DPM-Solver++ request is another batch key."""
    bodies = [{"class_label": 2, "rule": "cfg++", "lam": 0.5, "seed": 5, "steps": 5},
              {"class_label": 6, "rule": "apg", "w": 2.0, "apg_beta": -0.5, "apg_r": 5.0, "seed": 6, "steps": 5},
              {"class_label": 8, "rule": "autoguidance", "guide": "b", "w": 1.5, "seed": 7, "steps": 5,
               "threshold": 0.99, "clip": False}]
    _post(server, "/generate", bodies[0])  # warm
    _post(server, "/generate", bodies[2])  # loads the guide
    before = requests.get(server["url"] + "/stats", timeout=30).json()
    barrier = threading.Barrier(len(bodies))

    def send(body):
        barrier.wait()
        return _post(server, "/generate", body)

    with cf.ThreadPoolExecutor(len(bodies)) as pool:
        together = [_images(r) for r in pool.map(send, bodies)]
    after = requests.get(server["url"] + "/stats", timeout=30).json()
    assert after["batches"] - before["batches"] == 1 and after["sample_calls"] - before["sample_calls"] == 1
    for body, imgs in zip(bodies, together):
        r = _post(server, "/generate", body)
        assert r.json()["rule"] == body["rule"] and _images(r) == imgs
    dpm = _post(server, "/generate", {"class_label": 2, "w": 2.0, "solver": "dpm++2m", "seed": 5, "steps": 5})
    assert dpm.json()["solver"] == "dpm++2m" and dpm.json()["spacing"] == "logsnr" and len(_images(dpm)) == 1


def test_grid_format_is_one_png(server):
    r = _post(server, "/generate", {"class_label": 2, "w": 1.0, "num_images": 4, "seed": 3, "format": "grid"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.headers["x-seeds"] == "3,4,5,6"
    grid = decode_png(r.content)
    assert grid.shape == (2 * 8 + 6, 2 * 8 + 6, 1)  # 2x2 cells, 6 px gaps


def test_readme_curl_examples_run_against_the_app(server, tmp_path):
    """The README's Serving `curl` lines, run as written against this app: only the port
    and the `<job_id>` placeholder are substituted, and `-w` reports the HTTP status."""
    curls = [c for c in readme.commands("Serving (Ray Serve)") if c.startswith("curl ")]
    assert len(curls) == 4, curls
    shell = readme.Shell(dict(os.environ), cwd=tmp_path)
    job_id = None
    for cmd in curls:
        line = cmd.replace("127.0.0.1:8000", server["url"].removeprefix("http://"))
        if job_id:
            line = line.replace("<job_id>", job_id)
        proc = shell.run(line + " -w '%{stderr}%{http_code}'", timeout=120)
        assert proc.returncode == 0, (line, proc.stderr)
        status = int(proc.stderr.strip()[-3:])
        if '"format": "grid"' in line:  # 4 Sneakers as one 2x2 PNG, written to grid.png
            assert status == 200 and decode_png((tmp_path / "grid.png").read_bytes()).shape == (22, 22, 1)
        elif "/generate" in line:
            meta = json.loads(proc.stdout)
            assert status == 200 and (meta["class_name"], meta["w"], meta["steps"]) == ("Sneaker", 3.0, 25)
            assert meta["seeds"] == [1, 2] and len(meta["images"]) == 2
        elif "/bulk/" in line:
            assert status == 200 and json.loads(proc.stdout)["job_id"] == job_id
        else:
            job = json.loads(proc.stdout)
            assert status == 202 and job["total_images"] == 2 * 256
            assert job["destination"] == BULK_PREFIX + "sneakers"  # relative to the output prefix
            job_id = job["job_id"]
    assert job_id is not None
    done = _wait_job(server, job_id)  # leave no work behind for the tests after this one
    assert done["state"] == "done" and done["done_images"] == 2 * 256, done

def test_bad_requests_get_4xx_naming_the_field_then_a_good_one_succeeds(server):
    good = {"class_label": 1, "w": 1.0, "seed": 1}
    cases = [
        ({"class_label": 10}, 422, "class_label"),
        ({"class_label": -1}, 422, "class_label"),
        ({"class_name": "cat"}, 422, "class_name"),
        ({"w": 1.0}, 422, "class_label"),  # no class at all
        ({**good, "class_name": "Trouser"}, 422, "class_label"),  # both: "give class_label or class_name"
        ({**good, "guidance_scale": 2.0}, 422, "w"),  # both: "give w or guidance_scale, not both"
        ('{"class_label": 1, "w": NaN}', 422, "w"),
        ('{"class_label": 1, "guidance_scale": Infinity}', 422, "guidance_scale"),
        ({**good, "w": 20.5}, 422, "w"),
        ({**good, "w": -1.5}, 422, "w"),
        ({"class_label": 1, "guidance_scale": 0.5}, 200, None),  # w = -0.5 is inside [-1, 20]
        ({"class_label": 1, "guidance_scale": -0.5}, 422, "guidance_scale"),
        ({**good, "num_images": 17}, 422, "num_images"),
        ({**good, "num_images": 0}, 422, "num_images"),
        ({**good, "steps": T + 1}, 422, "steps"),
        ({**good, "steps": 0}, 422, "steps"),
        ({**good, "eta": -0.1}, 422, "eta"),
        ({**good, "seed": -1}, 422, "seed"),
        ({**good, "seed": "7"}, 422, "seed"),
        ({**good, "class_label": 1.5}, 422, "class_label"),
        ({**good, "checkpoint": "../../etc"}, 404, "checkpoint"),
        ({**good, "interval": [50, 10]}, 422, "interval"),
        ({**good, "guidance_interval": [50, 10]}, 422, "interval"),  # the old name still reads
        ({**good, "interval": [1, T + 1]}, 422, "interval"),
        ({**good, "steps": True}, 422, "steps"),
        ({**good, "format": "gif"}, 422, "format"),
        ({**good, "spacing": "random"}, 422, "spacing"),
        ({**good, "prompt": "a cat"}, 422, "prompt"),
        ({**good, "eta": 1e300}, 422, "eta"),
        ({**good, "eta": 5}, 422, "eta"),
        ({**good, "solver": "euler"}, 422, "solver"),
        ({**good, "solver": "dpm++2m", "eta": 0.5}, 422, "eta"),
        ({"class_label": 1, "solver": "dpm++2m", "rule": "cfg++"}, 422, "rule"),  # CFG++ is DDIM's
        ({**good, "rule": "cfg++"}, 422, "w"),  # CFG++ is steered by lam: a w is refused, not ignored
        ({**good, "rule": "odd"}, 422, "rule"),
        ({"class_label": 1, "rule": "cfg++", "lam": 2.0}, 422, "lam"),
        ({**good, "rule": "apg", "apg_beta": 1.5}, 422, "apg_beta"),
        ({**good, "rule": "apg", "apg_r": 0}, 422, "apg_r"),
        ({**good, "rule": "apg", "apg_eta": -1}, 422, "apg_eta"),
        ({**good, "weight_schedule": "odd"}, 422, "weight_schedule"),
        ({**good, "rescale": 2.0}, 422, "rescale"),
        ({**good, "threshold": 0.1}, 422, "threshold"),
        ({**good, "clip": "yes"}, 422, "clip"),
        ({**good, "rule": "autoguidance"}, 422, "guide"),
        ({**good, "rule": "autoguidance", "guide": "zzz"}, 422, "guide"),
        ({**good, "guide": "b"}, 422, "guide"),  # a guide without autoguidance
        ('{"class_label": 1,', 422, "body"),  # malformed JSON
        ("[1, 2]", 422, "body"),
    ]
    bulk_cases = [
        ({"destination": "../escape", "steps": 1}, 422, "destination"),
        ({"destination": "s3://cfgd-test/other/x", "steps": 1}, 422, "destination"),
        ({"destination": "s3://cfgd-test/bulk", "steps": 1}, 422, "destination"),
        ({"destination": "/tmp/x", "steps": 1}, 422, "destination"),
        ({"destination": "ok", "classes": [11], "steps": 1}, 422, "classes"),
        ({"destination": "ok", "w": [0, 99], "steps": 1}, 422, "w"),
        ({"destination": "ok", "counts": [1, 2], "classes": [1], "steps": 1}, 422, "counts"),
        ({"destination": "ok", "counts": 2000, "steps": 1}, 422, "counts"),
        ({"destination": "ok", "checkpoint": "zzz"}, 404, "checkpoint"),
        ({"destination": "ok", "eta": 1e300, "steps": 1}, 422, "eta"),
        ({"destination": "ok", "solver": "dpm++2m", "rule": "cfg++", "steps": 1}, 422, "rule"),
        ({"destination": "ok", "guidance_scale": [1, -1], "steps": 1}, 422, "guidance_scale"),
    ]

    def check(path, body, status, field):
        r = _post(server, path, body)
        assert r.status_code == status, (body, r.status_code, r.text)
        if field is not None:
            assert field in r.json()["field"] and field in r.json()["detail"], (body, r.text)

    # All at once: a burst of bad requests must neither crash nor wedge the replicas.
    jobs = [("/generate", *c) for c in cases] + [("/bulk", *c) for c in bulk_cases]
    with cf.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda j: check(*j), jobs))
    missing = requests.get(server["url"] + "/bulk/0123456789abcdef", timeout=30)
    assert missing.status_code == 404 and "job_id" in missing.text
    assert len(_images(_post(server, "/generate", {**good, "num_images": 2}))) == 2


def test_second_checkpoint_is_loaded_on_demand_and_reported(server):
    body = {"class_label": 5, "w": 1.0, "seed": 21}
    from_a = _images(_post(server, "/generate", body))
    r = _post(server, "/generate", {**body, "checkpoint": "b"})
    assert r.json()["checkpoint"] == "b" and _images(r) != from_a
    ready = requests.get(server["url"] + "/ready", timeout=30).json()
    assert ready["ready"] and ready["default_checkpoint"] == "a"
    assert set(ready["loaded"]) == {"a", "b"}
    assert set(ready["replicas"][ready["replica"]]["loaded"]) == {"a", "b"}
    assert requests.get(server["url"] + "/openapi.json", timeout=30).json()["paths"].keys() >= {"/generate", "/bulk"}
    assert requests.get(server["url"] + "/docs", timeout=30).status_code == 200


def test_openapi_documents_the_plan_fields_as_the_plan_declares_them(server):
    """One declaration: /openapi.json's plan fields carry cfgd.diffusion.plan's own descriptions,
    bounds and defaults (the README's table is generated from the same place)."""
    from cfgd.diffusion.plan import FIELDS, field_default, field_info

    schemas = requests.get(server["url"] + "/openapi.json", timeout=30).json()["components"]["schemas"]
    props = schemas["GenerateRequest"]["properties"]
    for name in FIELDS:
        assert props[name]["description"].startswith(field_info(name).description), name
        if name != "steps":  # Serve's default is its default_steps setting (said in the text)
            assert props[name].get("default") == field_default(name), name
    assert props["eta"]["maximum"] == 1.0 and props["steps"]["anyOf"][0]["minimum"] == 1
    assert set(FIELDS) <= set(schemas["BulkRequest"]["properties"])


def test_unknown_settings_are_rejected():
    with pytest.raises(ValueError, match=r"unknown sampler setting\(s\) \['max_image'\]"):
        serving.ServeSettings.from_dict({"checkpoints": {"a": "/x"}, "default_checkpoint": "a", "max_image": 3})
    with pytest.raises(ValueError, match="default_checkpoint 'c'"):
        serving.ServeSettings.from_dict({"checkpoints": {"a": "/x"}, "default_checkpoint": "c"})
    with pytest.raises(ValueError, match=r"unknown storage setting\(s\) \['endpoint'\]"):
        serving.ServeSettings.from_dict({"checkpoints": {"a": "/x"}, "default_checkpoint": "a",
                                         "storage": {"endpoint": "http://x"}})


def test_a_bad_config_on_a_live_replica_is_refused_and_the_old_one_kept(checkpoints):
    core = serving.SamplerCore()
    good = {"checkpoints": dict(checkpoints), "default_checkpoint": "a"}
    with pytest.raises(ValueError, match="max_image"):  # first config: the replica must not start
        core.reconfigure({**good, "max_image": 3})
    assert core.reconfigure(good) is not None and core.config_error is None
    # Raising on a live replica would make Serve stall its requests, then answer 503.
    assert core.reconfigure({**good, "max_image": 3}) is None
    assert "max_image" in core.config_error and core.describe()["config_error"] == core.config_error
    assert core.reconfigure({**good, "checkpoints": {"a": "/no/such/checkpoint"}}) is None
    assert core.settings.checkpoints == checkpoints
    assert core.reconfigure({**good, "default_checkpoint": "b"}).default_checkpoint == "b"
    assert core.config_error is None and set(core.loaded()) == {"a", "b"}


def test_destination_symlink_out_of_the_prefix_is_refused(tmp_path):
    prefix = tmp_path / "out"
    prefix.mkdir()
    (prefix / "link").symlink_to(tmp_path)
    assert serving.resolve_destination("run1/part", str(prefix)) == str(prefix / "run1" / "part")
    assert serving.resolve_destination(str(prefix / "run2"), str(prefix)) == str(prefix / "run2")
    for bad in ("link/x", "../out2", str(tmp_path / "elsewhere"), "s3://bucket/x", "a b", ""):
        with pytest.raises(serving.RequestError, match="destination"):
            serving.resolve_destination(bad, str(prefix))


@pytest.mark.parametrize("path", ["serve/config.yaml", "serve/rayservice.yaml"])
def test_serve_configs_are_valid(path):
    import yaml
    from ray.serve.schema import ServeDeploySchema

    doc = yaml.safe_load((ROOT / path).read_text())
    if doc.get("kind") == "RayService":
        doc = yaml.safe_load(doc["spec"]["serveConfigV2"])
    config = ServeDeploySchema.model_validate(doc)
    (app,) = config.applications
    assert app.import_path == "serve.app:app"
    if path == "serve/config.yaml":
        # Any checkout: Ray imports serve.app from the directory `serve run` / `ray start` ran in.
        assert "working_dir" not in app.runtime_env
    else:
        assert app.runtime_env["working_dir"] == "local:///app"  # the image's copy of the repository
    sampler = next(d for d in app.deployments if d.name == "Sampler")
    settings = serving.ServeSettings.from_dict(sampler.user_config)
    assert sampler.max_ongoing_requests >= settings.max_batch_size  # else batches never fill
    scaling = sampler.autoscaling_config
    assert 1 <= scaling["min_replicas"] <= scaling["max_replicas"] and scaling["upscale_delay_s"] > 0
    if path == "serve/config.yaml":
        assert config.http_options.host == "127.0.0.1"
        assert 0 < sampler.ray_actor_options.num_cpus < 1  # fits a 2-core machine


def _shard_files(fs, dest):
    return sorted(p for p in fs.ls(storage.arrow_path(dest), detail=False) if p.endswith(".parquet"))


def _wait_job(server, job_id, timeout=150):
    deadline = time.time() + timeout
    while time.time() < deadline:
        st = requests.get(f"{server['url']}/bulk/{job_id}", timeout=30).json()
        if st["state"] != "running":
            return st
        time.sleep(1)
    raise AssertionError(f"bulk job {job_id} still running after {timeout}s: {st}")


def test_bulk_job_writes_parquet_to_s3_and_a_repost_skips_done_shards(server, s3):
    opts = s3.storage_options()
    body = {"destination": "job1", "classes": [0, 3, 5], "counts": 6, "w": [0.0, 2.0], "seed": 1000,
            "steps": 3, "png_files": True}
    t0 = time.time()
    r = _post(server, "/bulk", body)
    assert r.status_code == 202, r.text
    first = r.json()
    assert time.time() - t0 < 20  # answered at once, the work runs as Ray tasks
    dest = "s3://cfgd-test/bulk/job1"
    assert first["destination"] == dest and first["total_shards"] == 3 and first["total_images"] == 36
    st = _wait_job(server, first["job_id"])
    assert st["state"] == "done", st
    assert st["done_shards"] == st["total_shards"] == 3 and st["done_images"] == 36 and not st["errors"]

    fs = storage.fsspec_fs(dest, opts)
    files = _shard_files(fs, dest)
    assert [f.rsplit("/", 1)[-1] for f in files] == ["shard-00000.parquet", "shard-00001.parquet",
                                                     "shard-00002.parquet"]
    table = pq.read_table(storage.arrow_path(dest), filesystem=storage.arrow_fs(dest, opts))
    assert table.num_rows == 36
    rows = table.to_pylist()
    assert sorted(r["seed"] for r in rows) == list(range(1000, 1036))
    assert {(r["label"], r["w"]) for r in rows} == {(c, w) for c in (0, 3, 5) for w in (0.0, 2.0)}
    assert all(r["guidance_scale"] == r["w"] + 1 and r["checkpoint"] == "a" for r in rows)
    assert decode_png(rows[0]["image"]).shape == (8, 8, 1)
    pngs = fs.ls(storage.arrow_path(dest) + "/_png", detail=False)
    assert len(pngs) == 36
    manifest = json.loads(transfers.read_bytes(dest + "/_job.json", opts))
    assert manifest["total_shards"] == 3 and manifest["job_id"] == first["job_id"]

    # Bulk rows are the /generate images of the same (class, w, seed).
    row = next(r for r in rows if r["label"] == 3 and r["w"] == 2.0)
    solo = _images(_post(server, "/generate", {"class_label": 3, "w": 2.0, "seed": row["seed"], "steps": 3}))
    assert solo[0] == row["image"]

    # Re-POSTing the same job resumes it: every shard already exists, nothing is redone.
    etags = {f: fs.info(f)["ETag"] for f in files}
    again = _post(server, "/bulk", body).json()
    assert again["job_id"] == first["job_id"] and again["skipped_shards"] == 3
    assert _wait_job(server, again["job_id"])["state"] == "done"
    assert {f: fs.info(f)["ETag"] for f in _shard_files(fs, dest)} == etags
    assert pq.read_table(storage.arrow_path(dest), filesystem=storage.arrow_fs(dest, opts)).num_rows == 36

    # A lost shard is redone alone.
    fs.rm_file(files[1])
    third = _post(server, "/bulk", body).json()
    assert third["skipped_shards"] == 2
    assert _wait_job(server, third["job_id"])["done_shards"] == 3
    assert {f: fs.info(f)["ETag"] for f in _shard_files(fs, dest) if f != files[1]} == \
        {f: e for f, e in etags.items() if f != files[1]}

    # A different job cannot reuse the destination.
    conflict = _post(server, "/bulk", {**body, "seed": 1})
    assert conflict.status_code == 409 and conflict.json()["field"] == "destination"


def _alive(pid) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_no_shard_tasks(timeout=60):
    """Poll until no bulk shard task runs in a live worker process. (Ray's task table alone
    is not enough: tasks whose owner died — the state actor killed above — stay RUNNING
    there after their worker is gone; a cancelled or never-started task cannot write.)"""
    from ray.util.state import list_tasks

    deadline = time.time() + timeout
    while time.time() < deadline:
        live = [t for t in list_tasks(filters=[("name", "=", "run_shard")], limit=10_000)
                if t["state"] == "RUNNING" and _alive(t["worker_pid"])]
        if not live:
            return
        time.sleep(0.5)
    raise AssertionError(f"bulk shard tasks still live {timeout}s after the cancel: {live}")


def test_bulk_jobs_refuse_overlaps_recover_after_the_state_actor_dies_and_cancel(server, s3, ray_local):
    opts = s3.storage_options()
    dest = "s3://cfgd-test/bulk/job2"
    fs = storage.fsspec_fs(dest, opts)
    fs.pipe_file(storage.arrow_path(dest) + "/shard-00000.parquet/not-a-shard", b"x")  # a directory, not a shard
    body = {"destination": "job2", "classes": [1, 2], "counts": 16, "w": [0.0, 1.0], "seed": 5000, "steps": 20}
    first = _post(server, "/bulk", body).json()
    assert first["state"] == "running" and first["skipped_shards"] == 0 and first["total_shards"] == 4
    inner = _post(server, "/bulk", {**body, "destination": "job2/inner"})
    assert inner.status_code == 409 and "overlaps" in inner.json()["detail"]

    actor = ray_local.get_actor(serving.state_actor_name(APP), namespace=serving.STATE_NAMESPACE)
    ray_local.kill(actor, no_restart=False)  # the job table is lost; storage is not
    deadline, st = time.time() + 60, None
    while time.time() < deadline:
        r = requests.get(f"{server['url']}/bulk/{first['job_id']}", timeout=30)
        if r.status_code == 200:
            st = r.json()
            break
        assert r.status_code == 503 and r.headers["retry-after"], r.text  # restarting: retry, not 500
        time.sleep(1)
    assert st is not None and st["state"] in ("interrupted", "done") and st["job_id"] == first["job_id"]
    again = _post(server, "/bulk", body).json()  # re-POST: finish what is missing
    assert _wait_job(server, again["job_id"])["state"] == "done"
    files = sorted({f for f in _shard_files(fs, dest) if fs.info(f)["type"] == "file"})
    seeds = sorted(s for f in files for s in pq.read_table(f, filesystem=fs).column("seed").to_pylist())
    assert seeds == list(range(5000, 5064))  # no row missing, none twice

    third = _post(server, "/bulk", {**body, "destination": "job3", "counts": 64}).json()
    cancelled = requests.delete(f"{server['url']}/bulk/{third['job_id']}", timeout=30)
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    _wait_no_shard_tasks()  # the cancelled shard tasks have stopped: nothing more can be written
    st = requests.get(f"{server['url']}/bulk/{third['job_id']}", timeout=30).json()
    assert st["state"] == "cancelled" and st["done_shards"] < st["total_shards"]
    dest3 = "s3://cfgd-test/bulk/job3"
    written = [f for f in _shard_files(fs, dest3) if fs.info(f)["type"] == "file"] if fs.exists(
        storage.arrow_path(dest3)) else []
    assert len(written) == st["done_shards"]  # no shard landed after the cancel
    assert requests.delete(f"{server['url']}/bulk/0123456789abcdef", timeout=30).status_code == 404
    # Identical POSTs at once: one job, started once.
    twin = {**body, "destination": "job4", "counts": 4, "steps": 5}
    with cf.ThreadPoolExecutor(2) as pool:
        a, b = pool.map(lambda _: _post(server, "/bulk", twin), range(2))
    assert a.status_code == b.status_code == 202 and a.json()["job_id"] == b.json()["job_id"]
    assert _wait_job(server, a.json()["job_id"])["done_images"] == 16


def test_a_killed_sampler_replica_costs_503s_not_500s(server, ray_local):
    """SIGKILL the Sampler replica under 4 looping clients: in-flight requests get 503 with
    Retry-After (or are served by the restarted replica), none a 500, none hangs."""
    import os
    import signal

    from ray.util.state import list_actors

    body = {"class_label": 2, "w": 1.0, "seed": 5, "steps": 5}
    results, stop, lock = [], threading.Event(), threading.Lock()
    in_flight = {}  # thread -> start time of its request now in flight

    def load():
        me = threading.get_ident()
        while not stop.is_set():
            t = time.time()
            with lock:
                in_flight[me] = t
            try:
                r = _post(server, "/generate", body, timeout=120)
                out = (t, time.time(), r.status_code, r.headers.get("retry-after"))
            except requests.RequestException as exc:  # a hang past the timeout is a failure
                out = (t, time.time(), repr(exc), None)
            with lock:
                in_flight.pop(me, None)
                results.append(out)

    (replica,) = [a for a in list_actors(filters=[("state", "=", "ALIVE")])
                  if a["class_name"] == f"ServeReplica:{APP}:Sampler"]
    threads = [threading.Thread(target=load) for _ in range(4)]
    for th in threads:
        th.start()
    deadline = time.time() + 60  # the replica serves, and requests are in flight, before the kill
    while time.time() < deadline:
        with lock:
            served = any(code == 200 for *_, code, _ in results)
            oldest = min(in_flight.values(), default=None)
        if served and oldest is not None and time.time() - oldest > 0.05:
            break
        time.sleep(0.02)
    killed_at = time.time()
    os.kill(replica["pid"], signal.SIGKILL)
    deadline = killed_at + 90
    while time.time() < deadline and not any(t0 > killed_at and code == 200 for t0, _, code, _ in results):
        time.sleep(0.5)
    stop.set()
    for th in threads:
        th.join(timeout=150)
    after = [(t0, t1, code, ra) for t0, t1, code, ra in results if t1 > killed_at]
    assert any(t0 < killed_at for t0, *_ in after), "no request was in flight when the replica was killed"
    codes = [code for _, _, code, _ in after]
    assert all(code in (200, 503) for code in codes), codes
    assert all(ra for _, _, code, ra in after if code == 503)
    back = min((t1 for t0, t1, code, _ in after if code == 200 and t0 > killed_at), default=None)
    assert back is not None, codes
    print(f"SIGKILL of the Sampler replica: {len(after)} requests answered after it, "
          f"{codes.count(503)} x 503 (Retry-After), {codes.count(200)} x 200; serving again "
          f"{back - killed_at:.1f} s after the kill; longest request {max(t1 - t0 for t0, t1, _, _ in after):.1f} s")
    assert back - killed_at < 90


def test_redeploy_with_a_new_default_checkpoint_drops_no_requests(server, checkpoints, s3):
    from ray import serve

    from serve.app import build_app

    body = {"class_label": 2, "w": 1.0, "seed": 5, "steps": 20}
    results, stop = [], threading.Event()

    def load():
        while not stop.is_set():
            try:
                r = _post(server, "/generate", body)
                results.append((r.status_code, r.json().get("checkpoint") if r.status_code == 200 else r.text))
            except Exception as exc:  # noqa: BLE001 - a dropped connection is a failure too
                results.append((None, repr(exc)))

    threads = [threading.Thread(target=load) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        serve.run(build_app(_settings(checkpoints, s3, default_checkpoint="b")), name=APP, route_prefix="/")
        deadline = time.time() + 60
        while time.time() < deadline and (not results or results[-1][1] != "b"):
            time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert results and all(code == 200 for code, _ in results), results
    assert results[0][1] == "a" and results[-1][1] == "b"
    assert _post(server, "/generate", body).json()["checkpoint"] == "b"


def _running_replicas(app: str) -> int:
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None or "Sampler" not in status.deployments:
        return 0
    return int(status.deployments["Sampler"].replica_states.get("RUNNING", 0))


def test_autoscaling_adds_a_replica_under_load_and_removes_it_after(server, checkpoints, s3):
    from ray import serve

    from serve.app import Ingress, Sampler

    settings = _settings(checkpoints, s3, batch_wait_timeout_s=0.01, max_batch_size=2)
    sampler = Sampler.options(
        user_config=settings, ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=4,
        autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
                            "upscale_delay_s": 1, "downscale_delay_s": 3,
                            "metrics_interval_s": 0.5, "look_back_period_s": 2})
    serve.run(Ingress.bind(sampler.bind()), name=AUTOSCALE_APP, route_prefix="/as")
    assert _running_replicas(AUTOSCALE_APP) == 1
    stop = threading.Event()
    codes = []

    def load():
        while not stop.is_set():
            codes.append(_post(server, "/as/generate", {"class_label": 1, "num_images": 4, "steps": 20}).status_code)

    threads = [threading.Thread(target=load) for _ in range(6)]
    for t in threads:
        t.start()
    try:
        deadline = time.time() + 60
        while time.time() < deadline and _running_replicas(AUTOSCALE_APP) < 2:
            time.sleep(0.5)
        peak = _running_replicas(AUTOSCALE_APP)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert peak == 2
    assert codes and set(codes) == {200}
    deadline = time.time() + 60
    while time.time() < deadline and _running_replicas(AUTOSCALE_APP) > 1:
        time.sleep(0.5)
    assert _running_replicas(AUTOSCALE_APP) == 1
    serve.delete(AUTOSCALE_APP)


def test_limits_hold_for_huge_bodies_numbers_lists_and_wrong_content_types(server):
    url = server["url"] + "/generate"
    json_type = {"Content-Type": "application/json"}
    big = b'{"class_label": 1, "pad": "' + b"x" * (10 << 20) + b'"}'
    assert requests.post(url, data=big, headers=json_type, timeout=60).status_code == 413

    def streamed():  # no Content-Length: the limit must hold for a chunked body too
        for i in range(0, len(big), 1 << 20):
            yield big[i:i + (1 << 20)]

    r = requests.post(url, data=streamed(), headers=json_type, timeout=60)
    assert r.status_code == 413 and r.json()["field"] == "body"
    good = {"class_label": 1, "w": 1.0, "seed": 1, "steps": 2}
    numeric = ["class_label", "num_images", "seed", "steps", "eta", "lam", "apg_beta", "apg_r", "apg_eta",
               "rescale", "threshold", "w", "guidance_scale"]
    for name in numeric:
        for value in ("1e308", "-1e308", "NaN", str(2**70)):
            body = json.dumps({**good, name: 0}).replace('"%s": 0' % name, f'"{name}": {value}')
            r = requests.post(url, data=body, headers=json_type, timeout=60)
            assert 400 <= r.status_code < 500, (name, value, r.status_code, r.text)
    r = _post(server, "/bulk", {"destination": "ok", "classes": list(range(5000))})
    assert r.status_code == 422 and "classes" in r.json()["field"]
    r = _post(server, "/bulk", {"destination": "ok", "w": [1.0] * 500})
    assert r.status_code == 422 and r.json()["field"] == "w"
    r = _post(server, "/bulk", {"destination": "x" * 5000})
    assert r.status_code == 422 and r.json()["field"] == "destination"
    for ctype, data in (("text/plain", json.dumps(good)), ("application/x-www-form-urlencoded", "class_label=1"),
                        ("application/json", b"\xff\xfe")):
        r = requests.post(url, data=data, headers={"Content-Type": ctype}, timeout=60)
        assert 400 <= r.status_code < 500, (ctype, r.status_code)
    # A refused value (eta) next to a good request: the good one gets its images.
    with cf.ThreadPoolExecutor(2) as pool:
        bad, ok = pool.map(lambda b: _post(server, "/generate", b), [{**good, "eta": 1e300}, good])
    assert bad.status_code == 422 and bad.json()["field"] == "eta" and len(_images(ok)) == 1
    # Nothing leaks where a caller reads: checkpoint URIs stay on the server.
    for route in ("/ready", "/stats"):
        text = requests.get(server["url"] + route, timeout=30).text
        assert not any(uri in text for uri in server["settings"]["checkpoints"].values()), route
    assert requests.get(server["url"] + "/healthz", timeout=30).json() == {"ok": True}


def test_api_token_guards_every_route_but_health(server, ray_local, checkpoints, s3, tmp_path):
    """An app whose token file holds two tokens (a rotation in progress)."""
    import secrets

    from ray import serve

    from serve.app import Ingress, Sampler

    new, old = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    secret = tmp_path / "api-token"  # a mounted Secret; only its path goes through Ray
    secret.write_text(f"{new}\n{old}\n")
    secret.chmod(0o600)
    env = {"runtime_env": {"env_vars": {"CFGD_API_TOKEN_FILE": str(secret)}}}
    app = Ingress.options(ray_actor_options={"num_cpus": 0.1, **env}).bind(
        Sampler.options(user_config=_settings(checkpoints, s3, max_batch_size=1)).bind())
    serve.run(app, name="cfgd-auth", route_prefix="/secure")
    base = server["url"] + "/secure"
    body = json.dumps({"class_label": 1, "w": 1.0, "seed": 1, "steps": 2})
    routes = [("post", "/generate", body), ("post", "/bulk", json.dumps({"destination": "auth1", "steps": 1})),
              ("get", "/bulk/0123456789abcdef", None), ("get", "/stats", None), ("get", "/ready", None)]
    try:
        seen = []
        for method, route, data in routes:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {new}"},
                            {"Authorization": new}):
                r = requests.request(method, base + route, data=data, timeout=60,
                                     headers={"Content-Type": "application/json", **headers})
                assert r.status_code == 401 and r.json()["field"] == "authorization", (route, headers, r.text)
                assert r.headers["www-authenticate"] == "Bearer"
                seen.append(r.text + str(r.headers))
            for token in (new, old):
                r = requests.request(method, base + route, data=data, timeout=60,
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
                assert r.status_code != 401 and r.status_code < 500, (route, r.status_code, r.text)
                seen.append(r.text + str(r.headers))
        assert requests.get(base + "/healthz", timeout=30).status_code == 200
        assert requests.get(base + "/openapi.json", timeout=30).status_code == 200
        # The secret is in no response and in no log line of this Ray session.
        assert not any(new in s or old in s for s in seen)
        logs = Path(ray_local._private.worker._global_node.get_logs_dir_path())
        for f in logs.rglob("*"):
            if f.is_file():
                text = f.read_bytes()
                assert new.encode() not in text and old.encode() not in text, f
    finally:
        serve.delete("cfgd-auth")


def test_prompts_over_http_sample_and_bad_conditions_are_422_naming_the_field(server):
    body = {"checkpoint": "text", "prompt": "a dark 3", "w": 2.0, "num_images": 2, "seed": 4, "steps": 4}
    r = _post(server, "/generate", body)
    plain = _images(r)
    assert r.json()["prompt"] == "a dark 3" and r.json()["unknown_words"] == 0 and "label" not in r.json()
    assert _images(_post(server, "/generate", body)) == plain  # same request, same bytes
    neg = _post(server, "/generate", {**body, "negative_prompt": "light"})
    assert _images(neg) != plain and neg.json()["negative_prompt"] == "light"
    assert _post(server, "/generate", {**body, "prompt": "a purple 3"}).json()["unknown_words"] == 1
    grid = _post(server, "/generate", {**body, "format": "grid"})
    assert grid.status_code == 200 and "X-Label" not in grid.headers
    bad = [({**body, "prompt": "x " * 20}, "prompt", "at most 8"),
           ({**body, "negative_prompt": "y " * 20}, "negative_prompt", "at most 8"),
           ({**body, "prompt": "z" * 301}, "prompt", "the limit is 300"),
           ({**body, "prompt": 7}, "prompt", "string"),
           ({k: v for k, v in body.items() if k != "prompt"}, "prompt", "give prompt"),
           ({**body, "class_label": 3}, "class_label", "conditioned on text"),
           ({**body, "embedding": [0.5, 1.0]}, "embedding", "conditioned on text"),
           ({"class_label": 3, "prompt": "a 3", "steps": 2}, "prompt", "conditioned on label"),
           ({"class_label": 3, "embedding": "AAAA", "steps": 2}, "embedding", "conditioned on label")]
    for req, field, words in bad:
        r = _post(server, "/generate", req)
        assert r.status_code == 422 and r.json()["field"] == field and words in r.json()["detail"], (req, r.text)


def test_bulk_jobs_take_prompts_for_a_text_checkpoint(server, s3):
    opts = s3.storage_options()
    body = {"checkpoint": "text", "destination": "text1", "prompts": ["a dark 3", "a 5"], "negative_prompt": "light",
            "counts": [2, 1], "w": [0.0, 2.0], "seed": 50, "steps": 3}
    r = _post(server, "/bulk", body)
    assert r.status_code == 202, r.text
    assert _wait_job(server, r.json()["job_id"])["state"] == "done"
    dest = "s3://cfgd-test/bulk/text1"
    rows = pq.read_table(storage.arrow_path(dest), filesystem=storage.arrow_fs(dest, opts)).to_pylist()
    assert sorted((x["prompt"], x["w"]) for x in rows) == sorted(
        [("a dark 3", 0.0)] * 2 + [("a dark 3", 2.0)] * 2 + [("a 5", 0.0), ("a 5", 2.0)])
    assert {x["negative_prompt"] for x in rows} == {"light"} and "label" not in rows[0]
    # A bulk row is the /generate image of the same prompt, negative prompt, w and seed.
    row = next(x for x in rows if x["prompt"] == "a 5" and x["w"] == 2.0)
    solo = _post(server, "/generate", {"checkpoint": "text", "prompt": "a 5", "negative_prompt": "light", "w": 2.0,
                                       "seed": row["seed"], "steps": 3})
    assert _images(solo)[0] == row["image"]
    bad = [({**body, "prompts": ["a 3", "x " * 20]}, "prompts[1]", "at most 8"),
           ({**body, "prompts": None}, "prompts", "give prompts"),
           ({**body, "classes": [1]}, "classes", "conditioned on text"),
           ({**body, "counts": [1, 2, 3]}, "counts", "3 values for 2 prompts"),
           ({"destination": "text2", "prompts": ["a 3"], "steps": 2}, "prompts", "conditioned on label"),
           ({"destination": "text2", "negative_prompt": "dark", "steps": 2}, "negative_prompt", "conditioned on label")]
    for req, field, words in bad:
        r = _post(server, "/bulk", req)
        assert r.status_code == 422 and r.json()["field"] == field and words in r.json()["detail"], (req, r.text)


def test_conditioning_images_over_http_sample_and_a_bad_image_corpus_is_422_naming_the_field(server, s3):
    """/generate and /bulk with conditioning images; the bad-image corpus; /bulk pairs images with cells."""
    import numpy as np

    from cfgd.data.images import PNG_MODES, encode_png

    def b64(arr):
        return base64.b64encode(encode_png(arr, PNG_MODES)).decode()

    img = np.random.default_rng(1).integers(0, 256, (2, 2, 1), dtype=np.uint8)
    body = {"checkpoint": "sr", "class_label": 3, "image": b64(img), "w": 1.0, "image_scale": 2.0, "seed": 2,
            "steps": 3, "num_images": 2}
    r = _post(server, "/generate", body)
    got = _images(r)
    assert r.json()["image_bytes"] > 0 and _images(_post(server, "/generate", body)) == got
    assert _images(_post(server, "/generate", {**body, "image_scale": 1.0})) != got
    assert _images(_post(server, "/generate", {k: v for k, v in body.items() if k != "image"})) != got  # ∅ image
    png = base64.b64decode(body["image"])
    bad = [({**body, "image": "not base64!"}, "image", "not base64"),
           ({**body, "image": base64.b64encode(png[:len(png) // 2]).decode()}, "image", "does not decode"),
           ({**body, "image": base64.b64encode(b"GIF89a" + bytes(20)).decode()}, "image", "does not decode"),
           ({**body, "image": b64(np.zeros((2, 2, 3), np.uint8))}, "image", "(2, 2, 3)"),
           ({**body, "image": b64(np.zeros((1, 1, 1), np.uint8))}, "image", "(1, 1, 1)"),
           ({**body, "image": b64(np.zeros((64, 64, 1), np.uint8))}, "image", "(64, 64, 1)"),
           ({**body, "image": base64.b64encode(bytes(40_000)).decode()}, "image", "the limit is 32768"),
           ({**body, "image": 5}, "image", "string"),
           ({**body, "rule": "apg"}, "image_scale", "cfg rule"),
           ({"class_label": 3, "image": body["image"], "steps": 2}, "image", "no image condition"),
           ({"class_label": 3, "image_scale": 2.0, "steps": 2}, "image_scale", "no image condition"),
           ({"class_label": 3, "combine": "independent", "steps": 2}, "combine", "no image condition")]
    for req, field, words in bad:
        r = _post(server, "/generate", req)
        assert r.status_code == 422 and r.json()["field"] == field and words in r.json()["detail"], (req, r.text)
    huge = _post(server, "/generate", {**body, "image": "A" * 100_000_000}, timeout=120)
    assert huge.status_code == 413

    # /bulk: cells pair classes with conditioning images (one class may have several).
    other = b64(np.random.default_rng(2).integers(0, 256, (2, 2, 1), dtype=np.uint8))
    job = {"checkpoint": "sr", "destination": "images1", "classes": [3, 3], "images": [body["image"], other],
           "counts": 1, "w": [1.0], "image_scale": 2.0, "seed": 2, "steps": 3}
    r = _post(server, "/bulk", job)
    assert r.status_code == 202, r.text
    assert _wait_job(server, r.json()["job_id"])["state"] == "done"
    dest = "s3://cfgd-test/bulk/images1"
    opts = s3.storage_options()
    rows = sorted(pq.read_table(storage.arrow_path(dest), filesystem=storage.arrow_fs(dest, opts)).to_pylist(),
                  key=lambda x: x["index"])
    assert [x["cond_image"] for x in rows] == [base64.b64decode(body["image"]), base64.b64decode(other)]
    assert rows[0]["image"] == got[0] and rows[0]["label"] == 3  # /generate's first image: same class, image, seed
    bulk_bad = [({**job, "images": [body["image"]]}, "images", "1 values for 2 classes"),
                ({**job, "classes": None}, "classes", "paired with classes"),
                ({**job, "images": [body["image"], "not base64!"]}, "images[1]", "not base64"),
                ({**job, "checkpoint": "a", "image_scale": 1.0}, "images", "no image condition")]
    for req, field, words in bulk_bad:
        r = _post(server, "/bulk", req)
        assert r.status_code == 422 and r.json()["field"] == field and words in r.json()["detail"], (req, r.text)


def test_fuzzing_the_openapi_schema_finds_no_server_error(server):
    """schemathesis (bounded) against the running app: every response < 500, and it still serves."""
    exe = Path(sys.executable).with_name("schemathesis")
    if not exe.exists():
        pytest.skip("schemathesis is not installed (the test extra installs it)")
    import subprocess

    # POST /bulk is left out: fuzzed bulk jobs would fill the test bucket and the CPUs for
    # minutes; its refusals are covered by the hand corpus above.
    cmd = [str(exe), "run", server["url"] + "/openapi.json", "--checks", "not_a_server_error",
           "--max-examples", "25", "--workers", "1", "--request-timeout", "60", "--exclude-path", "/bulk",
           "--seed", "1", "--no-color"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=420)
    tail = (out.stdout + out.stderr)[-3000:]
    assert out.returncode == 0, tail
    print(tail[-600:])
    good = {"class_label": 1, "w": 1.0, "seed": 1, "steps": 2}
    assert len(_images(_post(server, "/generate", good))) == 1
