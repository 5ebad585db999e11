"""FID and KID (torchmetrics behind ``distances.py``) on synthetic features: against independent formulas, errors."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from collafuse.evaluation.metrics.distances import frechet_distance, kernel_inception_distance
from collafuse.evaluation.metrics.errors import MetricsError
from collafuse.evaluation.metrics.evaluate import compare, finite_sample_floor


def _sets(n: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    a = rng.normal(size=(n, dim)) @ mixing
    b = (rng.normal(size=(n, dim)) * 1.3 + 0.2) @ mixing
    return a, b


def _frechet_by_sqrtm(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook formula (pytorch-fid's route), written here independently of the code under test."""
    mu1, mu2 = a.mean(axis=0), b.mean(axis=0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _mmd_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² under k(a, b) = (a·b / d + 1)³ (Bińkowski et al. 2018), in plain numpy."""
    d, m = x.shape[1], len(x)
    k_xx, k_yy, k_xy = ((u @ v.T / d + 1) ** 3 for u, v in ((x, x), (y, y), (x, y)))
    return float((k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1)) - 2 * k_xy.mean())


def test_closed_form_for_diagonal_gaussians() -> None:
    # N(0, I) vs N(m, s^2 I) in d dims: |m|^2 + d (1 - s)^2.
    rng = np.random.default_rng(1)
    a = rng.normal(size=(20000, 3))
    b = rng.normal(size=(20000, 3)) * 2.0 + 1.0
    assert frechet_distance(a, b) == pytest.approx(3 * 1.0 + 3 * (1 - 2.0) ** 2, rel=0.03)


@pytest.mark.parametrize("n,dim", [(300, 32), (40, 128)])
def test_frechet_equals_the_sqrtm_formula(n: int, dim: int) -> None:
    # (40, 128): fewer images than dimensions, singular covariances, as on small FID sets.
    a, b = _sets(n, dim)
    reference = _frechet_by_sqrtm(a, b)
    assert frechet_distance(a, b) == pytest.approx(reference, rel=1e-6)


def test_identical_sets_give_zero() -> None:
    a, _ = _sets(50, 16)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_kid_equals_the_unbiased_mmd_when_subsets_are_whole_sets() -> None:
    a, b = _sets(60, 24)
    ours = kernel_inception_distance(a, b, subsets=3, subset_size=60)
    assert ours.mean == pytest.approx(_mmd_unbiased(a, b), rel=1e-9)
    assert ours.subsets == 1 and ours.std == 0.0 and ours.subset_size == 60
    capped = kernel_inception_distance(a, b, subsets=10, subset_size=1000)
    assert capped.subset_size == 60 and capped.mean == pytest.approx(ours.mean, rel=1e-12)


def test_kid_subsets_are_seeded_and_leave_the_global_generator_alone() -> None:
    a, b = _sets(80, 16)
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = kernel_inception_distance(np.abs(a), np.abs(b) * 1.1, subsets=10, subset_size=30, seed=5)
    assert torch.equal(torch.rand(1), expected_next)
    again = kernel_inception_distance(np.abs(a), np.abs(b) * 1.1, subsets=10, subset_size=30, seed=5)
    other = kernel_inception_distance(np.abs(a), np.abs(b) * 1.1, subsets=10, subset_size=30, seed=6)
    assert first == again and other.mean != first.mean and first.std > 0
    assert first.subsets == 10 and first.subset_size == 30


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
    with pytest.raises(MetricsError, match="at least 2"):
        kernel_inception_distance(a[:1], b)
    with pytest.raises(MetricsError, match="one dimension"):
        kernel_inception_distance(a, b[:, :4])
    with pytest.raises(MetricsError, match="at least one subset"):
        kernel_inception_distance(a, b, subsets=0)


def test_finite_sample_floor_and_compare() -> None:
    a, b = _sets(100, 8)
    floor = finite_sample_floor(a, n=50, repeats=3, kid_subsets=5)
    assert floor.fid > 0 and floor.fid_std > 0 and floor.n == 50 and floor.n_total == 100
    assert floor.fid < compare(a, b, kid_subsets=5).fid
    result = compare(a, b, kid_subsets=5, kid_subset_size=40)
    assert result.n_real == result.n_fake == 100 and result.kid_subset_size == 40 and result.kid_mean > 0
    with pytest.raises(MetricsError, match="need 102"):
        finite_sample_floor(a, n=51)
