"""Sample-quality metrics in the feature space of a small classifier trained on the real data.

The evaluation network is a small CNN trained on the real training split. Its
penultimate layer (``feature_dim``, 128 by default) is the feature space of FID and
precision/recall; its softmax gives the Inception Score and the conditional accuracy
(the fraction of samples classified as the class they were generated for). Numbers
from different evaluators are not comparable: the table of a sweep names the
evaluator's sha256.

Metrics (all float64 on the host):

* FID (Heusel et al. 2017): ‖μ₁−μ₂‖² + tr(Σ₁ + Σ₂ − 2 (Σ₁Σ₂)^½), the trace of the
  square root from the eigenvalues of the symmetric PSD Σ₁^½ Σ₂ Σ₁^½ (no complex
  parts to discard, unlike ``scipy.linalg.sqrtm`` of the non-symmetric product).
* Inception Score (Salimans et al. 2016): exp E_x KL(p(y|x) ‖ p(y)), per split.
* Precision / recall (Kynkäänniemi et al. 2019): k-NN balls (k = 3) around each set.
* The "floor": the same metrics for one half of the real test data against the other.

FID in InceptionV3 features, comparable with papers, is :mod:`cfgd.evaluate.fid_inception`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Embedding:
    """Evaluator outputs for N images: features (N, D) and class probabilities (N, K), float64."""

    features: np.ndarray
    probs: np.ndarray

    def __len__(self) -> int:
        return len(self.features)

    def take(self, idx) -> "Embedding":
        return Embedding(self.features[idx], self.probs[idx])


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
