"""The assembled server: health and reflection, server.json, port in use, transcript, token auth."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from server_support import chunks, register, rpc_error, start, stub, upload

from collafuse.client.connection import end_of_stream
from collafuse.common.rpc import open_channel
from collafuse.server.app import SERVICE_NAME
from collafuse.server.errors import PortInUse, StoreError
from collafuse.v1 import collafuse_pb2

torch.set_num_threads(1)


def test_health_reflection_and_server_file(tmp_path: Path) -> None:
    running = start(tmp_path, start_trainer=False)
    try:
        channel = open_channel(running.address)
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        replies = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(iter([request]), timeout=10)
        names = {s.name for r in replies for s in r.list_services_response.service}
        assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names
        info = json.loads((tmp_path / "server.json").read_text())
        assert info["port"] == running.port > 0 and info["pid"] == os.getpid()
        assert info["fingerprint"] == running.fingerprint
    finally:
        running.stop(0)
    assert not (tmp_path / "server.json").exists()


def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    first = start(tmp_path / "one", start_trainer=False)
    try:
        with pytest.raises(PortInUse) as info:
            start(tmp_path / "two", start_trainer=False, port=first.port)
        assert str(info.value) == f"port {first.port} is in use: pick another --port or stop the other process"
    finally:
        first.stop(0)


def test_transcript_records_every_message_of_a_streamed_release(tmp_path: Path) -> None:
    transcript = tmp_path / "audit" / "transcript.jsonl"
    running = start(tmp_path / "store", start_trainer=False, transcript=transcript)
    try:
        api = stub(running)
        register(api, "audited", cut=20)
        sent = chunks("audited", 20, 5, 2)  # three messages in one stream
        assert upload(api, sent).stored == 5
        status = api.Status(collafuse_pb2.StatusRequest(), timeout=10)
    finally:
        running.stop(0)
    lines = [json.loads(line) for line in transcript.read_text().splitlines()]
    releases = [r for r in lines if r["method"] == "/collafuse.v1.CollaFuse/Release"]
    assert [r["request_type"] for r in releases] == ["collafuse.v1.ReleaseChunk"] * 3
    received = [collafuse_pb2.ReleaseChunk.FromString(base64.b64decode(r["payload_b64"])) for r in releases]
    assert received == list(end_of_stream(sent))  # the final message carries the end-of-stream marker
    assert [r["method"].rsplit("/", 1)[1] for r in lines] == ["Register", "Release", "Release", "Release", "Status"]
    assert all(r["time"] > 0 and r["peer"] for r in lines)
    assert status.bytes_received >= sum(c.ByteSize() for c in sent)


def test_token_auth(tmp_path: Path) -> None:
    running = start(tmp_path, start_trainer=False, token="s3cret")
    try:
        anonymous, wrong, member = stub(running), stub(running, token="guess"), stub(running, token="s3cret")
        for api in (anonymous, wrong):
            err = rpc_error(api.Register, collafuse_pb2.RegisterRequest(client_id="x", cut=20, protocol=collafuse_pb2.PROTOCOL_AMBIENT))
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "token" in err.details()
            assert rpc_error(api.Release, iter(chunks("x", 20, 1, 1))).code() == grpc.StatusCode.UNAUTHENTICATED
            err = rpc_error(api.Sample, collafuse_pb2.SampleRequest(client_id="x", labels=[0]))
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        assert register(member, "x", cut=20).fingerprint == running.fingerprint
        # Probes stay open.
        health = health_pb2_grpc.HealthStub(open_channel(running.address))
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
    finally:
        running.stop(0)


def test_one_server_per_store(tmp_path: Path) -> None:
    first = start(tmp_path, start_trainer=False)
    try:
        with pytest.raises(StoreError, match="in use by another running collafuse-server"):
            start(tmp_path, start_trainer=False)
    finally:
        first.stop(0)
    start(tmp_path, start_trainer=False).stop(0)  # free again after stop
