"""Differential privacy of what leaves a client: clipping, noise, accountant, budget, the ambient release's epsilon."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from collafuse.client.dp import (
    RDP_ORDERS,
    PrivacyAccountant,
    PrivacyBudget,
    PrivacyBudgetExceeded,
    analytic_gaussian_epsilon,
    clip_per_sample,
    combined_noise_multiplier,
    epsilon_after,
    gaussian_rdp,
    per_sample_norms,
    privatize,
    release_epsilon,
    release_noise_multiplier,
)
from collafuse.common.schedule import ScheduleConfig

DELTA = 1e-5


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
        epsilon_after(1.0, 0.1, 10, delta=0.0)
    with pytest.raises(ValueError, match="sample rate"):
        PrivacyAccountant().step(1.0, 0.0)


def test_epsilon_decreases_with_noise_and_grows_with_steps() -> None:
    by_sigma = [epsilon_after(s, 0.01, 1000, DELTA) for s in (0.6, 0.8, 1.0, 2.0, 4.0)]
    assert all(a > b for a, b in itertools.pairwise(by_sigma)), by_sigma
    by_steps = [epsilon_after(1.0, 0.01, k, DELTA) for k in (10, 100, 1000, 10_000)]
    assert all(a < b for a, b in itertools.pairwise(by_steps)), by_steps


def test_rdp_matches_the_gaussian_closed_form() -> None:
    """q = 1: RDP at order a is a / (2 s^2); epsilon = min_a rdp - (ln delta + ln a)/(a - 1) + ln((a - 1)/a)."""
    sigma, steps = 3.0, 4
    closed = min(
        steps * gaussian_rdp(a, sigma) - (math.log(DELTA) + math.log(a)) / (a - 1) + math.log((a - 1) / a)
        for a in RDP_ORDERS
    )
    assert epsilon_after(sigma, 1.0, steps, DELTA) == pytest.approx(closed, rel=1e-9)
    # RDP is an upper bound on the exact (analytic) epsilon of one Gaussian mechanism, and not a loose one.
    exact = analytic_gaussian_epsilon(sigma, DELTA)
    rdp_one = epsilon_after(sigma, 1.0, 1, DELTA)
    assert exact < rdp_one < 1.5 * exact


def test_analytic_epsilon_meets_delta() -> None:
    from scipy.stats import norm

    s = 2.0
    eps = analytic_gaussian_epsilon(s, DELTA)
    delta = norm.cdf(1 / (2 * s) - eps * s) - math.exp(eps) * norm.cdf(-1 / (2 * s) - eps * s)
    assert delta == pytest.approx(DELTA, rel=1e-6)


def test_ambient_release_epsilon_falls_as_the_cut_grows() -> None:
    ab = ScheduleConfig().alphas_cumprod()
    d = 64
    values = [release_epsilon(float(ab[z]), d, DELTA) for z in (50, 100, 200, 500, 900)]
    exact = [v["epsilon_exact"] for v in values]
    assert all(a > b for a, b in itertools.pairwise(exact)), exact
    assert all(v["epsilon_exact"] <= v["epsilon_rdp"] for v in values)
    # Cut 0 releases x_0 itself: no privacy.
    assert math.isinf(release_epsilon(1.0, d, DELTA)["epsilon_exact"])
    # Replace-one doubles the sensitivity: half the multiplier.
    assert release_noise_multiplier(0.5, d, "replace") == pytest.approx(release_noise_multiplier(0.5, d) / 2)


def test_split_step_counts_the_x_t_release_too() -> None:
    assert combined_noise_multiplier(1.0, 1.0) == pytest.approx(1 / math.sqrt(2))
    assert combined_noise_multiplier(2.0, math.inf) == pytest.approx(2.0)
    assert combined_noise_multiplier(0.0, 1.0) == 0.0


def test_budget_refuses_the_step_that_would_exceed_it() -> None:
    budget = PrivacyBudget.new(epsilon=2.0, delta=DELTA)
    taken = 0
    with pytest.raises(PrivacyBudgetExceeded, match="--dp-epsilon 2"):
        for _ in range(10_000):
            budget.charge(1.1, 0.02, steps=10)
            taken += 10
    assert 0 < taken < 100_000
    assert budget.spent() <= 2.0
    assert not budget.allows(1.1, 0.02, 10)
    # Round trip through the ledger's JSON keeps the spend.
    restored = PrivacyAccountant.from_state_dict(budget.accountant.state_dict())
    assert restored.epsilon(DELTA) == pytest.approx(budget.spent())
    assert restored.steps == taken


def test_zero_noise_is_infinite_epsilon() -> None:
    accountant = PrivacyAccountant()
    accountant.step(1.0, 0.1, 5)
    accountant.step(0.0, 0.1)
    assert math.isinf(accountant.epsilon(DELTA))
