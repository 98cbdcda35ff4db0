"""An image-conditioned model end to end on a real local Ray, as a user runs it: conditioning
images made from each image at prepare time (``data.image_condition=low_res``: 8×8 digits →
2×2), ``jobs/train.py model.image_condition=true`` (2 DDP workers decoding the column in Ray
Data), then ``jobs/sample.py`` over rows of the data set with the image's own scale, in a
fresh process from the checkpoint alone."""


import numpy as np

from cfgd.data.images import decode_png
from cfgd.data.image_condition import low_res
from cfgd.data.shards import read_split_meta
from cfgd.data.split_loader import read_rows
from cfgd.io.checkpoint import find_checkpoints, load_checkpoint
from builders import digits_npz, digits_uint8, run_job


def test_low_res_conditioning_images_train_a_model_that_samples_from_data_rows(ray_local, tmp_path):
    npz = digits_npz(tmp_path / "d.npz")
    data, plain, runs = tmp_path / "data", tmp_path / "plain", tmp_path / "runs"
    run_job("prepare_data.py", "data.source=npz", f"data.source_path={npz}", f"data.root={data}",
            "data.image_condition=low_res", "data.low_res_factor=4")
    meta = read_split_meta(str(data), "test")
    assert meta.conditions["cond_image"] == {"transform": "low_res", "factor": 4, "height": 2, "width": 2,
                                             "channels": 1}
    rows = read_rows(str(data), "test", [0, 7])
    assert (np.stack([decode_png(p) for p in rows["cond_png"]]) == low_res(digits_uint8()[0][[1200, 1207]], 4)).all()

    address = ray_local.get_runtime_context().gcs_address
    run_job("prepare_data.py", "data.source=npz", f"data.source_path={npz}", f"data.root={plain}")
    bad = run_job("train.py", f"data.root={plain}", "model.image_condition=true", f"train.storage_path={runs}",
                  f"train.ray_address={address}", ok=False)
    assert bad.returncode != 0 and "model.image_condition=true needs a 'cond_image' column" in bad.stdout + bad.stderr

    train = run_job("train.py", f"data.root={data}", "model.image_condition=true", f"train.storage_path={runs}",
                    "train.run_name=sr", "train.steps=4", "train.checkpoint_every=4", f"train.ray_address={address}")
    assert "conditioning images: low_res [2, 2, 1]" in train.stdout
    spec = load_checkpoint(find_checkpoints(runs / "sr")[-1][1]).spec
    assert (spec.cond_channels, spec.cond_height, spec.cond_width) == (1, 2, 2)

    out = tmp_path / "samples"
    sample = run_job("sample.py", f"sample.checkpoint={runs / 'sr'}", f"sample.data_root={data}",
                     "sample.data_rows=[3,0]", "sample.w=[0,2]", "sample.image_scale=2.0", "sample.per_cell=1",
                     "sample.steps=3", f"sample.out={out}")
    npz_out = np.load(out / "samples.npz")
    assert npz_out["images"].shape == (4, 8, 8, 1) and npz_out["cond_images"].shape == (2, 2, 2, 1)
    assert list(npz_out["data_rows"]) == [3, 0] and "2 row(s)" in sample.stdout
    refused = run_job("sample.py", f"sample.checkpoint={runs / 'sr'}", "sample.steps=2", ok=False)
    assert refused.returncode != 0 and "sample.data_root is required" in refused.stdout + refused.stderr
    no_image = run_job("sample.py", f"sample.checkpoint={runs / 'sr'}", f"sample.data_root={plain}", "sample.steps=2",
                       ok=False)
    assert no_image.returncode != 0 and "no cond_image column" in no_image.stdout + no_image.stderr
