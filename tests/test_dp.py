"""Differential privacy of what leaves a client: clipping, noise, what one release or split send costs (mu^2 under
replace-one), their exact composition, and epsilon. tests/test_dp_accounting.py checks the client's figures against
an independent computation with dp-accounting."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from collafuse.client.dp import (
    analytic_gaussian_epsilon,
    clip_per_sample,
    combined_noise_multiplier,
    epsilon_after,
    epsilon_of_mu2,
    gaussian_epsilon,
    gaussian_mu,
    gradient_mu2,
    gradient_noise_multiplier,
    per_sample_norms,
    privatize,
    release_epsilon,
    release_mu2,
    release_noise_multiplier,
    split_send_mu2,
)
from collafuse.common.schedule import ScheduleConfig

DELTA = 1e-5
AB = ScheduleConfig().alphas_cumprod()


def test_clipping_bounds_every_row_and_keeps_small_rows() -> None:
    gen = torch.Generator().manual_seed(0)
    grad = torch.randn(64, 1, 8, 8, generator=gen) * torch.logspace(-2, 2, 64).view(-1, 1, 1, 1)
    before = per_sample_norms(grad)
    clipped = clip_per_sample(grad, 1.5)
    after = per_sample_norms(clipped)
    assert bool((after <= 1.5).all())
    big = before > 1.5
    assert torch.allclose(after[big], torch.full_like(after[big], 1.5), rtol=1e-5)
    assert torch.equal(clipped[~big], grad[~big])
    # Direction is kept: clipping only scales.
    cos = torch.nn.functional.cosine_similarity(clipped.flatten(1), grad.flatten(1), dim=1)
    assert torch.allclose(cos, torch.ones_like(cos), atol=1e-6)


def test_noise_std_is_sigma_times_c() -> None:
    grad = torch.zeros(256, 1, 16, 16)
    noisy = privatize(grad, max_norm=0.5, noise_multiplier=1.3, generator=torch.Generator().manual_seed(1))
    std = float(noisy.std())
    assert std == pytest.approx(1.3 * 0.5, rel=0.01)
    assert torch.equal(privatize(grad + 2.0, 0.5, 0.0), clip_per_sample(grad + 2.0, 0.5))


def test_bad_parameters_say_what_to_do() -> None:
    with pytest.raises(ValueError, match="clipping norm"):
        clip_per_sample(torch.ones(2, 3), 0.0)
    with pytest.raises(ValueError, match="delta"):
        epsilon_after(1.0, 1.0, 10, delta=0.0)
    with pytest.raises(ValueError, match="subsampling"):  # no amplification is claimed for per-image rows
        epsilon_after(1.0, 0.1, 10, DELTA)
    with pytest.raises(ValueError, match="add/remove"):
        release_mu2(0.5, 64, "add_remove")  # type: ignore[arg-type]


def test_epsilon_and_mu_are_inverse_and_monotone() -> None:
    for mu in (0.05, 0.5, 1.0, 3.0, 20.0, 200.0):
        eps = gaussian_epsilon(mu, DELTA)
        assert gaussian_mu(eps, DELTA) == pytest.approx(mu, rel=1e-6)
    by_mu = [gaussian_epsilon(m, DELTA) for m in (0.1, 0.5, 1, 2, 8, 50)]
    assert all(a < b for a, b in itertools.pairwise(by_mu)), by_mu
    by_steps = [epsilon_after(4.0, 1.0, k, DELTA) for k in (1, 10, 100, 1000)]
    assert all(a < b for a, b in itertools.pairwise(by_steps)), by_steps
    # Composition is exact: k mechanisms at multiplier s are one at s / sqrt(k).
    assert epsilon_after(4.0, 1.0, 16, DELTA) == pytest.approx(analytic_gaussian_epsilon(1.0, DELTA), rel=1e-9)
    assert epsilon_of_mu2(0.0, DELTA) == 0.0 and math.isinf(epsilon_of_mu2(math.inf, DELTA))


def test_analytic_epsilon_meets_delta() -> None:
    from scipy.stats import norm

    s = 2.0
    eps = analytic_gaussian_epsilon(s, DELTA)
    delta = norm.cdf(1 / (2 * s) - eps * s) - math.exp(eps) * norm.cdf(-1 / (2 * s) - eps * s)
    assert delta == pytest.approx(DELTA, rel=1e-6)


def test_ambient_release_epsilon_is_stated_for_replace_one() -> None:
    d = 64
    values = [release_epsilon(float(AB[z]), d, DELTA) for z in (50, 100, 200, 500, 900)]
    exact = [float(v["epsilon_exact"]) for v in values]
    assert all(a > b for a, b in itertools.pairwise(exact)), exact
    assert all(v["relation"] == "replace" for v in values)
    # Any two images in [-1, 1]^d are 2 sqrt(d) apart: twice the distance to the zero image, half the multiplier.
    assert release_noise_multiplier(0.5, d) == pytest.approx(release_noise_multiplier(0.5, d, "zero") / 2)
    assert release_mu2(float(AB[200]), d) == pytest.approx(4 * d * float(AB[200]) / (1 - float(AB[200])))
    # The figures for "any two images" (replace-one), d = 64: 1,315 / 341 / 30 at cuts 100 / 200 / 500.
    assert [round(float(release_epsilon(float(AB[z]), d, DELTA)["epsilon_exact"])) for z in (100, 200, 500)] == [
        1315, 341, 30]
    # Cut 0 releases x_0 itself: no privacy.
    assert math.isinf(float(release_epsilon(1.0, d, DELTA)["epsilon_exact"]))
    # Two releases of one image at one level: twice the mu^2.
    twice = release_epsilon(float(AB[500]), d, DELTA, releases=2)["epsilon_exact"]
    assert twice == pytest.approx(epsilon_of_mu2(2 * release_mu2(float(AB[500]), d), DELTA))


def test_the_null_record_is_not_a_zero_gradient_row() -> None:
    """The zero image's gradient row is clip(2(eps_hat - eps)/d), not zero: two clipped rows differ by up to 2C under
    either relation, so the clipping bound is sigma C / 2C = sigma / 2 for both."""
    assert gradient_noise_multiplier(1.0) == gradient_noise_multiplier(1.0, "zero") == 0.5
    low_t = float(AB[101])  # where the clipping bound 2C is the binding one
    assert gradient_mu2(low_t, 64, 0.1, 0.5) == pytest.approx((2 * 0.1 / (0.5 * 0.1)) ** 2)
    assert gradient_mu2(low_t, 64, 0.1, 0.5, "zero") == pytest.approx((2 * 0.1 / (0.5 * 0.1)) ** 2)


def test_a_split_send_costs_its_x_t_and_its_gradient_row() -> None:
    d, clip, sigma = 256, 1.0, 1.0
    for t in (201, 600, 1000):
        ab = float(AB[t])
        p = ab / (1 - ab)
        # Given x_t, the row moves by at most (2/d) sqrt(p) per unit of x_0 (clipping is 1-Lipschitz).
        lipschitz = 2 / d * math.sqrt(p) * 2 * math.sqrt(d)
        expected = 4 * d * p + (min(2 * clip, lipschitz) / (sigma * clip)) ** 2
        assert split_send_mu2(ab, d, clip, sigma) == pytest.approx(expected)
    # At high t the gradient is nearly free: its information about x_0 shrinks with ab / (1 - ab).
    high = float(AB[950])
    assert gradient_mu2(high, d, clip, sigma) < 1e-3 * (2 / sigma) ** 2
    # Without noise on the gradient (no clipping, or sigma = 0) a send reveals the image.
    assert math.isinf(split_send_mu2(high, d, None, 0.0)) and math.isinf(split_send_mu2(high, d, 1.0, 0.0))


def test_split_step_counts_the_x_t_release_too() -> None:
    assert combined_noise_multiplier(1.0, 1.0) == pytest.approx(1 / math.sqrt(2))
    assert combined_noise_multiplier(2.0, math.inf) == pytest.approx(2.0)
    assert combined_noise_multiplier(0.0, 1.0) == 0.0


def test_zero_noise_is_infinite_epsilon() -> None:
    assert math.isinf(epsilon_after(0.0, 1.0, 1, DELTA))
    assert epsilon_after(math.inf, 1.0, 5, DELTA) == 0.0
