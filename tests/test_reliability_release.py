"""Release is atomic, uploads are serialised with Register and Forget, a full disk is an answer, and the scope
and bounds of issue 16, against an in-process server on loopback.

- A stream is stored only when its final message carries the end-of-stream marker with the right item count;
  a stream cancelled or past its deadline after valid chunks stores nothing (the issue: 5-7 of 10 did).
- A Register at another cut, or a Forget, while an upload is in flight makes that upload store nothing.
- While a client holds releases its cut, protocol and classes are fixed.
- A disk that refuses a write answers RESOURCE_EXHAUSTED with a retry hint naming the disk; an unwritable
  transcript fails only the calls it must record.
- --max-clients, Status pages, cut-0 sampling only for a client that released at cut 0, per-stream bounds.
"""

from __future__ import annotations

import errno
import os
import pickle
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from server_support import chunks, register, rpc_error, start, stub, upload

from collafuse.client.connection import end_of_stream
from collafuse.common.rpc import RETRY_AFTER_KEY
from collafuse.server import staging
from collafuse.server.app import CollaFuseServer
from collafuse.server.staging import STAGING, ReleaseStaging
from collafuse.v1 import collafuse_pb2, collafuse_pb2_grpc

torch.set_num_threads(1)
Code = grpc.StatusCode


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CollaFuseServer]:
    running = start(tmp_path_factory.mktemp("atomic"), start_trainer=False, release_max_stream_chunks=8)
    yield running
    running.stop(0)


@pytest.fixture
def api(server: CollaFuseServer) -> collafuse_pb2_grpc.CollaFuseStub:
    return stub(server)


def marked(chunk_list: list[collafuse_pb2.ReleaseChunk], total: int | None = None) -> list[collafuse_pb2.ReleaseChunk]:
    out = list(end_of_stream(chunk_list))
    if total is not None:
        out[-1].total_items = total
    return out


# ---- the end-of-stream marker ------------------------------------------------------------------------------


def test_a_stream_without_its_marker_or_with_a_wrong_count_stores_nothing(api: Any, server: CollaFuseServer) -> None:
    register(api, "marker", cut=20)
    sent = chunks("marker", 20, 5, 2)
    err = rpc_error(api.Release, iter(sent))
    assert err.code() == Code.FAILED_PRECONDITION and "without its end-of-stream marker" in err.details()
    err = rpc_error(api.Release, iter(marked(sent, total=4)))
    assert err.code() == Code.INVALID_ARGUMENT and "declares 4 items but the stream carried 5" in err.details()
    err = rpc_error(api.Release, iter([*marked(sent[:1]), sent[1]]))
    assert err.code() == Code.INVALID_ARGUMENT and "follows the end-of-stream marker" in err.details()
    assert server.store.count("marker") == 0
    # A bare marker (no items) may end a stream; the whole stream is then stored at once.
    bare = collafuse_pb2.ReleaseChunk(client_id="marker", last=True, total_items=5)
    ack = api.Release(iter([*sent, bare]), timeout=30)
    assert (ack.stored, ack.total_for_client) == (5, 5) and server.store.count("marker") == 5


def _stalled(chunk_list: list[collafuse_pb2.ReleaseChunk], gate: threading.Event) -> Iterator[collafuse_pb2.ReleaseChunk]:
    yield from chunk_list
    gate.wait(30)


@pytest.mark.parametrize("how", ["cancel", "deadline"])
def test_a_cancelled_or_expired_stream_never_commits(api: Any, server: CollaFuseServer, how: str) -> None:
    """Three valid chunks, then the client cancels (or the deadline passes) before the marker: 10 of 10 runs
    store nothing. Before the marker, 5-7 of 10 committed (the request stream can end normally before gRPC
    marks the call cancelled)."""
    client_id = f"gone-{how}"
    register(api, client_id, cut=20)
    for run in range(10):
        gate = threading.Event()
        sent = chunks(client_id, 20, 3, 1, prefix=f"run{run}")
        if how == "cancel":
            future = api.Release.future(_stalled(sent, gate), timeout=30)
            time.sleep(0.15)  # the three chunks are in
            assert future.cancel()
        else:
            with pytest.raises(grpc.RpcError) as raised:
                api.Release(_stalled(sent, gate), timeout=0.3)
            assert raised.value.code() == Code.DEADLINE_EXCEEDED
        gate.set()
    time.sleep(1.0)  # any handler still finishing a stream would have committed by now
    assert server.store.count(client_id) == 0


# ---- serialised with Register and Forget ----------------------------------------------------------------------


def _upload_in_flight(api: Any, client_id: str, cut: int, gate: threading.Event) -> tuple[threading.Thread, list[Any]]:
    """A Release stream that sends its first chunk, waits for ``gate``, then finishes with the marker."""
    outcome: list[Any] = []
    sent = marked(chunks(client_id, cut, 4, 2, prefix="inflight"))

    def stream() -> Iterator[collafuse_pb2.ReleaseChunk]:
        yield sent[0]
        gate.wait(30)
        yield sent[1]

    def run() -> None:
        try:
            outcome.append(api.Release(stream(), timeout=60))
        except grpc.RpcError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def test_a_register_at_another_cut_during_an_upload_leaves_no_old_cut_rows(api: Any, server: CollaFuseServer) -> None:
    register(api, "mover2", cut=20)
    gate = threading.Event()
    thread, outcome = _upload_in_flight(api, "mover2", 20, gate)
    time.sleep(0.3)
    assert register(api, "mover2", cut=30).releases_stored == 0  # nothing is held yet: allowed
    gate.set()
    thread.join(30)
    (result,) = outcome
    assert isinstance(result, grpc.RpcError) and result.code() == Code.FAILED_PRECONDITION
    assert "registered again" in result.details() and "nothing of it was stored" in result.details()
    assert server.store.count("mover2") == 0 and server.store.get_client("mover2").cut == 30  # type: ignore[union-attr]


def test_a_forget_during_an_upload_leaves_nothing_behind(api: Any, server: CollaFuseServer) -> None:
    register(api, "leaver", cut=20)
    gate = threading.Event()
    thread, outcome = _upload_in_flight(api, "leaver", 20, gate)
    time.sleep(0.3)
    assert api.Forget(collafuse_pb2.ForgetRequest(client_id="leaver"), timeout=10).removed == 0
    gate.set()
    thread.join(30)
    (result,) = outcome
    assert isinstance(result, grpc.RpcError) and result.code() == Code.FAILED_PRECONDITION
    assert "was forgotten" in result.details()
    assert server.store.count("leaver") == 0 and server.store.get_client("leaver") is None
    assert "leaver" not in {c.client_id for c in api.Status(collafuse_pb2.StatusRequest(), timeout=10).clients}


def test_protocol_and_classes_are_fixed_while_releases_are_held(api: Any) -> None:
    register(api, "fixed", cut=20, classes=["a", "b"])
    assert upload(api, chunks("fixed", 20, 2, 2)).stored == 2
    for fields, needle in (({"classes": ["a"]}, "its classes are fixed"), ({"classes": []}, "its classes are fixed"),
                           ({"classes": ["a", "b", "c"]}, "its classes are fixed")):
        err = rpc_error(api.Register, collafuse_pb2.RegisterRequest(
            client_id="fixed", cut=20, protocol=collafuse_pb2.PROTOCOL_AMBIENT, class_names=fields["classes"]))
        assert err.code() == Code.FAILED_PRECONDITION and needle in err.details()
    err = rpc_error(api.Register, collafuse_pb2.RegisterRequest(
        client_id="fixed", cut=20, protocol=collafuse_pb2.PROTOCOL_SPLIT, class_names=["a", "b"]))
    assert err.code() == Code.FAILED_PRECONDITION and "cannot switch to 'split'" in err.details()
    assert register(api, "fixed", cut=20, classes=["b", "a"]).releases_stored == 2  # the same set: a re-join
    api.Forget(collafuse_pb2.ForgetRequest(client_id="fixed"), timeout=10)
    assert register(api, "fixed", cut=20, classes=["a"]).releases_stored == 0  # after a forget: anything


# ---- bounds -----------------------------------------------------------------------------------------------------


def test_a_stream_over_its_message_bound_is_refused_whole(api: Any, server: CollaFuseServer) -> None:
    register(api, "long", cut=20)
    err = rpc_error(api.Release, iter(marked(chunks("long", 20, 9, 1))))  # 9 messages, the bound is 8
    assert err.code() == Code.RESOURCE_EXHAUSTED and "8 messages" in err.details()
    assert not dict(err.trailing_metadata() or ()).get(RETRY_AFTER_KEY), "no retry hint: retrying cannot help"
    assert server.store.count("long") == 0
    assert upload(api, chunks("long", 20, 8, 1)).stored == 8


def test_status_is_paginated(api: Any) -> None:
    ids = [f"page-{i:02d}" for i in range(23)]
    for client_id in ids:
        register(api, client_id, cut=20)
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        reply = api.Status(collafuse_pb2.StatusRequest(page_size=10, page_token=token), timeout=10)
        pages += 1
        assert len(reply.clients) <= 10 and reply.clients_total >= len(ids)
        seen += [c.client_id for c in reply.clients]
        token = reply.next_page_token
        if not token:
            break
    assert seen == sorted(seen) and len(seen) == len(set(seen)) and set(ids) <= set(seen)
    assert pages == -(-len(seen) // 10)
    assert rpc_error(api.Status, collafuse_pb2.StatusRequest(page_size=-1)).code() == Code.INVALID_ARGUMENT


def test_max_clients_bounds_new_registrations(tmp_path: Path) -> None:
    running = start(tmp_path, start_trainer=False, max_clients=2)
    try:
        api = stub(running)
        register(api, "one")
        register(api, "two")
        err = rpc_error(api.Register, collafuse_pb2.RegisterRequest(
            client_id="three", cut=20, protocol=collafuse_pb2.PROTOCOL_AMBIENT, class_names=["a"]))
        assert err.code() == Code.RESOURCE_EXHAUSTED and "--max-clients is 2" in err.details()
        register(api, "two")  # a re-join of a registered id is always allowed
        api.Forget(collafuse_pb2.ForgetRequest(client_id="one"), timeout=10)
        register(api, "three")
    finally:
        running.stop(0)


def test_cut_zero_sampling_is_only_for_clients_that_released_at_cut_zero(api: Any) -> None:
    def sample(client_id: str) -> grpc.StatusCode:
        request = collafuse_pb2.SampleRequest(client_id=client_id, labels=[0], num_inference_steps=2, cut=0)
        try:
            list(api.Sample(request, timeout=60))
        except grpc.RpcError as exc:
            assert "only a client that released its images at cut 0" in (exc.details() or "")
            return exc.code()  # type: ignore[no-any-return]
        return Code.OK

    register(api, "fresh-gm", cut=0)
    assert sample("fresh-gm") == Code.PERMISSION_DENIED  # a fresh id may not sample the whole chain
    register(api, "real-gm", cut=0)
    assert upload(api, chunks("real-gm", 0, 2, 2, prefix="gm")).stored == 2
    assert sample("real-gm") == Code.OK


# ---- a full disk ------------------------------------------------------------------------------------------------


class FullDisk:
    """The store's SQLite connection, with every write failing like a full disk while ``full`` is set."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.full = False

    def execute(self, sql: str, *args: Any) -> Any:
        if self.full and sql.split()[0].upper() in ("INSERT", "UPDATE", "DELETE", "COMMIT"):
            raise sqlite3.OperationalError("database or disk is full")
        return self.conn.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.conn, name)


def test_a_full_disk_is_resource_exhausted_with_a_hint_and_clears_when_space_returns(tmp_path: Path) -> None:
    running = start(tmp_path / "store", start_trainer=False)
    disk = FullDisk(running.store._conn)
    running.store._conn = disk  # type: ignore[assignment]
    try:
        api = stub(running)
        register(api, "held", cut=20)
        disk.full = True
        for call, request in (
            (api.Register, collafuse_pb2.RegisterRequest(client_id="new", cut=20,
                                                         protocol=collafuse_pb2.PROTOCOL_AMBIENT, class_names=["a"])),
            (api.Release, iter(marked(chunks("held", 20, 2, 1)))),
            (api.Forget, collafuse_pb2.ForgetRequest(client_id="held")),
        ):
            err = rpc_error(call, request)
            assert err.code() == Code.RESOURCE_EXHAUSTED, err.details()
            assert "disk is full or failing" in err.details() and str(running.store.root) in err.details()
            assert int(dict(err.trailing_metadata() or ())[RETRY_AFTER_KEY]) == 30_000
        # Calls that only read, or whose write is a last_seen, are answered.
        api.Heartbeat(collafuse_pb2.HeartbeatRequest(client_id="held"), timeout=10)
        assert "held" in {c.client_id for c in api.Status(collafuse_pb2.StatusRequest(), timeout=10).clients}
        disk.full = False  # space is back: the connection was left usable
        assert upload(api, chunks("held", 20, 2, 1)).stored == 2
        register(api, "new")
    finally:
        running.store._conn = disk.conn  # type: ignore[assignment]
        running.stop(0)


def test_an_unwritable_transcript_fails_only_the_calls_it_must_record(tmp_path: Path) -> None:
    transcript = tmp_path / "transcript.jsonl"
    running = start(tmp_path / "store", start_trainer=False, transcript=transcript)
    try:
        api = stub(running)
        register(api, "audited", cut=20)
        recorded = transcript.stat().st_size
        interceptor = running.transcript
        full = os.open("/dev/full", os.O_WRONLY)  # every write: ENOSPC
        real_fd, interceptor._fd = interceptor._fd, full
        try:
            api.Heartbeat(collafuse_pb2.HeartbeatRequest(client_id="audited"), timeout=10)
            api.Status(collafuse_pb2.StatusRequest(), timeout=10)
            for call, request in ((api.Register, collafuse_pb2.RegisterRequest(
                    client_id="audited", cut=20, protocol=collafuse_pb2.PROTOCOL_AMBIENT, class_names=["a", "b", "c"])),
                    (api.Release, iter(marked(chunks("audited", 20, 2, 1))))):
                err = rpc_error(call, request)
                assert err.code() == Code.RESOURCE_EXHAUSTED and "audit transcript" in err.details()
                assert int(dict(err.trailing_metadata() or ())[RETRY_AFTER_KEY]) > 0
            assert running.store.count("audited") == 0, "an unrecorded Release is not stored"
            assert interceptor.unrecorded == 2  # the Heartbeat and the Status
        finally:
            interceptor._fd = real_fd
            os.close(full)
        assert upload(api, chunks("audited", 20, 2, 1)).stored == 2
        lines = transcript.read_text().splitlines()
        assert transcript.stat().st_size > recorded and all(line.startswith("{") for line in lines)
    finally:
        running.stop(0)


# ---- staging: a stream's items wait on disk, not in memory -------------------------------------------------


def test_staged_items_come_back_in_order_and_leave_no_file(tmp_path: Path) -> None:
    items = [("key", i, bytes([i]) * 1000) for i in range(50)]
    with ReleaseStaging(tmp_path) as staged:
        staged.extend(items[:20])
        staged.extend(items[20:])
        assert list(staged) == items and list(staged) == items  # read back, and again
        assert not any((tmp_path / STAGING).iterdir()), "the staging file has no name: a crash leaves nothing"


def test_a_stream_whose_staging_hits_a_full_disk_is_resource_exhausted_and_stores_nothing(
    api: Any, server: CollaFuseServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    register(api, "staged", cut=20)
    written = 0

    def dump(item: object, file: Any, protocol: int) -> None:
        nonlocal written
        if written == 3:  # the disk fills in the middle of the stream's second message
            raise OSError(errno.ENOSPC, "No space left on device")
        written += 1
        pickle.dump(item, file, protocol=protocol)

    monkeypatch.setattr(staging.pickle, "dump", dump)
    err = rpc_error(api.Release, iter(marked(chunks("staged", 20, 6, 2))))
    assert err.code() == Code.RESOURCE_EXHAUSTED and str(server.store.root / STAGING) in err.details()
    assert "nothing of this Release stream was stored" in err.details()
    assert server.store.count("staged") == 0
    monkeypatch.undo()
    assert upload(api, chunks("staged", 20, 6, 2)).stored == 6
