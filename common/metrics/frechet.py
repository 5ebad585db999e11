"""Fréchet distance between two feature sets, for any feature extractor (FID, FCD, ...).

d² = ‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁ Σ₂)^½, with Gaussians fitted in float64.

Three exact routes to ``tr (Σ₁ Σ₂)^½``, picked by ``method``:

- ``gram``: with centred, scaled features A = (X₁ − μ₁)/√(n₁−1) and B likewise, Σ₁ = AᵀA and
  Σ₂ = BᵀB, and the non-zero eigenvalues of Σ₁Σ₂ are the squared singular values of ABᵀ
  (n₁ × n₂). So the trace is the nuclear norm of ABᵀ: cheap and exact when there are
  fewer images than feature dimensions (the usual case on small sets), and real-valued;
- ``eigh``: Σ₁Σ₂ is similar to the PSD matrix Σ₁^½ Σ₂ Σ₁^½, whose eigenvalues (clipped at 0
  against rounding) give the trace; works from the fitted Gaussians alone;
- ``sqrtm``: the classic pytorch-fid route through ``scipy.linalg.sqrtm`` (called without
  its deprecated ``disp`` argument), with the ε-offset retry for singular products and a
  check on the imaginary part.

``auto`` (the default) takes ``gram`` when raw features are given and the smaller set has
at most as many images as feature dimensions, else ``eigh``. All three agree to ~1e-6
relative; the tests check them against torchmetrics.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np
import scipy.linalg

from collafuse.common.metrics.errors import MetricsError

log = logging.getLogger(__name__)

FrechetMethod = Literal["auto", "gram", "eigh", "sqrtm"]


@dataclass(frozen=True)
class GaussianStats:
    """Mean (d,), covariance (d, d) in float64, and the number of feature vectors behind them."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int


def check_features(features: np.ndarray, what: str = "features") -> np.ndarray:
    """(N, d) float64 features with N >= 2 and no NaN/Inf, or a MetricsError saying which set is wrong."""
    array = np.asarray(features, dtype=np.float64)
    if array.ndim != 2:
        raise MetricsError(f"{what}: expected an (N, d) feature array, got shape {array.shape}")
    if len(array) < 2:
        raise MetricsError(f"{what}: {len(array)} image(s) give no covariance; the Fréchet distance needs at least 2 (use 1,000+)")
    if not np.isfinite(array).all():
        raise MetricsError(f"{what}: features contain NaN or Inf; check the images and the feature extractor")
    return array


def gaussian_stats(features: np.ndarray, what: str = "features") -> GaussianStats:
    """Fit a Gaussian to (N, d) features; N must be at least 2 for a covariance."""
    array = check_features(features, what)
    return GaussianStats(mu=array.mean(axis=0), sigma=np.cov(array, rowvar=False), n=len(array))


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2.0)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray, method: FrechetMethod = "eigh", eps: float = 1e-6) -> float:
    """tr (Σ₁ Σ₂)^½ for two covariance matrices."""
    if method == "eigh":
        root1 = _psd_sqrt(sigma1)
        inner = root1 @ sigma2 @ root1
        values = np.linalg.eigvalsh((inner + inner.T) / 2.0)
        return float(np.sqrt(np.clip(values, 0.0, None)).sum())
    if method == "sqrtm":
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            log.warning("singular covariance product; adding %g to the diagonals", eps)
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
        if np.iscomplexobj(covmean):
            imaginary = float(np.abs(np.diagonal(covmean).imag).max())
            if imaginary > 1e-3:
                raise MetricsError(f"matrix square root has an imaginary part of {imaginary:.3g}; use method='eigh'")
            covmean = covmean.real
        return float(np.trace(covmean))
    raise MetricsError(f"unknown Fréchet method {method!r}: use auto, gram, eigh or sqrtm")


def _from_features(x: np.ndarray, y: np.ndarray) -> float:
    """The ``gram`` route: tr (Σ₁Σ₂)^½ as the nuclear norm of the centred cross-product."""
    a = (x - x.mean(axis=0)) / np.sqrt(len(x) - 1)
    b = (y - y.mean(axis=0)) / np.sqrt(len(y) - 1)
    diff = x.mean(axis=0) - y.mean(axis=0)
    trace_sqrt = float(np.linalg.svd(a @ b.T, compute_uv=False).sum())
    return max(float(diff @ diff + (a * a).sum() + (b * b).sum() - 2.0 * trace_sqrt), 0.0)


def _from_stats(s1: GaussianStats, s2: GaussianStats, method: FrechetMethod) -> float:
    if s1.mu.shape != s2.mu.shape:
        raise MetricsError(f"feature sets differ in dimension ({s1.mu.shape[0]} vs {s2.mu.shape[0]}); use one extractor for both")
    diff = s1.mu - s2.mu
    trace_sqrt = trace_sqrt_product(s1.sigma, s2.sigma, method)
    return max(float(diff @ diff + np.trace(s1.sigma) + np.trace(s2.sigma) - 2.0 * trace_sqrt), 0.0)


def frechet_distance(
    first: GaussianStats | np.ndarray, second: GaussianStats | np.ndarray, method: FrechetMethod = "auto"
) -> float:
    """Fréchet distance between two (N, d) feature sets (or their fitted Gaussians); clipped at 0."""
    if isinstance(first, GaussianStats) or isinstance(second, GaussianStats):
        if method == "gram":
            raise MetricsError("method 'gram' needs the feature arrays, not fitted Gaussians; use eigh or sqrtm")
        s1 = first if isinstance(first, GaussianStats) else gaussian_stats(first, "first set")
        s2 = second if isinstance(second, GaussianStats) else gaussian_stats(second, "second set")
        return _from_stats(s1, s2, "eigh" if method == "auto" else method)
    x, y = check_features(first, "first set"), check_features(second, "second set")
    if x.shape[1] != y.shape[1]:
        raise MetricsError(f"feature sets differ in dimension ({x.shape[1]} vs {y.shape[1]}); use one extractor for both")
    if method == "auto":
        method = "gram" if min(len(x), len(y)) <= x.shape[1] else "eigh"
    if method == "gram":
        return _from_features(x, y)
    return _from_stats(gaussian_stats(x, "first set"), gaussian_stats(y, "second set"), method)
