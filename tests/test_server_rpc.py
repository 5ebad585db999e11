"""The servicer over real loopback gRPC: registration, releases, forgetting, status, and every error code."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from server_support import CLASSES, SHAPE, T, chunks, register, release_item, rpc_error, start, stub, upload

from collafuse.common.codec import encode
from collafuse.common.schedule import ScheduleConfig, fingerprint
from collafuse.server.app import CollaFuseServer
from collafuse.v1 import collafuse_pb2, tensor_pb2

torch.set_num_threads(1)
INVALID = grpc.StatusCode.INVALID_ARGUMENT
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CollaFuseServer]:
    # No trainer: these tests are about the protocol, and the CPU is shared.
    running = start(tmp_path_factory.mktemp("rpc"), start_trainer=False)
    yield running
    running.stop(0)


@pytest.fixture(scope="module")
def api(server: CollaFuseServer):  # type: ignore[no-untyped-def]
    return stub(server)


def chunk(client_id: str, cut: int, *items: collafuse_pb2.ReleaseItem) -> list[collafuse_pb2.ReleaseChunk]:
    return [collafuse_pb2.ReleaseChunk(client_id=client_id, cut=cut, items=list(items))]


def test_register_reply_carries_the_servers_contract(api, server: CollaFuseServer) -> None:  # type: ignore[no-untyped-def]
    reply = register(api, "reg-ok", image_spec=collafuse_pb2.ImageSpec(channels=1, height=8, width=8))
    assert reply.fingerprint == fingerprint(server.settings.schedule(), SHAPE, CLASSES)
    assert (reply.image_spec.channels, reply.image_spec.height, reply.image_spec.width) == SHAPE
    assert list(reply.class_names) == CLASSES and reply.releases_stored == 0
    assert json.loads(reply.schedule.config_json)["num_train_timesteps"] == T
    assert json.loads(reply.schedule.config_json)["beta_schedule"] == "linear"
    assert ScheduleConfig.from_wire(reply.schedule.config_json, reply.schedule.fingerprint) == server.settings.schedule()
    assert reply.server_id.startswith("collafuse-")
    # Idempotent, and the client may pin the fingerprint it saw.
    again = register(api, "reg-ok", expected_fingerprint=reply.fingerprint)
    assert again.fingerprint == reply.fingerprint


@pytest.mark.parametrize(
    ("fields", "code", "needle"),
    [
        ({"client_id": ""}, INVALID, "client_id is empty"),
        ({"protocol": collafuse_pb2.PROTOCOL_UNSPECIFIED}, INVALID, "protocol 'unspecified' is not supported"),
        ({"protocol": 7}, INVALID, "protocol 'unknown-7' is not supported: this server speaks ambient"),
        ({"cut": -1}, INVALID, f"outside [0, {T}]"),
        ({"cut": T + 1}, INVALID, f"outside [0, {T}]"),
        ({"class_names": ["a", "zebra"]}, INVALID, "classes ['zebra'] are not served"),
        ({"image_spec": collafuse_pb2.ImageSpec(channels=1, height=16, width=16)}, INVALID,
         "server serves 8x8x1, client sent 16x16x1"),
        ({"expected_fingerprint": "0" * 64}, PRECONDITION, "delete the client workdir's state"),
    ],
)
def test_register_rejects(api, fields: dict, code: grpc.StatusCode, needle: str) -> None:  # type: ignore[no-untyped-def]
    request = {"client_id": "bad-register", "cut": 20, "protocol": collafuse_pb2.PROTOCOL_AMBIENT, "class_names": ["a"], **fields}
    err = rpc_error(api.Register, collafuse_pb2.RegisterRequest(**request))
    assert err.code() == code
    assert needle in err.details()


def test_cut_change_needs_forget_first(api) -> None:  # type: ignore[no-untyped-def]
    register(api, "mover", cut=20)
    assert upload(api, chunks("mover", 20, 3, 2)).stored == 3
    assert register(api, "mover", cut=20).releases_stored == 3
    err = rpc_error(api.Register, collafuse_pb2.RegisterRequest(client_id="mover", cut=30, protocol=collafuse_pb2.PROTOCOL_AMBIENT))
    assert err.code() == PRECONDITION and "run forget first" in err.details()
    assert api.Forget(collafuse_pb2.ForgetRequest(client_id="mover"), timeout=10).removed == 3
    assert register(api, "mover", cut=30).releases_stored == 0


def test_cut_zero_is_logged_loudly(api, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    with caplog.at_level(logging.WARNING, logger="collafuse.server.servicer"):
        register(api, "global-model", cut=0)
    assert "RAW IMAGES" in caplog.text


def test_release_is_idempotent_and_acked_after_commit(api, server: CollaFuseServer) -> None:  # type: ignore[no-untyped-def]
    register(api, "uploader", cut=20)
    first = upload(api, chunks("uploader", 20, 5, 2))
    assert (first.stored, first.duplicates, first.total_for_client) == (5, 0, 5)
    assert server.store.count("uploader") == 5, "acknowledged means stored"
    retry = upload(api, chunks("uploader", 20, 7, 3))
    assert (retry.stored, retry.duplicates, retry.total_for_client) == (2, 5, 7)
    assert upload(api, []).stored == 0


def test_release_rejects(api) -> None:  # type: ignore[no-untyped-def]
    register(api, "rel-bad", cut=20, classes=["a", "b"])
    register(api, "icm", cut=T)

    def check(chunk_list: list[collafuse_pb2.ReleaseChunk], code: grpc.StatusCode, needle: str) -> None:
        err = rpc_error(api.Release, iter(chunk_list))
        assert err.code() == code, err.details()
        assert needle in err.details()

    good = release_item("k", 0)
    check(chunk("", 20, good), INVALID, "client_id is empty")
    check(chunk("stranger", 20, good), PRECONDITION, "call Register before Release")
    check(chunk("rel-bad", 25, good), INVALID, "registered cut 20")
    check(chunk("rel-bad", T + 5, good), INVALID, f"outside [0, {T}]")
    check(chunk("icm", T, good), INVALID, "releases nothing")
    check(chunk("rel-bad", 20, release_item("", 0)), INVALID, "image_key is empty")
    check(chunk("rel-bad", 20, release_item("k", 7)), INVALID, "label 7 is not a served class index")
    check(chunk("rel-bad", 20, release_item("k", 2)), INVALID, "not among the classes this client registered")
    half = collafuse_pb2.ReleaseItem(image_key="k", label=0, x_cut=encode(torch.zeros(SHAPE, dtype=torch.float16)))
    check(chunk("rel-bad", 20, half), INVALID, "dtype float16 is not accepted")
    check(chunk("rel-bad", 20, release_item("k", 0, torch.zeros(1, 16, 16))), INVALID, "shape [1, 16, 16]")
    check(chunk("rel-bad", 20, release_item("k", 0, torch.full(SHAPE, float("nan")))), INVALID, "NaN or Inf")
    check(chunk("rel-bad", 20, release_item("k", 0, torch.full(SHAPE, 100.0))), INVALID, "outside the accepted range")
    short = collafuse_pb2.ReleaseItem(image_key="k", label=0, x_cut=tensor_pb2.Tensor(dtype="float32", shape=list(SHAPE), data=b"x"))
    check(chunk("rel-bad", 20, short), INVALID, "bytes do not fit")
    check(chunk("rel-bad", 20, collafuse_pb2.ReleaseItem(image_key="k", label=0)), INVALID, "x_cut is missing")
    # A bad chunk after a good one: the stream is all or nothing, so the good one is not stored either.
    err = rpc_error(api.Release, iter(chunk("rel-bad", 20, release_item("ok", 0)) + chunk("rel-bad", 20, release_item("k", 9))))
    assert err.code() == INVALID and "release chunk 1, item 0" in err.details()
    assert "nothing of this stream was stored" in err.details()
    assert register(api, "rel-bad", cut=20, classes=["a", "b"]).releases_stored == 0
    # The same stream without the bad chunk is then stored whole.
    assert upload(api, chunk("rel-bad", 20, release_item("ok", 0))).stored == 1


def test_changed_payload_under_a_stored_key_is_a_counted_conflict(api, server: CollaFuseServer) -> None:  # type: ignore[no-untyped-def]
    register(api, "changer", cut=20)
    before = api.Status(collafuse_pb2.StatusRequest(), timeout=10).release_conflicts
    original = release_item("img-0", 0, seed=1)
    assert upload(api, chunk("changer", 20, original)).stored == 1
    # An identical re-send (a retry) stays an idempotent duplicate.
    again = upload(api, chunk("changer", 20, original))
    assert (again.stored, again.duplicates) == (0, 1)
    # Another payload under the stored key: ALREADY_EXISTS, and the new key in the same stream is not stored.
    changed = release_item("img-0", 0, seed=2)
    err = rpc_error(api.Release, iter(chunk("changer", 20, release_item("img-new", 1, seed=3), changed)))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS, err.details()
    assert "'img-0'" in err.details() and "nothing of this upload was stored" in err.details()
    assert "forget this client" in err.details()
    assert server.store.count("changer") == 1
    # Two payloads for one new key within one stream conflict as well.
    err = rpc_error(api.Release, iter(chunk("changer", 20, release_item("twice", 0, seed=4), release_item("twice", 0, seed=5))))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS and server.store.count("changer") == 1
    status = api.Status(collafuse_pb2.StatusRequest(), timeout=10)
    assert status.release_conflicts == before + 2


def test_forget_and_status(api, server: CollaFuseServer) -> None:  # type: ignore[no-untyped-def]
    register(api, "forgetful", cut=15)
    upload(api, chunks("forgetful", 15, 4, 4))
    api.Heartbeat(collafuse_pb2.HeartbeatRequest(client_id="forgetful"), timeout=10)
    status = api.Status(collafuse_pb2.StatusRequest(), timeout=10)
    mine = {c.client_id: c for c in status.clients}["forgetful"]
    assert (mine.cut, mine.protocol, mine.releases) == (15, collafuse_pb2.PROTOCOL_AMBIENT, 4) and mine.last_seen > 0
    assert status.fingerprint == server.fingerprint and status.device == "cpu"
    assert status.bytes_received > 4 * 256 and status.bytes_sent > 0
    assert status.trainer.phase == collafuse_pb2.PHASE_IDLE and status.trainer.releases >= 4
    assert status.trainer.error == "" and status.trainer.skipped_steps == 0
    assert api.Forget(collafuse_pb2.ForgetRequest(client_id="forgetful"), timeout=10).removed == 4
    assert api.Forget(collafuse_pb2.ForgetRequest(client_id="forgetful"), timeout=10).removed == 0
    assert "forgetful" not in {c.client_id for c in api.Status(collafuse_pb2.StatusRequest(), timeout=10).clients}
    err = rpc_error(api.Forget, collafuse_pb2.ForgetRequest(client_id=""))
    assert err.code() == INVALID
    err = rpc_error(api.Release, iter(chunks("forgetful", 15, 1, 1)))
    assert err.code() == PRECONDITION, "a forgotten client registers again before releasing"
    beat = api.Heartbeat(collafuse_pb2.HeartbeatRequest(client_id="unknown"), timeout=10)
    assert beat.server_time > 0 and beat.trainer.max_steps == 3


@pytest.mark.parametrize(
    ("fields", "code", "needle"),
    [
        ({"client_id": "nobody"}, PRECONDITION, "call Register before Sample"),
        ({"labels": []}, INVALID, "labels is empty"),
        ({"labels": [0] * 17}, grpc.StatusCode.RESOURCE_EXHAUSTED, "at most 16"),
        ({"labels": [0, 4]}, INVALID, "labels[1]: label 4 is not a served class index"),
        ({"cut": T + 1}, INVALID, f"outside [0, {T}]"),
        ({"num_inference_steps": T + 1}, INVALID, "num_inference_steps"),
        ({"scheduler": "euler"}, INVALID, "scheduler 'euler' is unknown"),
        ({"guidance_scale": -1.0}, INVALID, "guidance_scale"),
    ],
)
def test_sample_rejects(api, fields: dict, code: grpc.StatusCode, needle: str) -> None:  # type: ignore[no-untyped-def]
    register(api, "sampler", cut=20)
    request = {"client_id": "sampler", "labels": [0, 1], "seed": 1, "num_inference_steps": 5, "scheduler": "ddpm",
               "guidance_scale": 1.0, "cut": 20, **fields}
    err = rpc_error(api.Sample, collafuse_pb2.SampleRequest(**request))
    assert err.code() == code
    assert needle in err.details()


def test_shutting_down_answers_unavailable(tmp_path: Path) -> None:
    running = start(tmp_path, start_trainer=False)
    try:
        api = stub(running)
        register(api, "late", cut=20)
        running.servicer.begin_shutdown()
        for call, request in (
            (api.Register, collafuse_pb2.RegisterRequest(client_id="late", cut=20, protocol=collafuse_pb2.PROTOCOL_AMBIENT)),
            (api.Status, collafuse_pb2.StatusRequest()),
            (api.Sample, collafuse_pb2.SampleRequest(client_id="late", labels=[0], cut=20)),
        ):
            err = rpc_error(call, request)
            assert err.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in err.details()
        err = rpc_error(api.Release, iter(chunks("late", 20, 1, 1)))
        assert err.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        running.stop(0)
