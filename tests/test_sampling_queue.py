"""The sampling queue over gRPC: fair across clients, bounded, cancellable, and cross-client batching that
changes no client's result (server/sampler.py)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
import torch
from server_support import SHAPE, register, rpc_error, start, stub

from collafuse.common.codec import decode
from collafuse.common.rpc import RETRY_AFTER_KEY
from collafuse.server.app import CollaFuseServer
from collafuse.v1 import collafuse_pb2, collafuse_pb2_grpc

torch.set_num_threads(1)
HEARTBEAT_DEADLINE_S = 3.0
# Client -> registered cut: different cuts, so images leave a merged batch at different steps.
CUTS = {"alice": 10, "bob": 20, "carol": 35, "dave": 20, "flood": 1, "other": 1, "watcher": 10}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CollaFuseServer]:
    running = start(tmp_path_factory.mktemp("queue"), start_trainer=False, sample_batch=16)
    api = stub(running)
    for client_id, cut in CUTS.items():
        register(api, client_id, cut=cut)
    yield running
    running.stop(0)


@pytest.fixture()
def limits(server: CollaFuseServer) -> Iterator[None]:
    """Each test sets the limits it needs on the shared server; they are restored after it."""
    saved = server.sampler.limits
    yield
    server.sampler.limits = saved


def request(client_id: str, labels: list[int], seed: int, steps: int = 10, kind: str = "ddpm",
            guidance: float = 1.0) -> collafuse_pb2.SampleRequest:
    return collafuse_pb2.SampleRequest(client_id=client_id, labels=labels, seed=seed, num_inference_steps=steps,
                                       scheduler=kind, guidance_scale=guidance, cut=CUTS[client_id])


def hand_off(api: collafuse_pb2_grpc.CollaFuseStub, req: collafuse_pb2.SampleRequest) -> torch.Tensor:
    events = list(api.Sample(req, timeout=120))
    return torch.cat([decode(e.chunk.x, shape=(None, *SHAPE)) for e in events if e.WhichOneof("event") == "chunk"])


def wait_depth(server: CollaFuseServer, depth: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while server.sampler.queue_depth() != depth:
        assert time.monotonic() < deadline, f"queue depth stayed {server.sampler.queue_depth()}, wanted {depth}"
        time.sleep(0.01)


# Same key (ddpm, 10 steps, guidance 1) for alice, bob, carol: merged; dave's guidance 2 keeps him apart.
MIXED = [
    request("alice", [0, 1, 2, 0, 1], seed=1),
    request("bob", [2, 2, 1], seed=2),
    request("carol", [0, 1, 2, 3, 0, 1, 2], seed=3),
    request("dave", [1, 0], seed=4, guidance=2.0),
    request("alice", [1, 1], seed=5, kind="ddim", steps=5),
]


def concurrent_hand_offs(server: CollaFuseServer) -> list[torch.Tensor]:
    api = stub(server)
    results: list[torch.Tensor | None] = [None] * len(MIXED)

    def one(i: int) -> None:
        results[i] = hand_off(api, MIXED[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(MIXED))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert all(r is not None for r in results)
    return [r for r in results if r is not None]


def test_cross_client_batching_changes_no_result(server: CollaFuseServer, limits: None) -> None:
    sampler = server.sampler
    # Alone: each request in its own model calls.
    sampler.limits = replace(sampler.limits, cross_client=False)
    calls = sampler.model_calls
    alone = concurrent_hand_offs(server)
    alone_calls = sampler.model_calls - calls
    # Merged: a long wait so the concurrent requests surely meet in one batch.
    sampler.limits = replace(sampler.limits, cross_client=True, max_wait_s=0.5)
    calls = sampler.model_calls
    merged = concurrent_hand_offs(server)
    merged_calls = sampler.model_calls - calls
    assert merged_calls < alone_calls, "no requests were merged"
    for i, (a, b) in enumerate(zip(alone, merged, strict=True)):
        assert a.shape == b.shape
        rel = float((a - b).norm() / a.norm())
        assert rel <= 1e-6, (MIXED[i].client_id, rel)


def test_a_flooding_client_does_not_starve_the_others(server: CollaFuseServer, limits: None) -> None:
    sampler = server.sampler
    sampler.limits = replace(sampler.limits, per_client=4, cross_client=True, max_wait_s=0.0)
    api = stub(server)
    finished: list[str] = []
    lock = threading.Lock()

    def sample(req: collafuse_pb2.SampleRequest, name: str) -> None:
        hand_off(api, req)
        with lock:
            finished.append(name)

    # 4 long requests of the flooding client: its share of the queue.
    flood = [threading.Thread(target=sample, args=(request("flood", [0] * 16, seed=i, steps=0), f"flood-{i}"))
             for i in range(4)]
    for thread in flood:
        thread.start()
    wait_depth(server, 4)
    # A fifth is refused at once, with a hint of when to come back.
    error = rpc_error(api.Sample, request("flood", [0], seed=9))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "at most 4 per client" in (error.details() or "")
    hint = dict(error.trailing_metadata() or ())
    assert int(hint[RETRY_AFTER_KEY]) > 0

    # Meanwhile Heartbeats of a third client stay well inside their deadline.
    heartbeats: list[float] = []
    stop = threading.Event()

    def beat() -> None:
        while not stop.is_set():
            began = time.monotonic()
            api.Heartbeat(collafuse_pb2.HeartbeatRequest(client_id="watcher"), timeout=HEARTBEAT_DEADLINE_S)
            heartbeats.append(time.monotonic() - began)
            time.sleep(0.02)

    beater = threading.Thread(target=beat)
    beater.start()
    began = time.monotonic()
    # Another key (guidance 2): it cannot ride along in the flood's batches, it has to be given a turn.
    sample(request("other", [1] * 16, seed=7, steps=0, guidance=2.0), "other")
    waited = time.monotonic() - began
    for thread in flood:
        thread.join(120)
    stop.set()
    beater.join(10)

    # Round-robin: at most the flood's running batch and the one taken before "other" arrived go first
    # (first-come-first-served would run all four).
    assert finished.index("other") <= 2, finished
    assert waited < 60, waited
    assert heartbeats and max(heartbeats) < HEARTBEAT_DEADLINE_S / 3, max(heartbeats)


def test_the_total_queue_is_bounded(server: CollaFuseServer, limits: None) -> None:
    sampler = server.sampler
    sampler.limits = replace(sampler.limits, per_client=4, total=2, max_wait_s=0.0)
    api = stub(server)
    calls = [api.Sample(request(name, [0] * 16, seed=1, steps=0), timeout=120) for name in ("alice", "bob")]
    try:
        wait_depth(server, 2)
        error = rpc_error(api.Sample, request("carol", [0], seed=1))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "sampling queue is full" in (error.details() or "")
        assert RETRY_AFTER_KEY in dict(error.trailing_metadata() or ())
    finally:
        for call in calls:
            call.cancel()
    wait_depth(server, 0)


def test_cancelling_a_call_frees_its_slot(server: CollaFuseServer, limits: None) -> None:
    sampler = server.sampler
    sampler.limits = replace(sampler.limits, per_client=1, max_wait_s=0.0)
    api = stub(server)
    first = api.Sample(request("alice", [0] * 16, seed=1, steps=0), timeout=120)
    next(iter(first))  # admitted: its first progress event came
    assert rpc_error(api.Sample, request("alice", [0], seed=2)).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    first.cancel()
    wait_depth(server, 0, timeout=5)
    assert hand_off(api, request("alice", [0, 1], seed=2, steps=5)).shape == (2, *SHAPE)


def test_shutdown_ends_queued_and_running_calls(tmp_path: Path) -> None:
    running = start(tmp_path, start_trainer=False, sample_batch=16, sample_queue_per_client=8)
    api = stub(running)
    register(api, "alice", cut=1)
    calls = [api.Sample(collafuse_pb2.SampleRequest(client_id="alice", labels=[0] * 16, seed=i, cut=1), timeout=120)
             for i in range(6)]
    wait_depth(running, 6)
    began = time.monotonic()
    running.stop(1.0)
    assert time.monotonic() - began < 10
    for call in calls:
        with pytest.raises(grpc.RpcError) as caught:
            list(call)
        assert caught.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
