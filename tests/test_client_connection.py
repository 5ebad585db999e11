"""The connection: retries with backoff, plain errors, streamed calls, byte counts."""

from __future__ import annotations

import random
import time

import grpc
import pytest
import torch
from client_fake_server import FakeServer, FakeState, closed_port

from collafuse.client.connection import ServerConnection, end_of_stream
from collafuse.client.errors import ClientError
from collafuse.common.codec import encode
from collafuse.common.models import as_denoiser
from collafuse.common.rpc import RetryPolicy, ServerUnreachable, call_with_retry
from collafuse.common.sampling import make_chain, server_half
from collafuse.v1 import collafuse_pb2

torch.set_num_threads(1)


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str = "") -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class Flaky:
    """Fails with ``code`` ``failures`` times, then answers."""

    def __init__(self, failures: int, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> None:
        self.failures, self.code, self.calls = failures, code, 0

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise FakeRpcError(self.code, "connection refused")
        return "ok"


def test_retry_backs_off_with_jitter_then_succeeds():
    sleeps: list[float] = []
    policy = RetryPolicy(attempts=5, initial_delay=0.5, max_delay=1.5, multiplier=2.0)
    flaky = Flaky(3)
    assert call_with_retry(flaky, policy, "Heartbeat", "h:1", rng=random.Random(0), sleep=sleeps.append) == "ok"
    assert flaky.calls == 4 and len(sleeps) == 3
    # Full jitter: each pause lies in [0, min(max_delay, initial * multiplier**attempt)].
    for attempt, pause in enumerate(sleeps):
        assert 0 <= pause <= min(1.5, 0.5 * 2**attempt)


def test_retry_gives_up_with_a_plain_message_and_does_not_retry_other_codes():
    sleeps: list[float] = []
    flaky = Flaky(10, grpc.StatusCode.DEADLINE_EXCEEDED)
    with pytest.raises(ServerUnreachable) as info:
        call_with_retry(flaky, RetryPolicy(attempts=3), "Register", "example:50051", sleep=sleeps.append)
    assert flaky.calls == 3 and len(sleeps) == 2
    message = str(info.value)
    assert "Register" in message and "example:50051" in message and "after 3 attempts" in message
    assert "--server HOST:PORT" in message
    bad = Flaky(10, grpc.StatusCode.INVALID_ARGUMENT)
    with pytest.raises(grpc.RpcError):
        call_with_retry(bad, RetryPolicy(attempts=3), "Register", "example:50051", sleep=sleeps.append)
    assert bad.calls == 1


def test_unreachable_server_becomes_server_unreachable_quickly():
    sleeps: list[float] = []
    target = f"127.0.0.1:{closed_port()}"
    started = time.perf_counter()
    with ServerConnection(target, policy=RetryPolicy(attempts=2), rpc_timeout=5, sleep=sleeps.append) as conn:
        with pytest.raises(ServerUnreachable, match=rf"{target}.*after 2 attempts"):
            conn.heartbeat("c1")
        assert conn.traffic["Heartbeat"].attempts == 2
    assert len(sleeps) == 1
    assert time.perf_counter() - started < 10


def test_server_refusals_become_client_errors_with_the_servers_message():
    with FakeServer() as fake, ServerConnection(fake.target, sleep=lambda s: None) as conn:
        with pytest.raises(ClientError, match=r"server rejected Register \(INVALID_ARGUMENT\): unknown classes \['9'\]") as info:
            conn.register("c1", 20, "ambient", ["0", "9"])
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert conn.traffic["Register"].attempts == 1  # not retried
        info_ok = conn.register("c1", 20, "ambient", ["0"])
        assert info_ok.image_shape == (1, 8, 8) and info_ok.class_names == ["0", "1", "2"]
        assert info_ok.schedule.num_train_timesteps == 50 and info_ok.schedule.beta_start == 1e-4
        assert conn.traffic["Register"].bytes_received > 0


def test_release_retry_recreates_the_stream_from_its_factory():
    made = []
    chunk = collafuse_pb2.ReleaseChunk(client_id="c1", cut=20)
    chunk.items.add(image_key="k", label=0).x_cut.CopyFrom(encode(torch.zeros(1, 8, 8)))

    def factory():  # type: ignore[no-untyped-def]
        made.append(1)
        yield chunk

    with (
        FakeServer(FakeState(lose_release_acks=1)) as fake,
        ServerConnection(fake.target, policy=RetryPolicy(attempts=3), sleep=lambda s: None) as conn,
    ):
        ack = conn.release(factory)
        assert len(made) == 2 and ack.duplicates == 1 and ack.total_for_client == 1
        # The final message goes out with the end-of-stream marker (last, total_items).
        assert conn.traffic["Release"].bytes_sent == 2 * next(end_of_stream([chunk])).ByteSize()


def test_sample_assembles_the_streamed_hand_off_and_reports_progress():
    with FakeServer(FakeState(sample_chunk_images=2)) as fake:
        request = collafuse_pb2.SampleRequest(
            client_id="c1", labels=[0, 1, 2, 0, 1], seed=3, num_inference_steps=10, scheduler="ddpm",
            guidance_scale=1.0, cut=20,
        )
        progress: list[tuple[int, int]] = []
        with ServerConnection(fake.target) as conn:
            result = conn.sample(request, (1, 8, 8), lambda d, t: progress.append((d, t)))
        expected = server_half(
            as_denoiser(fake.servicer.model), make_chain(fake.servicer.state.schedule, "ddpm", 10, 20),
            torch.tensor([0, 1, 2, 0, 1]), 3, 20, (1, 8, 8),
        )
        torch.testing.assert_close(result.x_cut, expected, rtol=0, atol=0)
        assert result.server_steps == 6 and progress[-1] == (6, 6)
        assert conn.traffic["Sample"].bytes_received > expected.numel() * 4
