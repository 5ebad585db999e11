"""Schedule and cut arithmetic (DESIGN 1)."""

from __future__ import annotations

import pytest
import torch

from collafuse.common.sampling import chain_timesteps, count_model_evaluations, split_timesteps
from collafuse.common.schedule import ScheduleConfig, fingerprint, server_evaluates, validate_cut


def test_alphas_cumprod_is_one_based_with_alpha_bar_zero_equal_one() -> None:
    schedule = ScheduleConfig()
    ab = schedule.alphas_cumprod()
    inner = schedule.ddpm().alphas_cumprod.double()
    assert ab.shape == (1001,)
    assert ab[0] == 1.0
    assert torch.equal(ab[1:], inner)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    assert torch.allclose(ab[1:], torch.cumprod(1 - betas, 0), rtol=1e-6)


def test_owner_rule_follows_paper_time() -> None:
    # 0-based index i is the paper's t = i + 1; the server owns t > cut.
    assert server_evaluates(200, 200) and not server_evaluates(199, 200)
    assert all(server_evaluates(i, 0) for i in range(1000))
    assert not any(server_evaluates(i, 1000) for i in range(1000))


@pytest.mark.parametrize("cut,server,client", [(0, 1000, 0), (200, 800, 200), (1000, 0, 1000)])
def test_full_chain_split_counts(cut: int, server: int, client: int) -> None:
    assert count_model_evaluations(ScheduleConfig(), "ddpm", 0, cut) == (server, client)


def test_strided_chain_split() -> None:
    steps = chain_timesteps(ScheduleConfig(), "ddpm", 100)
    assert steps[0] == 990 and steps[-1] == 0 and len(steps) == 100
    server, client = split_timesteps(steps, 200)
    assert server[-1] == 200 and client[0] == 190
    assert server + client == steps


def test_validate_cut_bounds() -> None:
    assert validate_cut(0, 1000) == 0 and validate_cut(1000, 1000) == 1000
    with pytest.raises(ValueError, match="outside"):
        validate_cut(1001, 1000)
    with pytest.raises(ValueError, match="outside"):
        validate_cut(-1, 1000)


def test_fingerprint_changes_with_every_shared_part() -> None:
    base = fingerprint(ScheduleConfig(), (1, 16, 16), ["0", "1"])
    assert base == fingerprint(ScheduleConfig(), (1, 16, 16), ["0", "1"])
    assert base != fingerprint(ScheduleConfig(beta_end=0.03), (1, 16, 16), ["0", "1"])
    assert base != fingerprint(ScheduleConfig(), (1, 32, 32), ["0", "1"])
    assert base != fingerprint(ScheduleConfig(), (1, 16, 16), ["1", "0"])
