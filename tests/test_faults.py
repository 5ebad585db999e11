"""Faults on loopback: SIGTERM after undecodable streams, a wedged gRPC stop, a server restart under a client."""

from __future__ import annotations

import json
import os
import re
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
from fault_support import FreezingRelay, ledger_releases, store_meta, store_rows
from server_support import CLASSES, chunks, register, start, stub, upload, wait_phase

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


# ---- SIGTERM during training, sampling and an upload -------------------------------------------------------

def metrics_of(store: Path) -> dict[str, Any]:
    """``<store>/metrics.json``, written with every checkpoint (server/trainer.py)."""
    return dict(json.loads((store / "metrics.json").read_text()))


def assert_continuous_losses(metrics: dict[str, Any]) -> None:
    """One loss per step from 1 to the checkpoint's step: a resume neither lost nor repeated steps."""
    steps = [int(s) for s, _ in metrics["losses"]]
    assert steps == list(range(1, int(metrics["step"]) + 1)), steps


def long_sample(api: collafuse_pb2_grpc.CollaFuseStub, running: threading.Event) -> grpc.StatusCode:
    """A Sample call of 2,048 images over every server step: many seconds of work on the sampler's workers."""
    request = collafuse_pb2.SampleRequest(client_id="c1", labels=[0, 1] * 1024, cut=20, num_inference_steps=0, seed=1)
    try:
        for event in api.Sample(request, timeout=120):
            if event.HasField("progress"):
                running.set()
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


@pytest.mark.parametrize("during", [pytest.param("training", marks=pytest.mark.slow), "sampling",
                                    pytest.param("upload", marks=pytest.mark.slow)])
def test_sigterm_exits_in_grace_with_final_checkpoint_and_free_lock(tmp_path: Path, during: str) -> None:
    store = tmp_path / "store"
    store.mkdir()
    with server_process(store, "--max-steps", "0", "--checkpoint-every", "100000", "--min-clients", "1") as proc:
        api = api_at(address(store))
        register(api, "c1", cut=20)
        assert upload(api, chunks("c1", 20, 6, 3)).stored == 6
        wait_for(lambda: trainer_step(api) >= 2, "two training steps")
        running, outcome = threading.Event(), []
        call: Any = {
            "training": None,
            "sampling": lambda: outcome.append(long_sample(api, running)),
            # One whole chunk of a stream that never ends: the server holds it, uncommitted, at SIGTERM.
            "upload": lambda: outcome.append(stalled_upload(api, running)),
        }[during]
        # Several streams: each one's end at the grace period races gRPC's cancellation (issue 10, item 5).
        workers = [threading.Thread(target=call, daemon=True) for _ in range(4 if during == "upload" else 1 if call else 0)]
        for worker in workers:
            worker.start()
        if during == "sampling":
            wait_for(running.is_set, "the Sample call's first progress event")
        elif workers:
            time.sleep(1.0)  # the chunks reach the server
        step_before = trainer_step(api)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=GRACE_S + STOP_MARGIN_S + 30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the server hung on SIGTERM during {during}")
        took = time.monotonic() - started
        running.set()
        for worker in workers:
            worker.join(30)
        # The calls in flight end with an error the client retries (never OK, never a hang).
        assert len(outcome) == len(workers), outcome
        assert set(outcome) <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}, outcome
    log = (tmp_path / "store-server.log").read_text()
    assert proc.returncode == 0, log[-3000:]
    assert took < GRACE_S + STOP_MARGIN_S, f"SIGTERM during {during} took {took:.1f}s"
    assert "server stopped" in log
    # The final checkpoint: every step trained before SIGTERM (and the few after it), losses without a gap.
    metrics = metrics_of(store)
    assert int(metrics["step"]) >= step_before >= 2
    assert_continuous_losses(metrics)
    assert {key for _, key in store_rows(store)} == {f"img-{i}" for i in range(6)}  # no row of the cut upload
    again = start(store, start_trainer=False)  # the lock is free; the server resumes from that checkpoint
    try:
        assert again.trainer.state().step == int(metrics["step"])
    finally:
        again.stop(0)


# ---- SIGKILL of the server, restarted after an outage; a client killed mid-release ----------------------

CLIENT_ARGS = ["--cut", "20", "--train-steps", "3", "--batch-size", "4", "--samples-per-class", "1",
               "--inference-steps", "5", "--device", "cpu", "--threads", "1", "--wait-timeout", "400",
               "--rpc-timeout", "10"]
# Images per client: 2 classes x 16 grey 8x8 releases are ~11 kB of Release stream, several times a Register.
PER_CLASS = 16
FREEZE_AFTER = 5_000


@contextmanager
def client_process(tmp_path: Path, name: str, target: str, command: str = "run") -> Iterator[subprocess.Popen[str]]:
    """``collafuse-client <command>`` for client ``name`` (data ``data-<name>``, workdir ``work-<name>``,
    log ``<name>.log``, appended over restarts); killed on the way out if still running."""
    data = tmp_path / f"data-{name}"
    if not data.exists():
        make_image_folder(data, classes=("a", "b"), per_class=PER_CLASS, seed=sum(map(ord, name)))
    cmd = [sys.executable, "-m", "collafuse.client", command, "--data", str(data), "--server", target,
           "--workdir", str(tmp_path / f"work-{name}"), "--client-id", name, *CLIENT_ARGS]
    with open(tmp_path / f"{name}.log", "a") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=log, text=True, env=ENV)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def acked(workdir: Path) -> dict[str, str]:
    """image key -> payload SHA-256 of each release the client's ledger records as acknowledged."""
    return {r.image_key: r.payload_sha256 for r in ledger_releases(workdir) if r.status == "acked"}


def assert_ledger_matches_store(store: Path, workdir: Path, client_id: str, images: int) -> None:
    """One acknowledged release per image in the ledger, one row per image in the store, with the same bytes."""
    records = ledger_releases(workdir)
    assert len(records) == images and all(r.status == "acked" for r in records), records
    held = {key: sha for (client, key), sha in store_rows(store).items() if client == client_id}
    assert held == {r.image_key: r.payload_sha256 for r in records}


@pytest.mark.slow
@pytest.mark.parametrize("outage_s", [5, 60])
def test_server_sigkill_during_training_and_uploads_then_restart(tmp_path: Path, outage_s: int) -> None:
    """SIGKILL while the trainer steps, a client's upload is half sent and another stream holds an uncommitted
    chunk; restart on the same store and port after ``outage_s``. Both clients finish without help, every
    acknowledged release survives, the half uploads leave nothing, training resumes from its checkpoint."""
    store = tmp_path / "store"
    store.mkdir()
    max_steps = 80
    server_args = ("--max-steps", str(max_steps), "--checkpoint-every", "5", "--min-clients", "1")
    with server_process(store, *server_args) as server:
        port = int(json.loads((store / "server.json").read_text())["port"])
        api = api_at(f"127.0.0.1:{port}")
        with (FreezingRelay(port, "up", FREEZE_AFTER) as relay,
              client_process(tmp_path, "direct", f"127.0.0.1:{port}") as direct,
              client_process(tmp_path, "relayed", relay.address) as relayed):
            wait_for(lambda: len(acked(tmp_path / "work-direct")) == 2 * PER_CLASS, "the direct client's acked releases")
            wait_for(relay.triggered.is_set, "the relayed client's upload to stall")
            wait_for(lambda: trainer_step(api) > 10, "a checkpointed training step")
            register(api, "partial", cut=20)
            held = threading.Event()
            partial = threading.Thread(target=stalled_upload, args=(api, held), daemon=True)
            partial.start()
            time.sleep(1.0)  # its first chunk reaches the server
            checkpoint_step = int(metrics_of(store)["step"])
            acked_before = {name: acked(tmp_path / f"work-{name}") for name in ("direct", "relayed")}
            assert trainer_step(api) < max_steps, "training finished before the kill: raise max_steps"
            server.kill()
            server.wait()
            held.set()
            assert direct.poll() is None and relayed.poll() is None  # still running, now retrying
            time.sleep(outage_s)
            with server_process(store, *server_args, port=port):
                api = api_at(f"127.0.0.1:{port}")  # a fresh channel: the old one may be backing off
                rows = store_rows(store)
                for name, releases in acked_before.items():  # nothing acknowledged was lost
                    assert {k: rows.get((name, k)) for k in releases} == releases, name
                assert not any(client == "partial" for client, _ in rows), "a half-sent stream left rows"
                assert trainer_step(api) >= checkpoint_step
                for client in (direct, relayed):
                    client.wait(timeout=300)
                wait_phase(api, "done", timeout=120)
    logs = {name: (tmp_path / f"{name}.log").read_text() for name in ("direct", "relayed")}
    for name, client in (("direct", direct), ("relayed", relayed)):
        assert client.returncode == 0, logs[name][-3000:]
        assert (tmp_path / f"work-{name}" / "samples" / "grid.png").is_file()
        assert_ledger_matches_store(store, tmp_path / f"work-{name}", name, 2 * PER_CLASS)
    assert "waiting for the server at" in logs["direct"] + logs["relayed"]
    server_log = (tmp_path / "store-server.log").read_text()
    resumed = [int(m) for m in re.findall(r"resumed from \S+ at step (\d+)", server_log)]
    assert len(resumed) == 1 and resumed[0] >= checkpoint_step, resumed
    metrics = metrics_of(store)
    assert int(metrics["step"]) == max_steps
    assert_continuous_losses(metrics)


@pytest.mark.slow
def test_client_killed_mid_release_and_restarted_releases_each_image_once(tmp_path: Path) -> None:
    """SIGKILL a client twice: mid-stream (the server stores nothing), then after the server committed the
    upload but before the ack arrived (the ledger says 'sent'). The restarted client resends the identical
    bytes: one row per image, the ledger agrees, and no conflict."""
    store = tmp_path / "store"
    store.mkdir()
    images = 2 * PER_CLASS
    with server_process(store, "--max-steps", "5", "--checkpoint-every", "100", "--min-clients", "1") as server:
        port = int(json.loads((store / "server.json").read_text())["port"])
        work = tmp_path / "work-c1"
        # 1. Killed half-way through its upload: the server discards the broken stream.
        with (FreezingRelay(port, "up", FREEZE_AFTER) as relay,
              client_process(tmp_path, "c1", relay.address, command="release") as client):
            wait_for(relay.triggered.is_set, "the upload to stall")
            time.sleep(0.5)
            client.kill()
            client.wait()
        assert [r.status for r in ledger_releases(work)] == ["sent"] * images
        time.sleep(1.0)  # the server sees the cancelled stream
        assert not store_rows(store)
        # 2. Killed after the server stored the upload, before the ack reached it.
        with (FreezingRelay(port, "down", FREEZE_AFTER) as relay,
              client_process(tmp_path, "c1", relay.address, command="release") as client):
            wait_for(lambda: len(store_rows(store)) == images, "the server to commit the upload")
            client.kill()
            client.wait()
        assert [r.status for r in ledger_releases(work)] == ["sent"] * images  # no ack ever arrived
        # 3. Restarted: the whole lifecycle finishes, resending the identical bytes.
        with client_process(tmp_path, "c1", f"127.0.0.1:{port}") as client:
            client.wait(timeout=300)
        assert server.poll() is None
    log = (tmp_path / "c1.log").read_text()
    assert client.returncode == 0, log[-3000:]
    assert_ledger_matches_store(store, work, "c1", images)
    release = json.loads((work / "metrics.json").read_text())["contribution"]
    assert (release["stored"], release["duplicates"]) == (0, images), release
    assert store_meta(store, "release_conflicts") == "0"
    assert "ALREADY_EXISTS" not in log and "already stored" not in log
