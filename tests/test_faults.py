"""Faults on loopback: SIGTERM after undecodable streams, a wedged gRPC stop, a server restart under a client."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from client_fake_server import make_image_folder
from server_support import CLASSES, chunks, register, start, stub, upload

from collafuse.client.connection import ServerConnection
from collafuse.common.rpc import RetryPolicy, open_channel
from collafuse.server.app import STOP_MARGIN_S
from collafuse.v1 import collafuse_pb2, collafuse_pb2_grpc

torch.set_num_threads(1)

TINY = ["--host", "127.0.0.1", "--device", "cpu", "--image-size", "8", "--channels", "1", "--model-preset", "tiny",
        "--num-train-timesteps", "50", "--classes", *CLASSES, "--threads", "1", "--batch-size", "4"]
GRACE_S = 5.0  # server/cli.py's grace period
UNDECODABLE = (b"\xff\xff\xff", b"\x0a\x02\xff\xfe")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


@contextmanager
def server_process(store: Path, *args: str, port: int = 0) -> Iterator[subprocess.Popen[str]]:
    """collafuse-server in its own process; killed (SIGKILL) on the way out if still running."""
    (store / "server.json").unlink(missing_ok=True)
    log = open(store.parent / f"{store.name}-server.log", "a")  # noqa: SIM115 -- closed below
    cmd = [sys.executable, "-m", "collafuse.server", "--store", str(store), "--port", str(port), *TINY, *args]
    proc = subprocess.Popen(cmd, stderr=log, stdout=log, text=True, env=ENV)
    try:
        deadline = time.monotonic() + 120
        while not (store / "server.json").exists():
            assert proc.poll() is None, (store.parent / f"{store.name}-server.log").read_text()
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.1)
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def address(store: Path) -> str:
    return str(json.loads((store / "server.json").read_text())["address"])


def api_at(target: str) -> collafuse_pb2_grpc.CollaFuseStub:
    return collafuse_pb2_grpc.CollaFuseStub(open_channel(target))


def wait_for(condition: Any, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def trainer_step(api: collafuse_pb2_grpc.CollaFuseStub) -> int:
    return int(api.Status(collafuse_pb2.StatusRequest(), timeout=10).trainer.step)


def send_undecodable(target: str) -> list[grpc.StatusCode]:
    """Raw bytes as Release stream messages and as unary requests, past the stubs' serializers."""
    channel = grpc.insecure_channel(target)
    codes = []
    release = channel.stream_unary("/collafuse.v1.CollaFuse/Release", request_serializer=lambda b: b,
                                   response_deserializer=lambda b: b)
    register_raw = channel.unary_unary("/collafuse.v1.CollaFuse/Register", request_serializer=lambda b: b,
                                       response_deserializer=lambda b: b)
    for _ in range(5):
        for payload in UNDECODABLE:
            for call, request in ((release, iter([payload, payload])), (register_raw, payload)):
                try:
                    call(request, timeout=10)
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as exc:
                    codes.append(exc.code())
    channel.close()
    return codes


def stalled_upload(api: collafuse_pb2_grpc.CollaFuseStub, release: threading.Event) -> grpc.StatusCode:
    """A Release stream that sends one new chunk, then holds the stream open until ``release`` is set."""

    def stream() -> Iterator[collafuse_pb2.ReleaseChunk]:
        yield from chunks("c1", 20, 2, 2, prefix="stalled")
        release.wait(60)

    try:
        api.Release(stream(), timeout=60)
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def test_sigterm_after_undecodable_streams_exits_in_grace_with_checkpoint_and_free_lock(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    # Checkpoints only at the end: the one found afterwards is the one written on SIGTERM.
    with server_process(store, "--max-steps", "0", "--checkpoint-every", "100000", "--min-clients", "1") as proc:
        target = address(store)
        api = api_at(target)
        register(api, "c1", cut=20)
        assert upload(api, chunks("c1", 20, 6, 3)).stored == 6
        wait_for(lambda: trainer_step(api) >= 2, "two training steps")
        codes = send_undecodable(target)
        assert set(codes) == {grpc.StatusCode.INVALID_ARGUMENT}, codes
        api.Status(collafuse_pb2.StatusRequest(), timeout=10)  # still serving
        # And an upload that never ends: the grace period runs out on it and it is cancelled.
        stalled, outcome = threading.Event(), []
        uploader = threading.Thread(target=lambda: outcome.append(stalled_upload(api, stalled)), daemon=True)
        uploader.start()
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=GRACE_S + STOP_MARGIN_S + 30)
        except subprocess.TimeoutExpired:
            pytest.fail("the server hung on SIGTERM after undecodable streams")
        took = time.monotonic() - started
        stalled.set()
        uploader.join(10)
        assert outcome and outcome[0] != grpc.StatusCode.OK, outcome
    log = (tmp_path / "store-server.log").read_text()
    assert proc.returncode == 0, log
    assert took < GRACE_S + STOP_MARGIN_S, f"SIGTERM took {took:.1f}s"
    assert "server stopped" in log
    assert (store / "checkpoints" / "latest").is_dir()
    # The lock is free: a server on the same store starts, resuming from the SIGTERM checkpoint.
    again = start(store, start_trainer=False)
    try:
        assert again.trainer.state().step >= 2
    finally:
        again.stop(0)


def test_stop_is_bounded_even_when_grpc_never_finishes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Defence in depth: a wedged gRPC shutdown still lets stop() checkpoint and release the lock."""
    running = start(tmp_path, start_trainer=False)
    real_stop = running._grpc.stop

    def wedged(grace: float | None) -> threading.Event:
        real_stop(grace)
        return threading.Event()  # never set, like the double-status bug of issue 10

    monkeypatch.setattr(running._grpc, "stop", wedged)
    monkeypatch.setattr("collafuse.server.app.STOP_MARGIN_S", 0.5)
    started = time.monotonic()
    running.stop(0.2)
    assert time.monotonic() - started < 10
    start(tmp_path, start_trainer=False).stop(0)  # lock released


def test_connection_waits_out_a_server_restart(tmp_path: Path) -> None:
    """The in-process path of defect 2: calls keep retrying UNAVAILABLE until the restarted server answers."""
    first = start(tmp_path, start_trainer=False)
    port = first.port
    api = stub(first)
    register(api, "c1", cut=20)
    first.stop(0)
    restarted: list[Any] = []

    def restart() -> None:
        time.sleep(3)
        restarted.append(start(tmp_path, start_trainer=False, port=port))

    thread = threading.Thread(target=restart)
    thread.start()
    policy = RetryPolicy(wait_timeout=60, initial_delay=0.2, max_delay=1.0)
    try:
        with ServerConnection(f"127.0.0.1:{port}", policy=policy, rpc_timeout=5) as conn:
            started = time.monotonic()
            reply = conn.heartbeat("c1")
            assert reply.server_time > 0 and time.monotonic() - started >= 2
            assert conn.traffic["Heartbeat"].attempts > 1
    finally:
        thread.join()
        for server in restarted:
            server.stop(0)


@pytest.mark.slow
def test_client_run_rides_out_a_server_kill_and_a_late_restart(tmp_path: Path) -> None:
    """SIGKILL the server while a client runs, restart it after longer than the old retry budget (~15 s)."""
    store = tmp_path / "store"
    store.mkdir()
    make_image_folder(tmp_path / "data", classes=("a", "b"), per_class=4)
    server_args = ("--max-steps", "30", "--checkpoint-every", "5", "--min-clients", "1")
    with server_process(store, *server_args) as server:
        port = int(json.loads((store / "server.json").read_text())["port"])
        client_cmd = [
            sys.executable, "-m", "collafuse.client", "run", "--data", str(tmp_path / "data"),
            "--server", f"127.0.0.1:{port}", "--workdir", str(tmp_path / "work"), "--cut", "20",
            "--train-steps", "3", "--batch-size", "4", "--samples-per-class", "1", "--inference-steps", "5",
            "--device", "cpu", "--threads", "1", "--wait-timeout", "300", "--rpc-timeout", "10",
        ]
        with open(tmp_path / "client.log", "w") as client_log:
            client = subprocess.Popen(client_cmd, stdout=client_log, stderr=client_log, text=True, env=ENV)
            try:
                api = api_at(f"127.0.0.1:{port}")
                wait_for(lambda: any(c.releases for c in api.Status(collafuse_pb2.StatusRequest(), timeout=10).clients),
                         "the client's releases")
                server.kill()
                server.wait()
                time.sleep(20)
                with server_process(store, *server_args, port=port):
                    client.wait(timeout=240)
            finally:
                if client.poll() is None:
                    client.kill()
                    client.wait()
    log = (tmp_path / "client.log").read_text()
    assert client.returncode == 0, log[-3000:]
    assert "waiting for the server at" in log
    assert (tmp_path / "work" / "samples" / "grid.png").is_file()
