"""FID (Fréchet distance) and KID between two feature sets, computed by torchmetrics (docs/design.md §10).

torchmetrics' ``FrechetInceptionDistance`` and ``KernelInceptionDistance`` take any ``nn.Module``
as their feature extractor. Features here come from our extractors (the offline Inception of
``inception.py``, CLIP for FCD, ...) through the content-addressed feature cache, so the module
handed to torchmetrics is :class:`PrecomputedFeatures`, which passes cached features through.
Feeding :class:`~collafuse.evaluation.metrics.inception.InceptionFeatures` to torchmetrics directly
gives the same numbers (``tests/test_metrics_fid.py`` checks it).

What this module adds around torchmetrics: checks with plain errors (too few images, NaN, mismatched
dimensions), float64 throughout, a KID subset size capped at the smaller set, and seeded subsets
(torchmetrics draws them from torch's global generator; we fork it so a call neither depends on nor
moves the caller's random state).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from collafuse.evaluation.metrics.errors import MetricsError


class PrecomputedFeatures(nn.Module):
    """A torchmetrics feature extractor for features that were already extracted (and cached): identity."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


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


def _checked_pair(first: np.ndarray, second: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = check_features(first, "first set"), check_features(second, "second set")
    if x.shape[1] != y.shape[1]:
        raise MetricsError(f"feature sets differ in dimension ({x.shape[1]} vs {y.shape[1]}); use one extractor for both")
    return torch.from_numpy(x), torch.from_numpy(y)


def _in_their_span(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sets in orthonormal coordinates of the subspace they span around ``x``'s mean.

    The Fréchet distance is unchanged (it is invariant to a common shift and rotation, and both fitted
    Gaussians are flat outside that span), while torchmetrics' eigen-decomposition of a d x d product
    shrinks to at most (N₁ + N₂)²: 2048² takes seconds on a CPU, and small sets are the usual case.
    """
    if len(x) + len(y) >= x.shape[1]:
        return x, y
    offset = x.mean(dim=0)
    basis, _ = torch.linalg.qr(torch.cat([x, y]).sub(offset).T)
    return (x - offset) @ basis, (y - offset) @ basis


def frechet_distance(first: np.ndarray, second: np.ndarray) -> float:
    """Fréchet distance between two (N, d) feature sets (FID with Inception features, FCD with CLIP); >= 0."""
    x, y = _in_their_span(*_checked_pair(first, second))
    metric = FrechetInceptionDistance(feature=PrecomputedFeatures(x.shape[1]))
    metric.update(x, real=True)
    metric.update(y, real=False)
    # Rounding can leave a distance of identical sets a hair below zero.
    return max(float(metric.compute()), 0.0)


@dataclass(frozen=True)
class KidResult:
    mean: float
    std: float
    subsets: int
    subset_size: int


def kernel_inception_distance(
    first: np.ndarray,
    second: np.ndarray,
    subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    seed: int = 0,
) -> KidResult:
    """KID mean and standard deviation over ``subsets`` random subsets of min(subset_size, N₁, N₂) images.

    Unbiased MMD² under k(a, b) = (a·b / d + 1)^degree (Bińkowski et al. 2018). When the subsets
    would be the whole sets, every subset gives the same value: it is computed once (``subsets=1``).
    """
    if subsets < 1:
        raise MetricsError("KID needs at least one subset (--kid-subsets)")
    x = torch.from_numpy(np.asarray(first, dtype=np.float64))
    y = torch.from_numpy(np.asarray(second, dtype=np.float64))
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise MetricsError(f"KID needs two (N, d) feature sets of one dimension, got {tuple(x.shape)} and {tuple(y.shape)}")
    size = min(subset_size, len(x), len(y))
    if size < 2:
        raise MetricsError(f"KID needs at least 2 images in each set, got {len(x)} and {len(y)}")
    if size == len(x) == len(y):
        subsets = 1
    with warnings.catch_warnings():
        # Its note that features are kept in memory: ours are in memory already.
        warnings.filterwarnings("ignore", message=".*will save all extracted features", category=UserWarning)
        metric = KernelInceptionDistance(feature=PrecomputedFeatures(x.shape[1]), subsets=subsets,
                                         subset_size=size, degree=degree)
    metric.update(x, real=True)
    metric.update(y, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return KidResult(mean=float(mean), std=float(std), subsets=subsets, subset_size=size)
