"""The retry policy on a fake clock: a client waits out a restart of minutes, and no longer than --wait-timeout;
a busy server's ``retry-after-ms`` hint is honoured, within bounds the client sets (and over real gRPC)."""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
import torch
from server_support import SHAPE, register, start, stub

from collafuse.client.connection import ServerConnection
from collafuse.common.rpc import RETRY_AFTER_KEY, RetryPolicy, ServerUnreachable, call_with_retry
from collafuse.v1 import collafuse_pb2


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, hint: str | None = None) -> None:
        self._code = code
        self._hint = hint

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return "connection refused" if self._hint is None else "the sampling queue is full"

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return () if self._hint is None else ((RETRY_AFTER_KEY, self._hint),)


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

    def __init__(self, clock: Clock, back_at: float, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE,
                 hint: str | None = None) -> None:
        self.clock, self.back_at, self.code, self.hint, self.calls = clock, back_at, code, hint, 0

    def __call__(self) -> str:
        self.calls += 1
        if self.clock.now < self.back_at:
            raise FakeRpcError(self.code, self.hint)
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


# ---- RESOURCE_EXHAUSTED with a retry-after-ms hint ---------------------------------------------------


def test_a_busy_server_is_retried_no_sooner_than_it_hints(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    server = DownUntil(clock, back_at=9, code=grpc.StatusCode.RESOURCE_EXHAUSTED, hint="2500")
    with caplog.at_level(logging.WARNING, logger="collafuse.common.rpc"):
        assert _call(server, clock, RetryPolicy(initial_delay=0.5, max_delay=30)) == "ok"
    assert server.calls == 5 and all(pause >= 2.5 for pause in clock.sleeps), clock.sleeps
    assert "the server is busy at h:1" in caplog.text


def test_a_hint_is_capped_and_the_wait_bounded_by_wait_timeout() -> None:
    clock = Clock()  # "come back in a day" gets max_delay; the client gives up at its own wait_timeout
    server = DownUntil(clock, back_at=10_000, code=grpc.StatusCode.RESOURCE_EXHAUSTED, hint="86400000")
    with pytest.raises(ServerUnreachable, match="stayed busy") as info:
        _call(server, clock, RetryPolicy(wait_timeout=100, max_delay=30))
    assert max(clock.sleeps) <= 30 and clock.now == pytest.approx(100)
    assert "--server HOST:PORT" not in str(info.value), "a busy server is not an unreachable one"
    # "0 ms" again and again still meets the growing backoff, not a tight loop.
    clock = Clock()
    server = DownUntil(clock, back_at=10_000, code=grpc.StatusCode.RESOURCE_EXHAUSTED, hint="0")
    with pytest.raises(ServerUnreachable):
        _call(server, clock, RetryPolicy(wait_timeout=300, max_delay=30))
    assert server.calls < 60


@pytest.mark.parametrize("hint", [None, "soon", "-5", "1e3", "99999999999"])
def test_resource_exhausted_without_a_valid_hint_stops_at_once(hint: str | None) -> None:
    clock = Clock()  # e.g. a message over the size limit: retrying the same bytes cannot help
    server = DownUntil(clock, back_at=10_000, code=grpc.StatusCode.RESOURCE_EXHAUSTED, hint=hint)
    with pytest.raises(grpc.RpcError):
        _call(server, clock, RetryPolicy())
    assert server.calls == 1 and clock.sleeps == []


def test_a_client_waits_out_a_full_sampling_queue_over_grpc(tmp_path: Path) -> None:
    """The server's per-client queue is full; ServerConnection.sample waits as hinted and then gets its images."""
    server = start(tmp_path / "store", start_trainer=False, sample_batch=16)
    try:
        api = stub(server)
        register(api, "c0", cut=1)
        server.sampler.limits = replace(server.sampler.limits, per_client=1)

        def sample_request(seed: int, steps: int) -> collafuse_pb2.SampleRequest:
            return collafuse_pb2.SampleRequest(client_id="c0", labels=[0, 1], seed=seed, num_inference_steps=steps,
                                               scheduler="ddpm", guidance_scale=1.0, cut=1)

        holding = api.Sample(sample_request(1, 0), timeout=120)  # all T steps: holds the client's one slot
        deadline = time.monotonic() + 20
        while server.sampler.queue_depth() != 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        drained = threading.Thread(target=lambda: list(holding))
        drained.start()
        sleeps: list[float] = []

        def sleep(seconds: float) -> None:
            sleeps.append(seconds)
            time.sleep(seconds)

        with ServerConnection(server.address, policy=RetryPolicy(wait_timeout=120), sleep=sleep) as conn:
            result = conn.sample(sample_request(2, 5), image_shape=SHAPE)
        drained.join(60)
        assert result.x_cut.shape == (2, *SHAPE) and torch.isfinite(result.x_cut).all()
        assert sleeps, "the first attempt was refused (RESOURCE_EXHAUSTED) and retried after the server's hint"
        assert conn.traffic["Sample"].attempts == len(sleeps) + 1
    finally:
        server.stop(0)
