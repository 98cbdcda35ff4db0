"""What the jobs show, without Ray: the console/log routing, the labelled grid, and the
network's gradient layout (DDP's "Grad strides do not match bucket view strides").

The jobs' console story itself, end to end on Ray, is checked in test_train_ray.py.
"""

import io
import logging
import sys
import threading
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from cfgd import console
from cfgd.model.unet import ModelSpec, build_model
from cfgd.sampling.tiles import labelled_grid, make_grid, zoom_for


def test_a_quiet_job_keeps_its_own_and_tagged_lines_on_the_console_and_the_rest_in_the_log(tmp_path, monkeypatch):
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    log = tmp_path / "logs" / "job.log"

    def relay():  # what Ray's log thread does with worker output
        print("\x1b[36m(RayTrainWorker pid=7)\x1b[0m [cfgd.train] step 2/4 loss 0.5")
        print("\x1b[36m(RayTrainWorker pid=7)\x1b[0m Wrapping provided model in DistributedDataParallel.")
        print("(TrainController pid=8) core_worker.cc:2465: Actor ...", file=sys.stderr)

    with console.job_output(log) as path:
        assert path == log.resolve()
        print("resolved config: ...")
        thread = threading.Thread(target=relay)
        thread.start()
        thread.join()
        warnings.warn("a library's deprecation", DeprecationWarning)
        logging.getLogger("some.library").warning("a library's notice")
        console.log_only("full config")
        print("error: bad value", file=sys.stderr)
    assert sys.stdout is out and sys.stderr is err and console._active is None  # all undone
    assert out.getvalue() == "resolved config: ...\n[cfgd.train] step 2/4 loss 0.5\n"
    assert err.getvalue() == "error: bad value\n"
    text = log.read_text()
    for line in ("resolved config: ...", "(RayTrainWorker pid=7) [cfgd.train] step 2/4 loss 0.5",
                 "(RayTrainWorker pid=7) Wrapping provided model", "(TrainController pid=8) core_worker.cc",
                 "DeprecationWarning: a library's deprecation", "WARNING some.library: a library's notice",
                 "full config", "error: bad value"):
        assert line in text, line
    assert "\x1b[" not in text


def test_verbose_routes_nothing(tmp_path):
    stdout = sys.stdout
    with console.job_output(tmp_path / "job.log", verbose=True) as path:
        assert path is None and sys.stdout is stdout
    assert not (tmp_path / "job.log").exists()


def test_the_sample_grid_is_magnified_and_labelled():
    rows, cols, per_cell, H = 3, 2, 2, 28
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (rows * cols * per_cell, H, H, 1), dtype=np.uint8)
    zoom = zoom_for(H)
    assert zoom == 3 and zoom_for(8) == 11 and zoom_for(96) == 1  # >= 84 px a side
    grid = np.asarray(labelled_grid(images, ["T-shirt/top", "Trouser", "Bag"], cols, col_labels=["w = 0", "w = 3"],
                                    per_cell=per_cell, zoom=zoom))
    plain = np.asarray(make_grid(images, rows, cols, per_cell=per_cell))
    body = np.kron(plain, np.ones((zoom, zoom), np.uint8))  # nearest-neighbour magnification
    top, left = grid.shape[0] - body.shape[0], grid.shape[1] - body.shape[1]
    assert 10 < top < 40 and 40 < left < 150, (top, left)  # one line of text; the longest class name
    assert np.array_equal(grid[top:, left:, 0], body) and np.array_equal(grid[top:, left:, 2], body)
    # Text in the left margin beside every row, and in the top margin above every column of cells.
    row_h, cell_w = (H + 6) * zoom, (per_cell * (H + 2) - 2 + 6) * zoom
    for r in range(rows):
        assert (grid[top + r * row_h:top + r * row_h + H * zoom, :left] < 128).any(), f"row {r} has no label"
    for c in range(cols):
        assert (grid[:top, left + c * cell_w:left + (c + 1) * cell_w] < 128).any(), f"column {c} has no label"
    assert (grid[:top, :left] == 255).all(), "the corner stays blank"
    with pytest.raises(ValueError, match="do not fill"):
        labelled_grid(images[:-1], ["a", "b", "c"], cols, per_cell=per_cell)


def test_the_sweep_grid_keeps_its_layout():
    images = np.zeros((2 * 10, 8, 8, 1), np.uint8)
    grid = labelled_grid(images, ["w=0", "w=1"], 10, zoom=2, left=48, font_size=None)
    assert grid.size == (48 + 2 * (10 * (8 + 6) - 6), 2 * (2 * (8 + 6) - 6))
    assert isinstance(grid, Image.Image)


@pytest.mark.parametrize("size", ["tiny", "small", "base"])
def test_every_gradient_has_its_parameters_strides(size):
    """DDP's gradient buckets take each parameter's strides; a gradient with other strides
    (one-head attention's 1x1 proj weight, fed a channels-last view) made DDP warn
    "Grad strides do not match bucket view strides" on every worker."""
    torch.manual_seed(0)
    model = build_model(ModelSpec(size, image_size=8, in_channels=1, num_classes=3))
    model(torch.randn(2, 1, 8, 8), torch.tensor([1, 5]), torch.tensor([0, 3])).square().mean().backward()
    bad = [n for n, p in model.named_parameters() if p.grad is not None and p.grad.stride() != p.stride()]
    assert not bad
