"""Builders the tests share (a helper module, imported by test files; fixtures live in conftest.py):
the tiny UNet and its checkpoints, scikit-learn's 8x8 digits as arrays, batches and shards,
a tiny evaluator, and the closed-form ε of Gaussian data."""

from pathlib import Path

import numpy as np
import torch

DIGIT_NAMES = [str(i) for i in range(10)]


def tiny_net(seed: int = 0, perturb: bool = True) -> torch.nn.Module:
    """The tiny UNet on 8x8x1 images, 10 classes, seeded, in eval mode. `perturb` moves every
    parameter: zero-initialised output layers make a fresh net predict 0 everywhere, so
    labels and timesteps would not change its output."""
    from cfgd.model.unet import build_model
    from cfgd.spec import ModelSpec

    torch.manual_seed(seed)
    model = build_model(ModelSpec("tiny", image_size=8, in_channels=1, num_classes=10)).eval()
    if perturb:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return model


def tiny_checkpoint(directory, seed: int = 0, *, perturb: bool = True, overrides=(),
                    label_names=DIGIT_NAMES, step: int | None = None) -> Path:
    """A complete checkpoint of `tiny_net(seed, perturb)` (EMA = weights) whose config is the
    default with `overrides` (omegaconf dotlist, e.g. ["diffusion.timesteps=100"])."""
    from cfgd.config import load_config, to_dict
    from cfgd.io.checkpoint import write_checkpoint

    model = tiny_net(seed, perturb)
    config = to_dict(load_config(None, list(overrides)))
    return write_checkpoint(Path(directory), model_state=model.state_dict(), ema_state=model.state_dict(),
                            optimizer_state=None, spec=model.spec, label_names=list(label_names),
                            step=seed if step is None else step, epoch=0, config=config)


def digits_uint8() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: images uint8 (1797, 8, 8, 1) scaled 0..16 -> 0..255, labels int64."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None], d.target.astype(np.int64)


def digits_batch(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n digits as a training batch: x0 (n, 1, 8, 8) in [-1, 1], labels (n,)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x0 = torch.tensor(d.images[:n] / 8.0 - 1.0, dtype=torch.float32)[:, None]
    return x0, torch.tensor(d.target[:n])


def write_digits(root, train=slice(None), test=slice(0, 600), rows_per_shard: int = 700) -> Path:
    """Digits as cfgd Parquet shards under root: the `train` and `test` slices of the 1797."""
    from cfgd.data.shards import write_shards

    images, labels = digits_uint8()
    write_shards(str(root), "train", images[train], labels[train], DIGIT_NAMES, rows_per_shard=rows_per_shard)
    write_shards(str(root), "test", images[test], labels[test], DIGIT_NAMES)
    return Path(root)


def tiny_evaluator(data_root, out, steps: int = 60, storage=None):
    """A small evaluator trained for `steps` on the digits under data_root."""
    from cfgd.evaluate.evaluator_config import EvaluatorConfig
    from cfgd.evaluate.evaluator_training import train_evaluator
    from cfgd.io.storage import StorageOptions

    cfg = EvaluatorConfig(data_root=str(data_root), out=str(out), widths=[8, 16], feature_dim=32, epochs=5,
                          max_steps=steps, batch_size=64, lr=5e-3, storage=storage or StorageOptions())
    return train_evaluator(cfg, log=lambda _: None)[0]


def gaussian_eps(mu: float, std: float, schedule):
    """The exact ε-predictor for data ~ N(mu, std²): E[ε | x_t]."""

    def eps(x, t, y):
        a = schedule.alpha_bar(t).to(x.dtype)[:, None, None, None]
        return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * std**2 + 1 - a)

    return eps


CAPTIONS = ["a dark 3", "a light 7", "3, small, plain", "a photo of a large patterned 0", "a 5"]


def tiny_text_checkpoint(directory, seed: int = 0, captions=CAPTIONS) -> Path:
    """A complete checkpoint of a tiny text-conditioned UNet (8x8x1), perturbed like `tiny_net`,
    carrying the tokenizer built from `captions` and nothing else of its (absent) data."""
    from cfgd.config import load_config, to_dict
    from cfgd.data.tokenizer import build
    from cfgd.io.checkpoint import write_checkpoint
    from cfgd.model.unet import build_model
    from cfgd.spec import ModelSpec

    tok = build(captions, max_tokens=8)
    torch.manual_seed(seed)
    model = build_model(ModelSpec("tiny", 8, 1, 10, condition="text", vocab_size=tok.vocab_size,
                                  max_tokens=tok.max_tokens)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    config = to_dict(load_config(None, ["model.condition=text", "diffusion.timesteps=100"]))
    return write_checkpoint(Path(directory), model_state=model.state_dict(), ema_state=model.state_dict(),
                            optimizer_state=None, spec=model.spec, label_names=DIGIT_NAMES, step=seed, epoch=0,
                            config=config, extra={"tokenizer": tok.to_json()})


def tiny_image_checkpoint(directory, seed: int = 0) -> Path:
    """A complete checkpoint of a tiny label UNet (8x8x1) that also takes a 2x2x1 conditioning
    image (a low_res 4 model), perturbed like `tiny_net`."""
    from cfgd.config import load_config, to_dict
    from cfgd.io.checkpoint import write_checkpoint
    from cfgd.model.unet import build_model
    from cfgd.spec import ModelSpec

    torch.manual_seed(seed)
    model = build_model(ModelSpec("tiny", 8, 1, 10, cond_channels=1, cond_height=2, cond_width=2)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    config = to_dict(load_config(None, ["diffusion.timesteps=100"]))
    return write_checkpoint(Path(directory), model_state=model.state_dict(), ema_state=model.state_dict(),
                            optimizer_state=None, spec=model.spec, label_names=DIGIT_NAMES, step=seed, epoch=0,
                            config=config)


def run_job(script: str, *args, ok: bool = True, config: str = "jobs/configs/tiny.yaml"):
    """``jobs/<script> --config <config> args…`` in a subprocess from the repository root, as a
    user runs it; with ``ok``, asserts exit status 0 (showing the output's tail otherwise)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "jobs" / script), "--config", str(root / config),
                           *map(str, args)], capture_output=True, text=True, timeout=600, cwd=root)
    if ok:
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc


def digits_npz(path) -> Path:
    """The digits as an npz source (1200 train, 200 test rows, (N, 8, 8) uint8) at ``path``."""
    images, labels = digits_uint8()
    np.savez(path, x_train=images[:1200, ..., 0], y_train=labels[:1200], x_test=images[1200:1400, ..., 0],
             y_test=labels[1200:1400])
    return Path(path)
