"""Fréchet distance and KID on synthetic features: exactness, agreement with torchmetrics, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from collafuse.common.metrics.errors import MetricsError
from collafuse.common.metrics.evaluate import compare, finite_sample_floor
from collafuse.common.metrics.frechet import frechet_distance, gaussian_stats
from collafuse.common.metrics.kid import kernel_inception_distance


class _Passthrough(torch.nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.num_features = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _sets(n: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    a = rng.normal(size=(n, dim)) @ mixing
    b = (rng.normal(size=(n, dim)) * 1.3 + 0.2) @ mixing
    return a, b


def test_closed_form_for_diagonal_gaussians() -> None:
    # N(0, I) vs N(m, s^2 I) in d dims: |m|^2 + d (1 - s)^2.
    rng = np.random.default_rng(1)
    a = rng.normal(size=(20000, 3))
    b = rng.normal(size=(20000, 3)) * 2.0 + 1.0
    assert frechet_distance(a, b) == pytest.approx(3 * 1.0 + 3 * (1 - 2.0) ** 2, rel=0.03)


@pytest.mark.parametrize("n,dim", [(300, 32), (40, 128)])
def test_all_routes_agree_with_torchmetrics(n: int, dim: int) -> None:
    a, b = _sets(n, dim)
    metric = FrechetInceptionDistance(feature=_Passthrough(dim))
    metric.update(torch.from_numpy(a), real=True)
    metric.update(torch.from_numpy(b), real=False)
    reference = float(metric.compute())
    for method in ("auto", "gram", "eigh", "sqrtm"):
        ours = frechet_distance(a, b, method)  # type: ignore[arg-type]
        assert abs(ours - reference) / reference <= 1e-3, (method, ours, reference)
    assert frechet_distance(gaussian_stats(a), gaussian_stats(b)) == pytest.approx(reference, rel=1e-3)


def test_identical_sets_give_zero() -> None:
    a, _ = _sets(50, 16)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save")
def test_kid_agrees_with_torchmetrics_when_subsets_are_whole_sets() -> None:
    a, b = _sets(60, 24)
    metric = KernelInceptionDistance(feature=_Passthrough(24), subsets=3, subset_size=60)
    metric.update(torch.from_numpy(a), real=True)
    metric.update(torch.from_numpy(b), real=False)
    reference = float(metric.compute()[0])
    ours = kernel_inception_distance(a, b, subsets=3, subset_size=60)
    assert ours.mean == pytest.approx(reference, rel=1e-3) and ours.subset_size == 60


def test_kid_is_unbiased_near_zero_for_one_distribution() -> None:
    rng = np.random.default_rng(3)
    same = kernel_inception_distance(rng.normal(size=(400, 16)), rng.normal(size=(400, 16)), subsets=20, subset_size=200)
    shifted = kernel_inception_distance(rng.normal(size=(400, 16)), rng.normal(size=(400, 16)) + 0.5, subsets=20, subset_size=200)
    assert abs(same.mean) < 0.01 and shifted.mean > 0.1 and same.std > 0


def test_bad_feature_sets_are_plain_errors() -> None:
    a, b = _sets(10, 8)
    with pytest.raises(MetricsError, match="at least 2"):
        frechet_distance(a[:1], b)
    with pytest.raises(MetricsError, match="differ in dimension"):
        frechet_distance(a, b[:, :4])
    with pytest.raises(MetricsError, match="NaN"):
        frechet_distance(np.full((3, 8), np.nan), b)
    with pytest.raises(MetricsError, match="gram"):
        frechet_distance(gaussian_stats(a), b, "gram")
    with pytest.raises(MetricsError, match="at least 2"):
        kernel_inception_distance(a[:1], b)


def test_finite_sample_floor_and_compare() -> None:
    a, b = _sets(100, 8)
    floor = finite_sample_floor(a, n=50, repeats=3, kid_subsets=5)
    assert floor.fid > 0 and floor.fid_std > 0 and floor.n == 50 and floor.n_total == 100
    assert floor.fid < compare(a, b, kid_subsets=5).fid
    result = compare(a, b, kid_subsets=5, kid_subset_size=40)
    assert result.n_real == result.n_fake == 100 and result.kid_subset_size == 40 and result.kid_mean > 0
    with pytest.raises(MetricsError, match="need 102"):
        finite_sample_floor(a, n=51)


def test_kid_precomputed_kernels_match_per_subset_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = _sets(80, 16)
    fast = kernel_inception_distance(np.abs(a), np.abs(b) * 1.1, subsets=10, subset_size=30)
    import collafuse.common.metrics.kid as kid_module

    monkeypatch.setattr(kid_module, "_PRECOMPUTE_LIMIT", 0)
    slow = kernel_inception_distance(np.abs(a), np.abs(b) * 1.1, subsets=10, subset_size=30)
    assert fast.mean == pytest.approx(slow.mean, rel=1e-9) and fast.std == pytest.approx(slow.std, rel=1e-9)
    whole = kernel_inception_distance(a, b, subsets=10, subset_size=1000)
    assert whole.subsets == 1 and whole.std == 0.0 and whole.subset_size == 80
