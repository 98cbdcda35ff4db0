"""Sample-quality metrics in the feature space of a small classifier trained on the real data.

The evaluation network is a small CNN trained on the real training split. Its
penultimate layer (``feature_dim``, 128 by default) is the feature space of FID and
precision/recall; its softmax gives the Inception Score and the conditional accuracy
(the fraction of samples classified as the class they were generated for). Numbers
from different evaluators are not comparable: the table of a sweep names the
evaluator's sha256.

Evaluator checkpoint (a directory, local or ``s3://``)::

    model.safetensors   weights (no pickle)
    meta.json           kind, format version, architecture, image shape, class names,
                        test accuracy, training settings, size + sha256 of the weights

Metrics (all float64 on the host):

* FID (Heusel et al. 2017): ‖μ₁−μ₂‖² + tr(Σ₁ + Σ₂ − 2 (Σ₁Σ₂)^½), the trace of the
  square root from the eigenvalues of the symmetric PSD Σ₁^½ Σ₂ Σ₁^½ (no complex
  parts to discard, unlike ``scipy.linalg.sqrtm`` of the non-symmetric product).
* Inception Score (Salimans et al. 2016): exp E_x KL(p(y|x) ‖ p(y)), per split.
* Precision / recall (Kynkäänniemi et al. 2019): k-NN balls (k = 3) around each set.
* The "floor": the same metrics for one half of the real test data against the other.

FID in InceptionV3 features, comparable with papers, is :mod:`cfgd.fid_inception`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from torch import nn

from cfgd import artifact, storage
from cfgd.checks import Rule, check
from cfgd.config import ConfigError, masked
from cfgd.dataset import load_split
from cfgd.images import uint8_to_model
from cfgd.storage import StorageOptions

KIND = "cfgd-evaluator"
WEIGHTS = "model.safetensors"


# ------------------------------------------------------------------ configuration


@dataclass
class EvaluatorConfig:
    """``jobs/train_evaluator.py``: train the evaluation classifier on real data."""

    data_root: str = "outputs/data/fashion_mnist"  # Parquet shards <root>/{train,test}/ (path or s3://)
    out: str = "outputs/evaluators/fashion_mnist"  # evaluator checkpoint directory (path or s3://)
    widths: list[int] = field(default_factory=lambda: [32, 64, 64])  # conv widths; pool after all but the last
    feature_dim: int = 128  # the feature space of FID and precision/recall
    epochs: int = 2
    max_steps: int = 0  # stop after this many optimizer steps (0 = run every epoch)
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-4
    max_train_rows: int = 0  # use only the first rows of the train split (0 = all)
    threads: int = 0  # torch intra-op threads (0 = torch's default)
    seed: int = 0
    overwrite: bool = False  # replace an evaluator already at ``out``
    storage: StorageOptions = field(default_factory=StorageOptions)


def validate_evaluator_config(cfg: EvaluatorConfig) -> EvaluatorConfig:
    check([
        Rule("widths", cfg.widths, len(cfg.widths) >= 1 and all(w >= 1 for w in cfg.widths),
             "a non-empty list of ints >= 1"),
        Rule("feature_dim", cfg.feature_dim, cfg.feature_dim >= 2, ">= 2"),
        Rule("epochs", cfg.epochs, cfg.epochs >= 1, ">= 1"),
        Rule("max_steps", cfg.max_steps, cfg.max_steps >= 0, ">= 0"),
        Rule("batch_size", cfg.batch_size, cfg.batch_size >= 2, ">= 2 (batch norm)"),
        Rule("lr", cfg.lr, cfg.lr > 0, "> 0"),
        Rule("max_train_rows", cfg.max_train_rows, cfg.max_train_rows >= 0, ">= 0"),
        Rule("out", cfg.out, bool(cfg.out), "a directory path or s3:// URI"),
        Rule("data_root", cfg.data_root, bool(cfg.data_root), "a directory path or s3:// URI"),
    ], ConfigError)
    return cfg


# ------------------------------------------------------------------------ the network


class EvalNet(nn.Module):
    """Conv (3×3) + BN + ReLU stages, 2×2 max-pool after all but the last, then
    average-pool to 4×4 → Linear(feature_dim) → ReLU (the features) → Linear(classes).

    x: (B, C, H, W) in [-1, 1] → logits (B, num_classes); works for any H, W ≥ 4.
    """

    POOL = 4

    def __init__(self, in_channels: int, num_classes: int, widths: Sequence[int] = (32, 64, 64),
                 feature_dim: int = 128):
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(cin, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            cin = w
        # Adaptive pooling fixes the head's input size whatever the image size
        # (it repeats pixels when the map is smaller than 4×4, e.g. 8×8 digits).
        layers.append(nn.AdaptiveAvgPool2d(self.POOL))
        self.body = nn.Sequential(*layers)
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(cin * self.POOL**2, feature_dim), nn.ReLU(inplace=True))
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) → (B, feature_dim)."""
        return self.embed(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.features(x)))

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x)
        return f, self.head(f)  # dropout is the identity in eval mode


@dataclass
class Embedding:
    """Evaluator outputs for N images: features (N, D) and class probabilities (N, K), float64."""

    features: np.ndarray
    probs: np.ndarray

    def __len__(self) -> int:
        return len(self.features)

    def take(self, idx) -> "Embedding":
        return Embedding(self.features[idx], self.probs[idx])


@dataclass
class Evaluator:
    """A loaded evaluation network (eval mode, CPU) and its meta.json."""

    net: EvalNet
    meta: dict[str, Any]
    path: str = ""

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images it was trained on."""
        return tuple(self.meta["image_shape"])

    @property
    def test_accuracy(self) -> float:
        return float(self.meta["test_accuracy"])

    @property
    def sha256(self) -> str:
        """Identity of the weights: results of different evaluators are not comparable."""
        return self.meta["files"][WEIGHTS]["sha256"]

    @classmethod
    def load(cls, uri: str | Path, storage_options: StorageOptions | None = None) -> "Evaluator":
        """An evaluator checkpoint directory, local or ``s3://`` (downloaded to a cache and verified)."""
        local, meta = artifact.fetch(str(uri), KIND, [WEIGHTS], storage_options)
        a = meta["arch"]
        net = EvalNet(a["in_channels"], a["num_classes"], a["widths"], a["feature_dim"])
        net.load_state_dict(load_file(local / WEIGHTS))
        return cls(net.eval(), meta, str(uri))

    @torch.inference_mode()
    def embed(self, images: torch.Tensor | np.ndarray, batch_size: int = 500) -> Embedding:
        """images: float (N, C, H, W) in [-1, 1], or uint8 (N, H, W, C) → Embedding."""
        if isinstance(images, np.ndarray) and images.dtype == np.uint8:
            images = uint8_to_model(images)
        images = torch.as_tensor(images, dtype=torch.float32)
        if tuple(images.shape[1:]) != self.image_shape:
            raise ValueError(f"evaluator {self.path} expects images (N, C, H, W) with (C, H, W) = "
                             f"{self.image_shape}, got {tuple(images.shape)}")
        feats, probs = [], []
        for lo in range(0, len(images), batch_size):
            f, logits = self.net.features_and_logits(images[lo:lo + batch_size])
            feats.append(f.double())
            probs.append(torch.softmax(logits.double(), dim=1))
        d, k = self.net.head.in_features, self.net.head.out_features
        return Embedding(torch.cat(feats).numpy() if feats else np.zeros((0, d)),
                         torch.cat(probs).numpy() if probs else np.zeros((0, k)))


# ------------------------------------------------------------------------ metrics


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """features (N, D) → mean (D,), unbiased covariance (D, D), float64. Needs N ≥ 2."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"need features of shape (N >= 2, D), got {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (negative round-off eigenvalues → 0)."""
    vals, vecs = np.linalg.eigh((a + a.T) / 2)
    return (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """d² between N(μ₁, Σ₁) and N(μ₂, Σ₂): ‖μ₁−μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁Σ₂)^½.

    tr (Σ₁Σ₂)^½ = Σᵢ sqrt λᵢ(Σ₁^½ Σ₂ Σ₁^½): Σ₁Σ₂ is similar to that symmetric PSD
    matrix, so its eigenvalues are real and ≥ 0 and no complex square root is needed
    (the eps-offset / imaginary-part handling of the sqrtm route becomes moot).
    mu: (D,), sigma: (D, D). Returns a float ≥ 0 (round-off clipped).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
        raise ValueError(f"mismatched shapes: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    r1 = _sqrt_psd(s1)
    m = r1 @ s2 @ r1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean, 0.0))


def fid(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """FID between two feature sets (Na, D) and (Nb, D)."""
    return frechet_distance(*feature_stats(features_a), *feature_stats(features_b))


def fid_bootstrap_std(features: np.ndarray, reference: np.ndarray, resamples: int = 100, seed: int = 0) -> float:
    """Standard deviation of FID over bootstrap resamples of the generated features (N, D):
    the sampling noise of one FID figure, against which two settings are compared."""
    f = np.asarray(features, dtype=np.float64)
    ref_stats = feature_stats(reference)
    rng = np.random.default_rng(seed)
    draws = [frechet_distance(*feature_stats(f[rng.integers(0, len(f), len(f))]), *ref_stats)
             for _ in range(resamples)]
    return float(np.std(draws, ddof=1))


def inception_score(probs: np.ndarray, splits: int = 1) -> tuple[float, float]:
    """exp E_x KL(p(y|x) ‖ p(y)) of class probabilities (N, K); (mean, std) over ``splits``.

    p(y) is the mean of p(y|x) within each split. Equals K for confident predictions
    spread evenly over K classes, 1 when every prediction is the same.
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or len(p) < splits or splits < 1:
        raise ValueError(f"need probs (N >= splits, K) and splits >= 1, got {p.shape}, splits={splits}")
    scores = []
    for part in np.array_split(p, splits):
        py = part.mean(axis=0, keepdims=True)
        # 0·log 0 = 0: only terms with p(y|x) > 0 count (then p(y) > 0 too).
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(part > 0, part * (np.log(part) - np.log(py)), 0.0)
        scores.append(math.exp(terms.sum(axis=1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


def conditional_accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of rows (N, K) whose arg-max class is the requested label (N,)."""
    labels = np.asarray(labels)
    if len(labels) != len(probs):
        raise ValueError(f"{len(probs)} rows of probabilities but {len(labels)} labels")
    return float((np.asarray(probs).argmax(axis=1) == labels).mean())


def _cdist_chunks(a: torch.Tensor, b: torch.Tensor, chunk: int):
    """Yield (lo, distances (rows, Nb)) for row chunks of a; exact (no matmul trick: d(x, x) = 0)."""
    for lo in range(0, len(a), chunk):
        yield lo, torch.cdist(a[lo:lo + chunk], b, compute_mode="donot_use_mm_for_euclid_dist")


def knn_radii(features: np.ndarray, k: int = 3, chunk: int = 1024) -> np.ndarray:
    """Distance of each point (N, D) to its k-th nearest other point → (N,) float64."""
    x = torch.as_tensor(np.asarray(features, np.float64))
    if not 1 <= k < len(x):
        raise ValueError(f"k must be in [1, N-1={len(x) - 1}], got {k}")
    out = torch.empty(len(x), dtype=torch.float64)
    for lo, d in _cdist_chunks(x, x, chunk):
        # k+1 smallest including the point itself at distance 0.
        out[lo:lo + len(d)] = d.topk(k + 1, dim=1, largest=False).values[:, k]
    return out.numpy()


def _coverage(points: torch.Tensor, centers: torch.Tensor, radii: torch.Tensor, chunk: int) -> float:
    """Fraction of points inside at least one ball B(center_j, radius_j)."""
    inside = torch.zeros(len(points), dtype=torch.bool)
    for lo, d in _cdist_chunks(points, centers, chunk):
        inside[lo:lo + len(d)] = (d <= radii[None, :]).any(dim=1)
    return float(inside.double().mean())


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3, chunk: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of features (Nr, D), (Nf, D).

    precision: fraction of fake points inside the real manifold (the union of balls
    around each real point reaching its k-th nearest real neighbour); recall: fraction
    of real points inside the fake manifold. Use sets of equal size: the radii shrink
    as a set grows.
    """
    r = torch.as_tensor(np.asarray(real, np.float64))
    f = torch.as_tensor(np.asarray(fake, np.float64))
    r_rad = torch.as_tensor(knn_radii(r.numpy(), k, chunk))
    f_rad = torch.as_tensor(knn_radii(f.numpy(), k, chunk))
    return _coverage(f, r, r_rad, chunk), _coverage(r, f, f_rad, chunk)


METRICS = ("fid", "fid_std", "inception_score", "inception_score_std", "accuracy", "precision", "recall")


def compute_metrics(gen: Embedding, labels: np.ndarray, reference: Embedding, pr_reference: Embedding,
                    k: int = 3, is_splits: int = 1) -> dict[str, float]:
    """Every metric of generated ``gen`` (requested ``labels``) against real data.

    FID against ``reference``; precision/recall against ``pr_reference`` (ideally the
    same size as ``gen``). Keys: METRICS.
    """
    is_mean, is_std = inception_score(gen.probs, is_splits)
    p, r = precision_recall(pr_reference.features, gen.features, k)
    return {"fid": fid(gen.features, reference.features),
            "fid_std": fid_bootstrap_std(gen.features, reference.features), "inception_score": is_mean,
            "inception_score_std": is_std, "accuracy": conditional_accuracy(gen.probs, labels),
            "precision": p, "recall": r}


@dataclass
class RealSplit:
    """A real test set cut in two halves: ``held_out`` plays the samples, ``reference`` the data.

    The floor compares ``n`` held-out images with the reference exactly as a sweep
    compares n samples, so finite-sample bias (FID grows as n shrinks) is the same on
    both sides of the comparison.
    """

    held_out: Embedding
    held_out_labels: np.ndarray
    reference: Embedding

    @classmethod
    def of(cls, emb: Embedding, labels: np.ndarray, seed: int = 0) -> "RealSplit":
        perm = np.random.default_rng(seed).permutation(len(emb))
        half = len(emb) // 2
        a, b = perm[:half], perm[half:]
        return cls(emb.take(a), np.asarray(labels)[a], emb.take(b))

    @classmethod
    def load(cls, evaluator: "Evaluator", data_root: str, split: str = "test",
             storage_options: StorageOptions | None = None, seed: int = 0) -> "RealSplit":
        """The real ``<data_root>/<split>`` embedded by ``evaluator`` and cut in two (see of)."""
        images, labels, _ = load_split(data_root, split, storage_options)
        return cls.of(evaluator.embed(images), labels, seed=seed)

    def pr_reference(self, n: int) -> Embedding:
        """The first n reference rows (already shuffled): a size-matched set for precision/recall."""
        return self.reference.take(slice(0, min(n, len(self.reference))))

    def floor(self, n: int, k: int = 3, is_splits: int = 1) -> dict[str, float]:
        """The metrics of n real held-out images: the best a generator can score at size n."""
        if n > len(self.held_out):
            raise ValueError(f"floor needs n <= {len(self.held_out)} held-out real images, got {n}")
        return compute_metrics(self.held_out.take(slice(0, n)), self.held_out_labels[:n], self.reference,
                               self.pr_reference(n), k, is_splits)


# ------------------------------------------------------------------------ checkpoint


def write_evaluator(out: str, net: EvalNet, meta: dict[str, Any], storage_options: StorageOptions | None = None,
                    overwrite: bool = False) -> str:
    """Write weights + meta.json to ``out``, local or ``s3://``, atomically (cfgd.artifact)."""
    def stage(tmp: Path) -> list[str]:
        save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, tmp / WEIGHTS)
        return [WEIGHTS]

    fields = {k: v for k, v in meta.items() if k not in ("kind", "format_version", "files")}
    return artifact.write(out, KIND, stage, fields, storage_options, overwrite)


# ------------------------------------------------------------------------ training


@torch.inference_mode()
def accuracy_of(net: EvalNet, images: torch.Tensor, labels: np.ndarray, batch_size: int = 1000) -> float:
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
    storage.check_access(cfg.out, cfg.storage, write=True)
    t0 = time.perf_counter()
    x_train, y_train, meta = load_split(cfg.data_root, "train", cfg.storage, cfg.max_train_rows)
    x_test, y_test, test_meta = load_split(cfg.data_root, "test", cfg.storage)
    if test_meta.class_names != meta.class_names:
        raise ValueError(f"{cfg.data_root}: train and test splits name different classes")
    log(f"[cfgd.evaluator] data {cfg.data_root}: train {len(y_train)}, test {len(y_test)} images "
        f"{tuple(x_train.shape[1:])}, {meta.num_classes} classes ({time.perf_counter() - t0:.1f}s)")
    torch.manual_seed(cfg.seed)
    net = EvalNet(meta.channels, meta.num_classes, cfg.widths, cfg.feature_dim)
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
            loss = F.cross_entropy(net(x_train[idx]), y_train_t[idx])
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
        "arch": {"name": "EvalNet", "in_channels": meta.channels, "num_classes": meta.num_classes,
                 "widths": list(cfg.widths), "feature_dim": cfg.feature_dim, "pool": EvalNet.POOL},
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
