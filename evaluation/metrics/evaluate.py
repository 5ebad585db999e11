"""The evaluation API behind ``collafuse-eval``, for scripts (benchmarks) that hold folders or tensors.

    from collafuse.evaluation.metrics.evaluate import compare, finite_sample_floor, source_features
    from collafuse.evaluation.metrics.inception import InceptionFeatures

    extractor = InceptionFeatures(device="cuda")
    real = source_features(extractor, Path("data/digits"))        # folder: cached by file content
    fake = source_features(extractor, samples)                     # (N, C, H, W) tensor in [-1, 1]
    result = compare(real.features, fake.features)                 # FID + KID
    floor = finite_sample_floor(real.features, n=len(fake.features))
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from collafuse.evaluation.metrics.distances import check_features, frechet_distance, kernel_inception_distance
from collafuse.evaluation.metrics.errors import MetricsError
from collafuse.evaluation.metrics.features import (
    FeatureCache,
    FeatureExtractor,
    FolderFeatures,
    TensorFeatures,
    folder_features,
    tensor_features,
)

ImageSource = Path | torch.Tensor


@dataclass
class SourceFeatures:
    features: np.ndarray
    from_cache: bool

    def __len__(self) -> int:
        return len(self.features)


def source_features(
    extractor: FeatureExtractor,
    source: ImageSource,
    cache: FeatureCache | None = None,
    batch_size: int = 32,
    size: int | None = None,
    progress: bool = True,
) -> SourceFeatures:
    """Features of a folder (each image at its own size unless ``size``) or of an image tensor in [-1, 1]."""
    if isinstance(source, torch.Tensor):
        result: TensorFeatures | FolderFeatures = tensor_features(extractor, source, batch_size, cache, progress)
    else:
        result = folder_features(extractor, Path(source), batch_size, size, cache, progress)
    return SourceFeatures(result.features, result.from_cache)


@dataclass
class Distances:
    """Fréchet distance (FID with Inception features) and KID between two feature sets."""

    fid: float
    kid_mean: float
    kid_std: float
    kid_subsets: int
    kid_subset_size: int
    n_real: int
    n_fake: int

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def compare(
    real: np.ndarray,
    fake: np.ndarray,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    seed: int = 0,
) -> Distances:
    real = check_features(real, "real images")
    fake = check_features(fake, "generated images")
    fid = frechet_distance(real, fake)
    kid = kernel_inception_distance(real, fake, kid_subsets, kid_subset_size, seed=seed)
    return Distances(fid, kid.mean, kid.std, kid.subsets, kid.subset_size, len(real), len(fake))


@dataclass
class Floor:
    """FID/KID of disjoint random pairs of real subsets of ``n`` images: what a perfect generator would score."""

    fid: float
    fid_std: float
    kid_mean: float
    kid_std: float
    kid_subsets: int
    kid_subset_size: int
    n: int
    repeats: int
    n_total: int

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def finite_sample_floor(
    real: np.ndarray,
    n: int,
    repeats: int = 1,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    seed: int = 0,
) -> Floor:
    """Mean and spread over ``repeats`` random splits; with one split the KID spread is over its subsets."""
    if n < 2:
        raise MetricsError("the floor needs n >= 2 images per subset (a covariance needs two; use 1,000+)")
    if repeats < 1:
        raise MetricsError("the floor needs at least one repeat")
    if 2 * n > len(real):
        raise MetricsError(f"the real set has {len(real)} images; two disjoint subsets of n={n} need {2 * n}")
    rng = np.random.default_rng(seed)
    runs = []
    for r in range(repeats):
        order = rng.permutation(len(real))
        runs.append(compare(real[order[:n]], real[order[n : 2 * n]], kid_subsets, kid_subset_size, seed + r))
    fids = np.array([r.fid for r in runs])
    kids = np.array([r.kid_mean for r in runs])
    kid_std = runs[0].kid_std if repeats == 1 else float(kids.std())
    return Floor(float(fids.mean()), float(fids.std()), float(kids.mean()), kid_std, runs[0].kid_subsets,
                 runs[0].kid_subset_size, n, repeats, len(real))
