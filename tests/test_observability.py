"""Prometheus metrics (--metrics-port): scraped over HTTP from a real in-process server during a short run."""

from __future__ import annotations

import math
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from server_support import chunks, register, rpc_error, start, stub, upload, wait_phase

from collafuse.common.config import ServerSettings
from collafuse.common.rpc import open_channel
from collafuse.server.app import CollaFuseServer
from collafuse.server.errors import PortInUse
from collafuse.server.observability import RpcMetricsInterceptor
from collafuse.v1 import collafuse_pb2, collafuse_pb2_grpc

torch.set_num_threads(1)
TOKEN = "observability-test-token"
STEPS = 3
RELEASES = 6
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text) for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels`` (0 when none)."""
    wanted = set(labels.items())
    return sum(v for (n, have), v in samples.items() if n == name and wanted <= have)


def handled(samples: Samples, method: str, code: str) -> float:
    return value(samples, "grpc_server_handled_total", grpc_method=method, grpc_code=code)


@pytest.fixture()
def observed(tmp_path: Path) -> Iterator[CollaFuseServer]:
    # A token: the auth interceptor stays first, and its denials are exported on their own.
    running = start(tmp_path / "store", metrics_port=free_port(), max_steps=STEPS, token=TOKEN)
    yield running
    running.stop(0)


def test_counters_move_during_a_short_run(observed: CollaFuseServer) -> None:
    assert observed.metrics is not None and observed.metrics.port is not None
    port = observed.metrics.port
    api = stub(observed, token=TOKEN)

    # The trainer thread leaves "idle" for "waiting" a moment after the server starts.
    waited = time.monotonic() + 10
    while value(before := scrape(port), "collafuse_training_phase", collafuse_training_phase="waiting") != 1:
        assert time.monotonic() < waited, "the exported phase never became 'waiting'"
        time.sleep(0.05)
    assert value(before, "collafuse_training_step") == 0
    assert value(before, "collafuse_releases") == 0
    assert value(before, "process_resident_memory_bytes") > 0
    assert value(before, "collafuse_sampling_queue_depth") == 0
    for counter in ("collafuse_transcript_unrecorded_total", "collafuse_split_clients_dropped_total",
                    "collafuse_split_steps_left_out_total"):
        assert value(before, counter) == 0, counter

    register(api, "alice", cut=20)
    api.Heartbeat(collafuse_pb2.HeartbeatRequest(client_id="alice"), timeout=10)
    # Failing calls of three kinds: a unary abort, a client stream refused, a server stream aborted mid-handler.
    assert rpc_error(api.Register, collafuse_pb2.RegisterRequest(client_id="bob", cut=10_000)).code() \
        == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_error(api.Release, iter(chunks("nobody", 20, 2, 2))).code() == grpc.StatusCode.FAILED_PRECONDITION
    assert rpc_error(api.Sample, collafuse_pb2.SampleRequest(client_id="alice")).code() \
        == grpc.StatusCode.INVALID_ARGUMENT
    # No token: refused by the auth interceptor before the metrics interceptor sees the call.
    anonymous = collafuse_pb2_grpc.CollaFuseStub(open_channel(observed.address))
    assert rpc_error(anonymous.Heartbeat, collafuse_pb2.HeartbeatRequest(client_id="alice")).code() \
        == grpc.StatusCode.UNAUTHENTICATED
    upload(api, chunks("alice", 20, RELEASES, 3))

    during = scrape(port)  # the trainer may or may not have started: the RPC counts are settled
    assert handled(during, "Register", "OK") == 1
    assert handled(during, "Register", "INVALID_ARGUMENT") == 1
    assert handled(during, "Heartbeat", "OK") == 1
    assert handled(during, "Release", "OK") == 1
    assert handled(during, "Release", "FAILED_PRECONDITION") == 1
    assert value(during, "grpc_server_handled_total", grpc_method="Release", grpc_type="client_stream") == 2
    assert handled(during, "Sample", "INVALID_ARGUMENT") == 1
    assert value(during, "grpc_server_handled_total", grpc_method="Sample", grpc_type="server_stream") == 1
    assert handled(during, "Heartbeat", "UNAUTHENTICATED") == 0
    assert value(during, "collafuse_auth_denied_total") == 1
    assert value(during, "grpc_server_handling_seconds_count", grpc_method="Register", grpc_code="OK") == 1
    assert value(during, "grpc_server_handling_seconds_sum", grpc_method="Register", grpc_code="OK") > 0
    assert value(during, "grpc_server_started_total", grpc_method="Register") == 2
    assert value(during, "collafuse_releases") == RELEASES
    assert value(during, "collafuse_clients_registered") == 1
    assert value(during, "collafuse_clients_with_releases") == 1
    assert value(during, "collafuse_received_bytes_total") > value(before, "collafuse_received_bytes_total")

    wait_phase(api, "done")
    after = scrape(port)
    assert value(after, "collafuse_training_step") == STEPS > value(before, "collafuse_training_step")
    assert math.isfinite(value(after, "collafuse_training_loss")) and value(after, "collafuse_training_loss") > 0
    assert value(after, "collafuse_training_phase", collafuse_training_phase="done") == 1
    assert value(after, "collafuse_training_phase", collafuse_training_phase="waiting") == 0
    statuses = handled(after, "Status", "OK")
    assert statuses >= 1 and value(after, "grpc_server_handling_seconds_count", grpc_method="Status") == statuses

    observed.stop(0)
    with pytest.raises(urllib.error.URLError):
        scrape(port)


def _listening_ports() -> set[int]:
    """TCP ports this process listens on (Linux /proc)."""
    inodes = set()
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = fd.readlink().as_posix()
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_metrics_are_off_by_default(tmp_path: Path) -> None:
    assert ServerSettings().metrics_port == 0
    before = _listening_ports()
    running = start(tmp_path, start_trainer=False)
    try:
        assert running.metrics is None
        assert _listening_ports() - before == {running.port}, "only the gRPC port opens without --metrics-port"
    finally:
        running.stop(0)


def test_a_taken_metrics_port_fails_startup_clearly(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(PortInUse, match=f"--metrics-port {port} is in use"):
            start(tmp_path, start_trainer=False, metrics_port=port)
    start(tmp_path, start_trainer=False).stop(0)  # the failed start released the store


def test_dropped_streams_and_deadlines_are_counted_by_their_code() -> None:
    """Calls that end on the client's side: a stream cancelled mid-way, a unary call past its deadline."""
    metrics = RpcMetricsInterceptor(CollectorRegistry())
    release = threading.Event()

    def ticks(_request: bytes, _context: grpc.ServicerContext) -> Iterator[bytes]:
        for _ in range(100):
            yield b"tick"
            release.wait(0.2)

    entered = threading.Event()

    def slow(_request: bytes, _context: grpc.ServicerContext) -> bytes:
        entered.set()
        release.wait(5.0)
        return b"late"

    handlers = grpc.method_handlers_generic_handler("test.Slow", {
        "Ticks": grpc.unary_stream_rpc_method_handler(ticks),
        "Wait": grpc.unary_unary_rpc_method_handler(slow),
    })
    server = grpc.server(ThreadPoolExecutor(max_workers=4), interceptors=[metrics])
    server.add_generic_rpc_handlers((handlers,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stream = channel.unary_stream("/test.Slow/Ticks")(b"", timeout=30)
            assert next(stream) == b"tick"
            stream.cancel()
            with pytest.raises(grpc.RpcError) as late:
                # A future, so the test knows the handler ran: on a loaded machine a call can expire before
                # it is dispatched, and a call no handler saw is not the server's to count.
                call = channel.unary_unary("/test.Slow/Wait").future(b"", timeout=2.0)
                assert entered.wait(10.0), "the server never dispatched the call"
                call.result()
            assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # The server's copy of the deadline ends a few ms after the client's: let it pass too, so the handler
        # really returns past its deadline (before it, the server would rightly count the call OK).
        time.sleep(0.3)
        release.set()

        def count(method: str, code: str) -> float:
            return metrics.handled.labels("server_stream" if method == "Ticks" else "unary", "test.Slow", method,
                                          code)._value.get()

        deadline = time.monotonic() + 10
        while (count("Ticks", "CANCELLED"), count("Wait", "DEADLINE_EXCEEDED")) != (1, 1):
            assert time.monotonic() < deadline, (
                f"the dropped calls were not recorded with their codes: {count('Ticks', 'CANCELLED')=}, "
                f"{count('Wait', 'DEADLINE_EXCEEDED')=}, {count('Wait', 'CANCELLED')=}, {count('Wait', 'OK')=}, "
                f"{count('Wait', 'UNKNOWN')=}")
            time.sleep(0.05)
        assert count("Ticks", "OK") == 0 and count("Wait", "OK") == 0
    finally:
        server.stop(0)
