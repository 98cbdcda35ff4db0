"""A text-conditioned model end to end on a real local Ray, as a user runs it: captions
written from the pixels at prepare time, ``jobs/train.py model.condition=text`` (2 DDP
workers tokenizing in Ray Data's decode), then ``jobs/sample.py`` with prompts and a
negative prompt in a fresh process after the training data is gone (the checkpoint
carries its tokenizer)."""

import shutil

import numpy as np

from cfgd.io.checkpoint import find_checkpoints, load_checkpoint
from builders import digits_npz, run_job


def test_a_captioned_data_set_trains_a_text_model_that_samples_prompts_without_its_data(ray_local, tmp_path):
    npz = digits_npz(tmp_path / "d.npz")
    data, runs = tmp_path / "data", tmp_path / "runs"
    run_job("prepare_data.py", "data.source=npz", f"data.source_path={npz}", f"data.root={data}",
            "data.captions=attributes", "data.caption_holdout=[3:dark]")
    address = ray_local.get_runtime_context().gcs_address
    # A label-only data set cannot train a text model: refused naming the key, before any worker starts.
    plain = tmp_path / "plain"
    run_job("prepare_data.py", "data.source=npz", f"data.source_path={npz}", f"data.root={plain}")
    bad = run_job("train.py", f"data.root={plain}", "model.condition=text", f"train.storage_path={runs}",
                  f"train.ray_address={address}", ok=False)
    assert bad.returncode != 0 and "model.condition='text' needs a 'caption' column" in bad.stdout + bad.stderr

    train = run_job("train.py", f"data.root={data}", "model.condition=text", f"train.storage_path={runs}",
                    "train.run_name=text", "train.steps=4", "train.checkpoint_every=4", f"train.ray_address={address}")
    assert "captions: tokenizer" in train.stdout
    ck = load_checkpoint(find_checkpoints(runs / "text")[-1][1])
    assert ck.spec.condition == "text" and ck.spec.vocab_size > 10 and ck.meta["tokenizer"]
    shutil.rmtree(data)  # sampling needs the checkpoint only

    out = tmp_path / "samples"
    sample = run_job("sample.py", f"sample.checkpoint={runs / 'text'}", "sample.prompts=[a dark 3,a light 7]",
                     "sample.negative_prompt=small", "sample.w=[0,2]", "sample.per_cell=2", f"sample.out={out}")
    assert "2 prompt(s) × w [0.0, 2.0] × 2" in sample.stdout and "negative prompt 'small'" in sample.stdout
    npz = np.load(out / "samples.npz")
    assert npz["images"].shape == (8, 8, 8, 1) and npz["prompts"].tolist()[:4] == ["a dark 3"] * 4
    assert npz["seeds"].tolist() == [0, 1, 0, 1, 2, 3, 2, 3]
    refused = run_job("sample.py", f"sample.checkpoint={runs / 'text'}", "sample.classes=[3]", ok=False)
    assert refused.returncode != 0 and "sample.prompts is required" in refused.stdout + refused.stderr
