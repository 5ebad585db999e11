"""Schedule and cut arithmetic (docs/design.md §1)."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from collafuse.common.sampling import make_chain, timesteps_by_owner
from collafuse.common.schedule import (
    ScheduleConfig,
    ScheduleError,
    fingerprint,
    server_evaluates,
    validate_cut,
)


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
    assert make_chain(ScheduleConfig(), "ddpm", 0, cut).evaluations(cut) == (server, client)


def test_strided_chain_split() -> None:
    steps = list(make_chain(ScheduleConfig(), "ddpm", 100, 200).timesteps)
    # Shifted by (200 - 1) mod 10 = 9 so that the hand-off is exactly at t = 200 (0-based 199).
    assert steps[0] == 999 and steps[-1] == 9 and len(steps) == 100
    server, client = timesteps_by_owner(steps, 200)
    assert server[-1] == 209 and client[0] == 199
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


def _wire(config: dict[str, object]) -> tuple[str, str]:
    text = json.dumps(config, sort_keys=True)
    return text, hashlib.sha256(text.encode()).hexdigest()


def test_wire_carries_diffusers_config_and_both_sides_rebuild_the_same_schedulers() -> None:
    schedule = ScheduleConfig(num_train_timesteps=50, beta_end=0.03)
    received = ScheduleConfig.from_wire(schedule.config_json(), schedule.config_digest())
    assert received == schedule
    assert json.loads(schedule.config_json())["prediction_type"] == "epsilon"
    for kind in ("ddpm", "ddim"):
        assert torch.equal(received.scheduler(kind).alphas_cumprod, schedule.scheduler(kind).alphas_cumprod)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "change,message",
    [
        ({"beta_start": 1e-9}, "alpha_bar_1 rounds to 1.0"),  # the NaN guard
        ({"trained_betas": [0.1, 0.0, 0.2]}, "not strictly decreasing"),
        ({"trained_betas": [0.1, float("nan")]}, "NaN or infinite"),
        ({"prediction_type": "v_prediction"}, "options this side does not support"),
        ({"rescale_betas_zero_snr": True}, "alpha_bar_T is 0"),
        ({"num_train_timesteps": 12_000, "beta_end": 2e-4}, "num_train_timesteps"),
        ({"beta_schedule": "bogus"}, "does not rebuild"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_a_bent_schedule_from_the_wire_is_refused(change: dict[str, object], message: str) -> None:
    config = {**ScheduleConfig().diffusers_config(), **change}
    with pytest.raises(ScheduleError, match=message):
        ScheduleConfig.from_wire(*_wire(config))


def test_wire_config_must_match_its_digest_and_be_a_json_object() -> None:
    schedule = ScheduleConfig()
    with pytest.raises(ScheduleError, match="digest"):
        ScheduleConfig.from_wire(schedule.config_json(), ScheduleConfig(beta_end=0.03).config_digest())
    with pytest.raises(ScheduleError, match="not valid JSON"):
        ScheduleConfig.from_wire(*_wire_text("{not json"))
    with pytest.raises(ScheduleError, match="JSON object"):
        ScheduleConfig.from_wire(*_wire_text("[1, 2]"))


def _wire_text(text: str) -> tuple[str, str]:
    return text, hashlib.sha256(text.encode()).hexdigest()


def test_nan_guard_rejects_a_schedule_whose_first_alpha_bar_rounds_to_one() -> None:
    with pytest.raises(ValueError, match="alpha_bar_1 rounds to 1.0 .*raise beta_start"):
        ScheduleConfig(beta_start=1e-8)
    assert ScheduleConfig(beta_start=3e-8).alphas_cumprod()[1] < 1.0


def test_client_refuses_a_bent_server_schedule_with_a_clear_error() -> None:
    from collafuse.client.connection import schedule_from_spec
    from collafuse.client.errors import ClientError
    from collafuse.v1 import collafuse_pb2

    good = ScheduleConfig(num_train_timesteps=50)
    spec = collafuse_pb2.ScheduleSpec(config_json=good.config_json(), fingerprint=good.config_digest())
    assert schedule_from_spec(spec) == good
    text, digest = _wire({**good.diffusers_config(), "beta_start": 1e-9})
    with pytest.raises(ClientError, match="server sent a schedule this client refuses: alpha_bar_1 rounds to 1.0"):
        schedule_from_spec(collafuse_pb2.ScheduleSpec(config_json=text, fingerprint=digest))
    with pytest.raises(ClientError, match="no scheduler config"):
        schedule_from_spec(collafuse_pb2.ScheduleSpec())
