"""Typed config: YAML + overrides, checked at once with the key's name."""

import subprocess
import sys
from pathlib import Path

import pytest

from cfgd.config import Config, ConfigError, config_plan, from_dict, load_config, masked, to_dict, to_yaml

ROOT = Path(__file__).resolve().parents[1]


def test_named_setups_load_and_round_trip():
    for path in (ROOT / "jobs/configs").glob("*.yaml"):
        if path.name == "sweep.yaml":  # a cfgd.sweep.sweep_grid.SweepConfig, tested in test_sweep.py
            continue
        if path.name == "judge.yaml":  # an EvaluatorConfig (jobs/train_evaluator.py)
            from cfgd.config import load_structured
            from cfgd.evaluate.evaluator_config import EvaluatorConfig, validate_evaluator_config

            judge = validate_evaluator_config(load_structured(EvaluatorConfig, path, []))
            assert judge.arch == "judgenet" and judge.seed != EvaluatorConfig.seed and judge.augment_shift > 0
            continue
        cfg = load_config(path)
        assert from_dict(to_dict(cfg)) == cfg
    demo = load_config(ROOT / "jobs/configs/fashion_mnist.yaml", ["train.steps=5", "sample.w=[0,2]"])
    assert demo.train.steps == 5 and demo.sample.w == [0.0, 2.0] and demo.model.size == "small"


def test_defaults_are_safe_on_a_two_core_machine():
    cfg = Config()
    # Two 1-CPU workers on 2 cores starve Ray Data's read tasks.
    assert cfg.train.num_workers * cfg.train.cpus_per_worker < 2
    assert cfg.diffusion.p_uncond == 0.1


@pytest.mark.parametrize("override,match", [
    (["train.stepz=3"], "train.stepz"),
    (["train.steps=many"], "train.steps"),
    (["nosection.x=1"], "nosection"),
    (["diffusion.schedule=quadratic"], "diffusion.schedule='quadratic'.*cosine"),
    (["model.size=huge"], "model.size='huge'.*tiny"),
    (["diffusion.p_uncond=1.5"], "diffusion.p_uncond"),
    (["train.steps"], "key=value"),
    (["sample.prompts=[a {b},c]"], r"override 'sample.prompts=\[a \{b\},c\]'.*not valid YAML.*quote"),
])
def test_bad_keys_and_values_fail_naming_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, override)


def test_secrets_are_masked_when_printed():
    data = {"storage": {"secret_key": "hunter2", "endpoint": "http://x"}, "token": "abc"}
    assert masked(data) == {"storage": {"secret_key": "***", "endpoint": "http://x"}, "token": "***"}
    assert "run_name: fashion_mnist_demo" in to_yaml(Config())


def test_cli_prints_the_resolved_config_and_exits_2_on_a_bad_key():
    bad = subprocess.run([sys.executable, str(ROOT / "jobs/sample.py"), "sample.stepz=3"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "sample.stepz" in bad.stderr
    missing = subprocess.run([sys.executable, str(ROOT / "jobs/sample.py"), "sample.steps=3"],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "sample.checkpoint is required" in missing.stderr
    assert "resolved config:" in missing.stdout and "steps: 3" in missing.stdout
    # The sampling plan is bounded at the edge: eta=1e300 used to end in an OverflowError.
    huge = subprocess.run([sys.executable, str(ROOT / "jobs/sample.py"), "sample.checkpoint=/nowhere",
                           "sample.eta=1e300"], capture_output=True, text=True, timeout=120)
    assert huge.returncode == 2 and "sample.eta=1e+300" in huge.stderr and "Traceback" not in huge.stderr


@pytest.mark.parametrize("override,match", [
    (["sample.steps=0"], "sample.steps=0"),
    (["sample.w=[1]", "sample.guidance_scale=[2]"], "sample.w: give w or guidance_scale, not both"),
    (["sample.eta=1.5"], "sample.eta=1.5"),
    (["sample.solver=dpm++2m", "sample.rule=cfg++"], "sample.rule: .*DDIM"),
    (["sample.solver=dpm++2m", "sample.eta=0.5"], "sample.eta"),
    (["sample.rule=apg", "sample.apg_beta=2"], "sample.apg_beta=2.0"),
    (["sample.weight_schedule=odd"], "sample.weight_schedule"),
    (["sample.interval=[5,2]"], "sample.interval=\\[5, 2\\]: .*1 <= t_lo <= t_hi"),
    (["sample.guidance_interval=[5,2]"], "sample.interval"),  # the old key still reads
    (["sample.rule=autoguidance"], "sample.guide"),
    (["sample.threshold=0.1"], "sample.threshold"),
    (["sample.guidance_scale=[-1]"], "sample.guidance_scale=-1.0: .*greater than or equal to 0"),
    (["sample.steps=true"], "sample.steps"),
    (["sample.w=[]"], "sample.w"),
])
def test_the_sampling_plan_is_refused_naming_the_sample_key(override, match):
    with pytest.raises(ConfigError, match=match):
        config_plan(load_config(None, override).sample)


def test_the_sampling_plan_of_the_default_config():
    solver, columns = config_plan(load_config(None, ["sample.solver=dpm++2m", "sample.guidance_scale=[1,4]"]).sample)
    assert (solver.name, solver.spacing, solver.steps) == ("dpm++2m", "logsnr", 50)
    assert [g.w for g in columns] == [0.0, 3.0] and all(g.rule == "cfg" and g.clip for g in columns)


def test_sample_and_sweep_keys_are_derived_from_the_plan():
    from cfgd.diffusion.plan import FIELDS, field_default
    from cfgd.sweep.sweep_grid import SweepConfig

    sample, sweep = to_dict(Config())["sample"], SweepConfig()
    for name in FIELDS:
        if name not in ("w", "guidance_scale"):  # the grid's strengths: lists at both edges
            assert sample[name] == getattr(sweep, name) == field_default(name), name


def test_old_sample_keys_still_work_with_a_notice(capsys):
    cfg = load_config(None, ["sample.guidance_interval=[10,20]", "sample.clip_denoised=false"])
    assert (cfg.sample.interval, cfg.sample.clip) == ([10, 20], False)
    err = capsys.readouterr().err
    assert "sample.guidance_interval is now sample.interval" in err and "sample.clip_denoised is now sample.clip" in err
