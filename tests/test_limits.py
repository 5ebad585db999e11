"""Bounded requests: every string and list has a limit, errors never echo an oversized value, the transcript."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import grpc
import pytest
import torch
from server_support import chunks, register, release_item, rpc_error, start, stub, upload

from collafuse.common.rpc import MAX_DETAILS_CHARS
from collafuse.server import limits
from collafuse.server.limits import check_request
from collafuse.server.transcript import TranscriptInterceptor
from collafuse.v1 import collafuse_pb2

torch.set_num_threads(1)

Code = grpc.StatusCode


@pytest.mark.parametrize(
    ("request_", "where"),
    [
        (collafuse_pb2.RegisterRequest(client_id="x" * 129), "RegisterRequest.client_id has 129 characters"),
        (collafuse_pb2.RegisterRequest(client_id="x", class_names=["a"] * 1025), "class_names has 1025 entries"),
        (collafuse_pb2.RegisterRequest(client_id="x", class_names=["a", "b" * 10_240]), "class_names[1] has 10240"),
        (collafuse_pb2.RegisterRequest(expected_fingerprint="f" * 500), "expected_fingerprint has 500"),
        (collafuse_pb2.HeartbeatRequest(client_id="h" * 1_000), "HeartbeatRequest.client_id has 1000"),
        (collafuse_pb2.ForgetRequest(client_id="f" * 1_000), "ForgetRequest.client_id"),
        (collafuse_pb2.SampleRequest(client_id="c", labels=[0] * 65_537), "SampleRequest.labels has 65537 entries"),
        (collafuse_pb2.SampleRequest(client_id="c", scheduler="d" * 17), "SampleRequest.scheduler has 17"),
        (collafuse_pb2.ReleaseChunk(client_id="c", items=[collafuse_pb2.ReleaseItem(image_key="k" * 257)]),
         "ReleaseChunk.items[0].image_key has 257 characters"),
    ],
)
def test_checker_names_the_field_and_sizes_never_the_value(request_: object, where: str) -> None:
    problem = check_request(request_)
    assert problem is not None and where in problem
    assert "xxxxxxxxxx" not in problem and "bbbbbbbbbb" not in problem and "hhhhhhhhhh" not in problem


def test_checker_accepts_requests_at_the_limits() -> None:
    chunk = collafuse_pb2.ReleaseChunk(client_id="c" * limits.MAX_ID_CHARS, cut=20)
    chunk.items.append(release_item("k" * limits.MAX_KEY_CHARS, 0))
    assert check_request(chunk) is None
    assert check_request(collafuse_pb2.RegisterRequest(
        client_id="x", class_names=["n" * limits.MAX_CLASS_NAME_CHARS] * limits.MAX_CLASSES)) is None
    assert check_request(collafuse_pb2.SampleRequest(client_id="c", labels=[1] * limits.MAX_LABELS)) is None
    assert check_request(b"raw bytes of a denied call") is None


def test_server_answers_oversized_fields_with_invalid_argument_and_status_stays_small(tmp_path: Path) -> None:
    running = start(tmp_path, start_trainer=False)
    try:
        api = stub(running)
        register(api, "ok", cut=20)
        cases = [
            (api.Register, collafuse_pb2.RegisterRequest(client_id="x" * 7_500_000, cut=20)),  # the 7.5 MB ids
            (api.Register, collafuse_pb2.RegisterRequest(client_id="y", cut=20, class_names=["a"] * 1_000_000)),
            (api.Register, collafuse_pb2.RegisterRequest(client_id="z", cut=20, class_names=["b" * 10_240])),
            (api.Heartbeat, collafuse_pb2.HeartbeatRequest(client_id="h" * 10_000)),
            (api.Forget, collafuse_pb2.ForgetRequest(client_id="f" * 10_000)),
            (api.Sample, collafuse_pb2.SampleRequest(client_id="ok", labels=[0] * 100_000, cut=20)),
        ]
        for method, request in cases:
            err = rpc_error(method, request)
            assert err.code() == Code.INVALID_ARGUMENT, (err.code(), err.details()[:200])
            assert len(err.details()) < MAX_DETAILS_CHARS + 100 and "hhhhhhhhhh" not in err.details()
        bad_key = collafuse_pb2.ReleaseChunk(client_id="ok", cut=20, items=[release_item("k" * 300, 0)])
        assert rpc_error(api.Release, iter([bad_key])).code() == Code.INVALID_ARGUMENT
        # Bigger than the server's receive limit: refused by gRPC before any parsing.
        err = rpc_error(api.Register, collafuse_pb2.RegisterRequest(client_id="x" * (20 << 20), cut=20))
        assert err.code() == Code.RESOURCE_EXHAUSTED
        status = api.Status(collafuse_pb2.StatusRequest(), timeout=10)
        assert [c.client_id for c in status.clients] == ["ok"] and status.ByteSize() < 10_000
        assert running.store.count("ok") == 0
    finally:
        running.stop(0)


def test_a_handler_error_echoing_many_values_is_cut_not_turned_into_resource_exhausted(tmp_path: Path) -> None:
    """1,000 unknown class names of 128 characters, each within the limits: the error lists them, cut short."""
    running = start(tmp_path, start_trainer=False)
    try:
        names = [f"{i:04d}" + "n" * 124 for i in range(1_000)]
        err = rpc_error(stub(running).Register, collafuse_pb2.RegisterRequest(
            client_id="c", cut=20, protocol=collafuse_pb2.PROTOCOL_AMBIENT, class_names=names))
        assert err.code() == Code.INVALID_ARGUMENT, err.details()[:200]
        assert "more characters" in err.details() and len(err.details()) < MAX_DETAILS_CHARS + 100
    finally:
        running.stop(0)


def test_transcript_stores_admitted_requests_only_and_stays_outside_forget(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    transcript = tmp_path / "transcript.jsonl"
    running = start(tmp_path / "store", start_trainer=False, transcript=transcript, token="s3cret")
    try:
        anonymous, member = stub(running), stub(running, token="s3cret")
        big = collafuse_pb2.RegisterRequest(client_id="intruder", cut=20, class_names=["a" * 100] * 1_000)
        with caplog.at_level(logging.WARNING):
            for _ in range(3):
                assert rpc_error(anonymous.Register, big).code() == Code.UNAUTHENTICATED
        assert "3 denied calls so far" in caplog.text  # counted...
        assert transcript.read_bytes() == b""  # ...not stored
        register(member, "c1", cut=20)
        assert upload(member, chunks("c1", 20, 3, 3)).stored == 3
        with caplog.at_level(logging.WARNING):
            assert member.Forget(collafuse_pb2.ForgetRequest(client_id="c1"), timeout=10).removed == 3
        assert "still holds what it sent" in caplog.text
        undecodable = rpc_error(member.Register, collafuse_pb2.RegisterRequest(client_id="c" * 200))
        assert undecodable.code() == Code.INVALID_ARGUMENT  # over the limit: rejected before the transcript
    finally:
        running.stop(0)
    methods = [json.loads(line)["method"].rsplit("/", 1)[1] for line in transcript.read_text().splitlines()]
    # An audit log outside Forget: the releases are still recorded after Forget deleted them from the store.
    assert methods == ["Register", "Release", "Forget"]
    assert not hasattr(TranscriptInterceptor(), "messages_received")
