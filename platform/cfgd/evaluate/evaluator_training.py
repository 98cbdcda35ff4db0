"""Training the evaluation classifier on a dataset's real train split (``jobs/train_evaluator.py``)."""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from cfgd.config import masked
from cfgd.data.split_loader import load_split
from cfgd.evaluate.evalnet import ARCHS, EvalNet, random_shift
from cfgd.evaluate.evaluator import Evaluator, write_evaluator
from cfgd.evaluate.evaluator_config import EvaluatorConfig, validate_evaluator_config
from cfgd.io.access import check_access


@torch.inference_mode()
def accuracy_of(net: torch.nn.Module, images: torch.Tensor, labels: np.ndarray, batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``net`` (eval mode) on images (N, C, H, W), labels (N,), computed directly."""
    net.eval()
    preds = torch.cat([net(images[lo:lo + batch_size]).argmax(1) for lo in range(0, len(images), batch_size)])
    return float((preds.numpy() == np.asarray(labels)).mean())


def train_evaluator(cfg: EvaluatorConfig, log=print) -> tuple[Evaluator, str]:
    """Train the classifier on ``<data_root>/train``, measure it on ``<data_root>/test``, save it.

    Returns the evaluator (eval mode) and where it was written.
    """
    validate_evaluator_config(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    check_access(cfg.out, cfg.storage, write=True)
    t0 = time.perf_counter()
    x_train, y_train, meta = load_split(cfg.data_root, "train", cfg.storage, cfg.max_train_rows)
    x_test, y_test, test_meta = load_split(cfg.data_root, "test", cfg.storage)
    if test_meta.class_names != meta.class_names:
        raise ValueError(f"{cfg.data_root}: train and test splits name different classes")
    log(f"[cfgd.evaluator] data {cfg.data_root}: train {len(y_train)}, test {len(y_test)} images "
        f"{tuple(x_train.shape[1:])}, {meta.num_classes} classes ({time.perf_counter() - t0:.1f}s)")
    torch.manual_seed(cfg.seed)
    net = ARCHS[cfg.arch](meta.channels, meta.num_classes, cfg.widths, cfg.feature_dim)
    steps_per_epoch = math.ceil(len(y_train) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch if not cfg.max_steps else min(cfg.max_steps, cfg.epochs * steps_per_epoch)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    # One-cycle: a short warm-up then cosine decay converges in the 1-2 epochs a CPU affords.
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total, pct_start=0.15)
    g = torch.Generator().manual_seed(cfg.seed)
    y_train_t = torch.from_numpy(y_train)
    step, t1 = 0, time.perf_counter()
    while step < total:
        net.train()
        perm = torch.randperm(len(y_train), generator=g)
        for lo in range(0, len(perm), cfg.batch_size):
            idx = perm[lo:lo + cfg.batch_size]
            if len(idx) < 2 or step >= total:
                break
            loss = F.cross_entropy(net(random_shift(x_train[idx], cfg.augment_shift, g)), y_train_t[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % 100 == 0 or step == total:
                log(f"[cfgd.evaluator] step {step}/{total} loss {loss.item():.4f} "
                    f"({time.perf_counter() - t1:.0f}s)")
    net.eval()
    test_acc = accuracy_of(net, x_test, y_test)
    log(f"[cfgd.evaluator] test accuracy {test_acc:.4f} on {len(y_test)} images "
        f"after {step} steps ({time.perf_counter() - t1:.0f}s training)")
    meta_out = {
        "arch": {"name": type(net).__name__, "in_channels": meta.channels, "num_classes": meta.num_classes,
                 "widths": list(cfg.widths), "feature_dim": cfg.feature_dim,
                 **({"pool": EvalNet.POOL} if isinstance(net, EvalNet) else {})},
        "image_shape": [meta.channels, meta.height, meta.width],
        "input_range": [-1.0, 1.0],
        "class_names": meta.class_names,
        "test_accuracy": test_acc,
        "test_rows": int(len(y_test)),
        "train_rows": int(len(y_train)),
        "steps": step,
        "data_root": cfg.data_root,
        "config": masked(OmegaConf.to_container(OmegaConf.structured(cfg))),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    where = write_evaluator(cfg.out, net, meta_out, cfg.storage, overwrite=cfg.overwrite)
    log(f"[cfgd.evaluator] saved to {where}")
    return Evaluator.load(cfg.out, cfg.storage), where
