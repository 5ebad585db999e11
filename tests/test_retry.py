"""The retry policy on a fake clock: a client waits out a restart of minutes, and no longer than --wait-timeout."""

from __future__ import annotations

import logging
import random

import grpc
import pytest

from collafuse.common.rpc import RetryPolicy, ServerUnreachable, call_with_retry


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return "connection refused"


class Clock:
    """Time that moves only when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.sleeps.append(seconds)
        self.now += seconds


class DownUntil:
    """A server that answers ``code`` until the clock reaches ``back_at``."""

    def __init__(self, clock: Clock, back_at: float, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> None:
        self.clock, self.back_at, self.code, self.calls = clock, back_at, code, 0

    def __call__(self) -> str:
        self.calls += 1
        if self.clock.now < self.back_at:
            raise FakeRpcError(self.code)
        return "ok"


def _call(server: DownUntil, clock: Clock, policy: RetryPolicy, **kwargs: object) -> str:
    return call_with_retry(server, policy, "Heartbeat", "h:1", rng=random.Random(0), sleep=clock.sleep, clock=clock,
                           **kwargs)  # type: ignore[arg-type]


def test_a_restart_of_minutes_is_waited_out_with_capped_full_jitter(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    policy = RetryPolicy(wait_timeout=600, initial_delay=0.5, max_delay=30, multiplier=2)
    server = DownUntil(clock, back_at=240)  # a 4-minute restart: far beyond the old ~15 s budget
    with caplog.at_level(logging.WARNING, logger="collafuse.common.rpc"):
        assert _call(server, clock, policy) == "ok"
    assert 240 <= clock.now < 240 + 30
    # Full jitter under an exponential cap that stops growing at max_delay.
    for attempt, pause in enumerate(clock.sleeps):
        assert 0 <= pause <= min(30, 0.5 * 2**attempt)
    assert max(clock.sleeps) > 15  # the cap is reached, the pauses are not all tiny
    assert server.calls == len(clock.sleeps) + 1
    # Each wait says what it waits for and how long it may still wait.
    assert "waiting for the server at h:1" in caplog.text and "--wait-timeout" in caplog.text


def test_gives_up_at_wait_timeout_with_a_plain_message() -> None:
    clock = Clock()
    server = DownUntil(clock, back_at=10_000)
    with pytest.raises(ServerUnreachable) as info:
        _call(server, clock, RetryPolicy(wait_timeout=120, max_delay=30))
    assert 120 <= clock.now <= 120 + 1e-9  # the last pause is cut to the remaining budget
    message = str(info.value)
    assert "h:1" in message and "--server HOST:PORT" in message and "--wait-timeout" in message


def test_attempts_cap_still_applies() -> None:
    clock = Clock()
    server = DownUntil(clock, back_at=10_000)
    with pytest.raises(ServerUnreachable, match="after 3 attempts"):
        _call(server, clock, RetryPolicy(wait_timeout=600, attempts=3))
    assert server.calls == 3 and len(clock.sleeps) == 2


@pytest.mark.parametrize(
    "code", [grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT,
             grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED],
)
def test_codes_a_retry_cannot_fix_stop_at_once(code: grpc.StatusCode) -> None:
    clock = Clock()
    server = DownUntil(clock, back_at=10_000, code=code)
    with pytest.raises(grpc.RpcError):
        _call(server, clock, RetryPolicy())
    assert server.calls == 1 and clock.sleeps == []


def test_deadline_exceeded_is_retried_only_for_idempotent_calls() -> None:
    clock = Clock()
    server = DownUntil(clock, back_at=5, code=grpc.StatusCode.DEADLINE_EXCEEDED)
    assert _call(server, clock, RetryPolicy(), idempotent=True) == "ok"
    clock = Clock()
    server = DownUntil(clock, back_at=5, code=grpc.StatusCode.DEADLINE_EXCEEDED)
    with pytest.raises(grpc.RpcError):
        _call(server, clock, RetryPolicy(), idempotent=False)
    assert server.calls == 1


def test_delay_does_not_overflow_after_many_attempts() -> None:
    policy = RetryPolicy(max_delay=30)
    assert 0 <= policy.delay(10_000, random.Random(0)) <= 30
    with pytest.raises(ValueError):
        RetryPolicy(attempts=0)
