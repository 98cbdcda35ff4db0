"""A tiny guidance sweep on the local Ray: tables, plot, grid, common seeds, resume by skipping."""


import numpy as np
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cfgd.config import ConfigError
from cfgd.data.images import decode_png, to_uint8
from cfgd.diffusion.plan import Guidance, SamplingPlan, Solver
from cfgd.sampling.checkpoint_sampler import CheckpointSampler
from cfgd.sweep.runner import run_sweep
from cfgd.sweep.sweep_grid import SweepConfig, rows_per_image, sweep_axes
from builders import tiny_checkpoint, tiny_evaluator, write_digits


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    digits = write_digits(root / "digits")
    evaluator = tiny_evaluator(digits, root / "evaluator", steps=40)
    ckpt = tiny_checkpoint(root / "run" / "checkpoint_a", 0, step=5,
                           overrides=["diffusion.timesteps=100", f"data.root={digits}"])
    return {"root": root, "checkpoint": ckpt, "evaluator": evaluator}


def _cfg(setup, out, w, **kw):
    return SweepConfig(checkpoint=str(setup["root"] / "run"), evaluator=evaluator_path(setup), out=str(out), w=w,
                       samples_per_w=20, steps=4, seed=7, chunk_size=10, num_workers=2, cpus_per_worker=0.5,
                       grid_columns=10, progress=False, **kw)


def evaluator_path(setup):
    return setup["evaluator"].path


def _samples(out, pid):
    return pq.read_table(out / "points" / f"{pid}.samples.parquet")


def test_tiny_sweep_writes_outputs_and_a_rerun_skips_done_points(ray_local, setup, tmp_path):
    out = tmp_path / "sweep"
    first = run_sweep(_cfg(setup, out, [0.0, 2.0]), log=lambda _: None)
    assert len(first.computed) == 2 and first.skipped == []

    table = pq.read_table(out / "table.parquet").to_pylist()
    csv = pacsv.read_csv(out / "table.csv").to_pylist()
    assert [r["kind"] for r in table] == ["generated", "generated", "real_floor"] and len(csv) == 3
    gen = table[:2]
    assert [r["w"] for r in gen] == [0.0, 2.0] and [r["guidance_scale"] for r in gen] == [1.0, 3.0]
    for r in gen:
        assert r["n_samples"] == 20 and r["seconds"] > 0 and r["samples_per_s"] > 0
        assert np.isfinite(r["fid"]) and r["fid"] >= 0 and 1 <= r["inception_score"] <= 10
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1
    assert csv[1]["fid"] == pytest.approx(gen[1]["fid"])
    floor = table[2]
    assert floor["n_samples"] == 20 and floor["w"] is None and floor["fid"] >= 0

    plot = Image.open(out / "plot.png")
    assert plot.format == "PNG" and plot.size[0] > 800
    grid = Image.open(out / "grid.png")
    assert grid.size == (48 + 2 * (10 * (8 + 6) - 6), 2 * (2 * (8 + 6) - 6))  # rows = w, 10 seeds per row, zoom 2

    # Common random numbers: every w used the same labels and seeds, in the same order.
    a, b = (_samples(out, r["point_id"]) for r in gen)
    assert a.column("seed").to_pylist() == b.column("seed").to_pylist() == list(range(7, 27))
    assert a.column("label").to_pylist() == b.column("label").to_pylist() == [i % 10 for i in range(20)]
    assert set(b.column("w").to_pylist()) == {2.0}
    # A stored sample (sampled in a mixed-w chunk on a Ray actor) is the same image sampled alone.
    alone = CheckpointSampler.load(setup["checkpoint"]).sample([3], [10], SamplingPlan(solver=Solver(steps=4),
                                                                                rows=(Guidance(w=2.0),)))
    stored = decode_png(b.column("image")[3].as_py())
    assert np.abs(to_uint8(alone)[0].astype(int) - stored.astype(int)).max() <= 1

    again = run_sweep(_cfg(setup, out, [0.0, 2.0]), log=lambda _: None)
    assert again.computed == [] and sorted(again.skipped) == sorted(first.computed)
    assert again.seconds < first.seconds
    assert pq.read_table(out / "table.parquet").to_pylist() == table

    # A new w is sampled with the same seeds; the done ones are reused.
    wider = run_sweep(_cfg(setup, out, [0.0, 1.0, 2.0]), log=lambda _: None)
    assert len(wider.computed) == 1 and sorted(wider.skipped) == sorted(first.computed)
    new = _samples(out, wider.computed[0])
    assert new.column("seed").to_pylist() == a.column("seed").to_pylist()
    assert Image.open(out / "grid.png").size[1] == 2 * (3 * (8 + 6) - 6)


def test_sweep_axes_and_validation():
    cfg = SweepConfig(checkpoint=["a", "b"], evaluator="ev", w=[0, 1], steps=[5, 10], eta=0.5,
                      interval=[None, [1, 50]])
    points = sweep_axes(cfg)
    assert len(points) == 2 * 2 * 1 * 2 * 2
    assert {p.guidance.interval for p in points} == {None, (1, 50)} and {p.solver.steps for p in points} == {5, 10}
    assert {p.solver.eta for p in points} == {0.5}
    assert {p.guidance.interval for p in sweep_axes(SweepConfig(checkpoint="a", evaluator="e",
                                                                interval=[10, 20]))} == {(10, 20)}
    assert [p.w for p in sweep_axes(SweepConfig(checkpoint="a", evaluator="e", guidance_scale=[1, 3]))] == [0.0, 2.0]
    # Rules and their parameters are grid dimensions; a parameter multiplies only its rule's points.
    rules = sweep_axes(SweepConfig(checkpoint="a", evaluator="e", w=[1, 2], rule=["cfg", "apg", "cfg++"],
                                   apg_beta=[0.0, -0.5], lam=[0.2, 0.8], solver="ddim"))
    counts = {r: sum(p.guidance.rule == r for p in rules) for r in ("cfg", "apg", "cfg++")}
    assert counts == {"cfg": 2, "apg": 4, "cfg++": 2}  # CFG++ is steered by lam, not w
    for bad, match in [(dict(w=[1], guidance_scale=[2]), "not both"), (dict(interval=[20, 10]), "interval"),
                       (dict(steps=0), "steps"), (dict(samples_per_w=1), "samples_per_w"),
                       (dict(spacing="odd"), "spacing"), (dict(evaluator=""), "evaluator"),
                       (dict(eta=5.0), "eta"), (dict(rule="cfg++", solver="dpm++2m"), "rule"),
                       (dict(rule="apg", apg_beta=3), "apg_beta"), (dict(w=[1, 1]), "distinct")]:
        with pytest.raises(ConfigError, match=match):
            sweep_axes(SweepConfig(**{"checkpoint": "a", "evaluator": "e", **bad}))
    # The cost per image is the guidance module's rule: 2 rows per guided step, 1 elsewhere.
    ab = np.linspace(0.99, 0.01, 100)
    cost = {w: rows_per_image(sweep_axes(SweepConfig(checkpoint="a", evaluator="e", w=[w], steps=4, **kw))[0],
                              100, ab) for w, kw in [(0.0, {}), (2.0, {}), (3.0, {"interval": [50, 80]})]}
    assert cost == {0.0: 4, 2.0: 8, 3.0: 6}  # trailing steps 100, 75, 50, 25: 75 and 50 lie in [50, 80]


def test_sweep_job_parses_top_level_keys_and_rejects_unknown_ones(capsys):
    from cfgd.cli import parse
    from cfgd.sweep.sweep_grid import SweepConfig, sweep_axes

    def job_parse(argv):  # what jobs/sweep.py does with its command line
        return parse("sweep", argv, schema=SweepConfig, check=sweep_axes)

    cfg = job_parse(["checkpoint=ck", "evaluator=ev", "w=[0,0.5]", "samples_per_w=30", "steps=[10,20]", "seed=3"])
    assert cfg.w == [0.0, 0.5] and cfg.steps == [10, 20] and cfg.seed == 3
    with pytest.raises(SystemExit) as exc:
        job_parse(["checkpoint=ck", "evaluator=ev", "samples=3"])
    assert exc.value.code == 2 and "samples" in capsys.readouterr().err


def test_a_text_checkpoint_sweeps_prompt_templates_and_negative_prompts(ray_local, setup, tmp_path):
    from cfgd.diffusion.plan import Condition
    from builders import tiny_text_checkpoint

    text = tiny_text_checkpoint(tmp_path / "text" / "checkpoint_a")
    cfg = SweepConfig(checkpoint=str(tmp_path / "text"), evaluator=evaluator_path(setup), out=str(tmp_path / "s"),
                      data_root=str(setup["root"] / "digits"), w=[0.0, 2.0], prompt="a {class}",
                      negative_prompt=[None, "a dark {class}"], samples_per_w=10, steps=3, seed=1, chunk_size=8,
                      num_workers=2, cpus_per_worker=0.5, grid_columns=5, progress=False)
    result = run_sweep(cfg, log=lambda _: None)
    gen = [r for r in result.rows if r["kind"] == "generated"]
    assert [(r["w"], r["negative_prompt"]) for r in gen] == [(0.0, None), (2.0, None), (0.0, "a dark {class}"),
                                                             (2.0, "a dark {class}")]
    assert {r["prompt"] for r in gen} == {"a {class}"} and len({r["point_id"] for r in gen}) == 4
    assert len(list((tmp_path / "s" / "grids").glob("*_p-a-class*.png"))) == 2
    samples = [_samples(tmp_path / "s", r["point_id"]) for r in gen]
    assert samples[0].column("prompt").to_pylist() == [f"a {i % 10}" for i in range(10)]
    images = [[decode_png(b.as_py()) for b in t.column("image")] for t in samples]
    # w = 0 never evaluates ε_u, so the negative prompt changes nothing; at w = 2 it does.
    assert all((a == b).all() for a, b in zip(images[0], images[2]))
    assert any((a != b).any() for a, b in zip(images[1], images[3]))
    # A stored sample (a mixed chunk on a Ray actor) is the same image sampled alone.
    alone = CheckpointSampler.load(text).sample([Condition(prompt="a 4", negative_prompt="a dark 4")], [5],
                                               SamplingPlan(solver=Solver(steps=3), rows=(Guidance(w=2.0),)))
    assert np.abs(to_uint8(alone)[0].astype(int) - images[3][4].astype(int)).max() <= 1

    # Conditions that do not fit the checkpoint are refused before anything is sampled.
    for bad, match in [(dict(prompt=None, negative_prompt=None), "prompt is required"),
                       (dict(checkpoint=str(setup["root"] / "run"), prompt=None, negative_prompt=None,
                             image_scale=2.0), "image_scale=2.0: this checkpoint has no image condition"),
                       (dict(prompt="a {class} " + "big " * 10), "prompt=.*tokens"),
                       (dict(checkpoint=str(setup["root"] / "run")), "prompt: checkpoint .* class labels")]:
        with pytest.raises(ConfigError, match=match):
            run_sweep(SweepConfig(**{**cfg.__dict__, **bad}), log=lambda _: None)
    for bad, match in [(dict(prompt="a dress"), "no '{class}'"), (dict(negative_prompt="dark"), "needs prompt"),
                       (dict(prompt=["a {class}", 3]), "prompt=3")]:
        with pytest.raises(ConfigError, match=match):
            sweep_axes(SweepConfig(**{"checkpoint": "a", "evaluator": "e", **bad}))


def test_an_image_checkpoint_sweeps_the_image_scale_over_held_out_real_rows(ray_local, setup, tmp_path):
    from cfgd.data.image_condition import make_cond_images
    from cfgd.data.shards import write_shards
    from cfgd.diffusion.plan import Condition
    from builders import DIGIT_NAMES, digits_uint8, tiny_image_checkpoint

    image = tiny_image_checkpoint(tmp_path / "image" / "checkpoint_a")
    x, y = digits_uint8()
    x, y = x[:600], y[:600]
    cond, desc = make_cond_images(x, "low_res", factor=4)
    data = tmp_path / "sr"
    write_shards(str(data), "test", x, y, DIGIT_NAMES, conditions={"cond_image": desc}, cond_images=cond)
    cfg = SweepConfig(checkpoint=str(image.parent), evaluator=evaluator_path(setup), out=str(tmp_path / "s"),
                      data_root=str(data), w=[1.0], image_scale=[1.0, 3.0], samples_per_w=10, steps=3, seed=1,
                      chunk_size=8, num_workers=2, cpus_per_worker=0.5, grid_columns=5, progress=False)
    gen = [r for r in run_sweep(cfg, log=lambda _: None).rows if r["kind"] == "generated"]
    assert [(r["params"], r["rows_per_image"]) for r in gen] == [("", 2 * 3), ('{"image_scale": 3.0}', 3 * 3)]
    rows = np.random.default_rng(1).permutation(600)[:300][:10]  # RealSplit's held-out half, seed 1
    table = _samples(tmp_path / "s", gen[1]["point_id"])
    assert table.column("label").to_pylist() == y[rows].tolist()
    # A stored sample is the image sampled alone with that row's class and conditioning image.
    from cfgd.data.images import PNG_MODES, encode_png

    row = Condition(label=int(y[rows[4]]), image=encode_png(cond[rows[4]], PNG_MODES))
    alone = CheckpointSampler.load(image).sample([row], [1 + 4], SamplingPlan(
        solver=Solver(steps=3), rows=(Guidance(w=1.0, image_scale=3.0),)))
    stored = decode_png(table.column("image")[4].as_py())
    assert np.abs(to_uint8(alone)[0].astype(int) - stored.astype(int)).max() <= 1
    with pytest.raises(ConfigError, match="no cond_image column"):
        run_sweep(SweepConfig(**{**cfg.__dict__, "data_root": str(setup["root"] / "digits"),
                                 "out": str(tmp_path / "s2")}), log=lambda _: None)
