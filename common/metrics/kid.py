"""Kernel Inception Distance (Bińkowski et al. 2018): unbiased MMD² with a cubic polynomial kernel.

k(x, y) = (x·y / d + 1)³; the estimate is averaged over random subsets of equal size
drawn without replacement from each set, as in torchmetrics and torch-fidelity. Unlike FID
it is unbiased, so two samples of one distribution give values near 0 (either sign).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from collafuse.common.metrics.errors import MetricsError


@dataclass(frozen=True)
class KidResult:
    mean: float
    std: float
    subsets: int
    subset_size: int


_PRECOMPUTE_LIMIT = 4096  # up to this many images in all, the kernel matrices are computed once


def _kernel(a: np.ndarray, b: np.ndarray, degree: int, coef: float) -> np.ndarray:
    return (a @ b.T / a.shape[1] + coef) ** degree


def _mmd_from_kernels(k_xx: np.ndarray, k_yy: np.ndarray, k_xy: np.ndarray) -> float:
    m = len(k_xx)
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2.0 * k_xy.mean())


def polynomial_mmd(x: np.ndarray, y: np.ndarray, degree: int = 3, coef: float = 1.0) -> float:
    """Unbiased MMD² between two equal-size samples under k(a, b) = (a·b / d + coef)^degree."""
    return _mmd_from_kernels(_kernel(x, x, degree, coef), _kernel(y, y, degree, coef), _kernel(x, y, degree, coef))


def kernel_inception_distance(
    first: np.ndarray,
    second: np.ndarray,
    subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    seed: int = 0,
) -> KidResult:
    """KID mean and standard deviation over ``subsets`` random subsets of min(subset_size, N₁, N₂) images.

    When the subsets would be the whole sets, every subset gives the same value: it is computed
    once and reported with ``subsets=1``.
    """
    x = np.asarray(first, dtype=np.float64)
    y = np.asarray(second, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise MetricsError(f"KID needs two (N, d) feature sets of one dimension, got {x.shape} and {y.shape}")
    if subsets < 1:
        raise MetricsError("KID needs at least one subset (--kid-subsets)")
    size = min(subset_size, len(x), len(y))
    if size < 2:
        raise MetricsError(f"KID needs at least 2 images in each set, got {len(x)} and {len(y)}")
    if size == len(x) == len(y):
        return KidResult(mean=polynomial_mmd(x, y, degree), std=0.0, subsets=1, subset_size=size)
    rng = np.random.default_rng(seed)
    draws = [(rng.choice(len(x), size, replace=False), rng.choice(len(y), size, replace=False)) for _ in range(subsets)]
    if len(x) + len(y) <= _PRECOMPUTE_LIMIT:
        k_xx, k_yy, k_xy = _kernel(x, x, degree, 1.0), _kernel(y, y, degree, 1.0), _kernel(x, y, degree, 1.0)
        values = np.array([_mmd_from_kernels(k_xx[np.ix_(i, i)], k_yy[np.ix_(j, j)], k_xy[np.ix_(i, j)]) for i, j in draws])
    else:
        values = np.array([polynomial_mmd(x[i], y[j], degree) for i, j in draws])
    return KidResult(mean=float(values.mean()), std=float(values.std()), subsets=subsets, subset_size=size)
