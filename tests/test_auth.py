"""Per-client tokens (issue 8, "every participant has an identity"): each RPC refuses a wrong or missing
token (UNAUTHENTICATED) and another client's id (PERMISSION_DENIED) without changing any state; Status
shows a client only itself (an operator sees all); Sample serves only the caller's classes and cuts."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from server_support import T, register, release_item, rpc_error, start, stub, upload

from collafuse.common.rpc import open_channel
from collafuse.server.app import CollaFuseServer
from collafuse.server.auth import (
    AuthConfigError,
    Authenticator,
    TokenTable,
    add_token,
    hash_token,
    run,
    token_client_id,
    verify_token,
)
from collafuse.server.errors import StartupError
from collafuse.v1 import collafuse_pb2
from collafuse.v1.collafuse_pb2_grpc import CollaFuseStub as Stub

torch.set_num_threads(1)
UNAUTH, DENIED = grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED


# ---- tokens at rest -----------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["sha256", "scrypt"])
def test_token_hashes_verify_only_the_token(scheme: str) -> None:
    stored = hash_token("alice.s3cret", scheme)
    assert stored.startswith(scheme + "$") and "s3cret" not in stored
    assert verify_token("alice.s3cret", stored)
    assert not verify_token("alice.s3creT", stored) and not verify_token("", stored)


def test_tokens_file_holds_hashes_and_says_what_is_wrong(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    token = add_token(path, "alice")
    assert token_client_id(token) == "alice" and token not in path.read_text()
    assert path.stat().st_mode & 0o077 == 0, "the tokens file is private to its owner"
    with pytest.raises(AuthConfigError, match="pass --replace"):
        add_token(path, "alice")
    renewed = add_token(path, "alice", scheme="scrypt", replace=True)
    table = TokenTable.load(path)
    assert table.identify(renewed) == "alice" and table.identify(token) is None  # the old one stopped working
    assert table.identify("bob." + renewed.split(".", 1)[1]) is None
    (tmp_path / "plain").write_text("alice alice.s3cret\n")
    with pytest.raises(AuthConfigError, match="line 1: not a token hash"):
        TokenTable.load(tmp_path / "plain")
    (tmp_path / "twice").write_text(path.read_text() * 2)
    with pytest.raises(AuthConfigError, match="appears twice"):
        TokenTable.load(tmp_path / "twice")
    with pytest.raises(AuthConfigError, match="cannot read it"):
        TokenTable.load(tmp_path / "missing")


def test_collafuse_token_prints_the_token_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["--tokens", str(tmp_path / "tokens"), "--client-id", "carol"]) == 0
    token = capsys.readouterr().out.strip()
    assert TokenTable.load(tmp_path / "tokens").identify(token) == "carol"


def test_credential_combinations_that_make_no_sense_are_refused(tmp_path: Path) -> None:
    add_token(tmp_path / "tokens", "alice")
    with pytest.raises(AuthConfigError, match="not both"):
        Authenticator.from_settings(tmp_path / "tokens", "shared", False, [])
    with pytest.raises(AuthConfigError, match="--operators needs"):
        Authenticator.from_settings(None, None, False, ["ops"])
    assert Authenticator.from_settings(None, None, False, []) is None
    with pytest.raises(StartupError, match="--tokens .*cannot read it"):
        start(tmp_path / "store", start_trainer=False, tokens=tmp_path / "nothing")


# ---- the server with per-client tokens ------------------------------------------------------------


class Tokens:
    def __init__(self, server: CollaFuseServer, tokens: dict[str, str]) -> None:
        self.server = server
        self.tokens = tokens

    def stub(self, who: str | None) -> Stub:
        return stub(self.server, token=self.tokens.get(who or "", who))

    def state(self) -> tuple[Any, ...]:
        store = self.server.store
        return store.clients(), store.counts(), store.version


def own_chunks(client_id: str, cut: int, labels: list[int], prefix: str) -> list[collafuse_pb2.ReleaseChunk]:
    items = [release_item(f"{prefix}-{i}", y, seed=i) for i, y in enumerate(labels)]
    return [collafuse_pb2.ReleaseChunk(client_id=client_id, cut=cut, items=items)]


@pytest.fixture(scope="module")
def tokened(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tokens]:
    root = tmp_path_factory.mktemp("auth")
    tokens = {who: add_token(root / "tokens", who) for who in ("alice", "bob", "ops")}
    running = start(root / "store", start_trainer=False, tokens=root / "tokens", operators=["ops"])
    server = Tokens(running, tokens)
    try:
        alice, bob = server.stub("alice"), server.stub("bob")
        register(alice, "alice", cut=20, classes=["a", "b"])
        register(bob, "bob", cut=30, classes=["c"])
        assert upload(alice, own_chunks("alice", 20, [0, 1, 0], "alice")).stored == 3
        assert upload(bob, own_chunks("bob", 30, [2, 2], "bob")).stored == 2
        yield server
    finally:
        running.stop(0)


# Every CollaFuse RPC, as alice would call it for ``client_id``.
CALLS: dict[str, Callable[[Stub, str], Any]] = {
    "Register": lambda api, cid: api.Register(
        collafuse_pb2.RegisterRequest(client_id=cid, cut=10, protocol=collafuse_pb2.PROTOCOL_AMBIENT, class_names=["a", "b", "c"]),
        timeout=10,
    ),
    "Heartbeat": lambda api, cid: api.Heartbeat(collafuse_pb2.HeartbeatRequest(client_id=cid), timeout=10),
    "Release": lambda api, cid: api.Release(iter(own_chunks(cid, 30, [2], "injected")), timeout=10),
    "Forget": lambda api, cid: api.Forget(collafuse_pb2.ForgetRequest(client_id=cid), timeout=10),
    "Sample": lambda api, cid: list(api.Sample(collafuse_pb2.SampleRequest(client_id=cid, labels=[2], cut=0), timeout=10)),
    "Status": lambda api, cid: api.Status(collafuse_pb2.StatusRequest(), timeout=10),
    "FetchModel": lambda api, cid: list(api.FetchModel(collafuse_pb2.FetchModelRequest(client_id=cid), timeout=10)),
}


def refusal(call: Callable[[Stub, str], Any], api: Stub, client_id: str) -> grpc.RpcError:
    try:
        call(api, client_id)
    except grpc.RpcError as exc:
        return exc
    raise AssertionError("the call succeeded but should have been refused")


@pytest.mark.parametrize("rpc", list(CALLS))
@pytest.mark.parametrize("who", [None, "guess", "alice.wrong-secret", "nobody.x"])
def test_missing_or_wrong_token_is_unauthenticated(tokened: Tokens, rpc: str, who: str | None) -> None:
    before = tokened.state()
    err = refusal(CALLS[rpc], tokened.stub(who), "bob")
    assert err.code() == UNAUTH and "token" in err.details(), err.details()
    assert tokened.state() == before


@pytest.mark.parametrize("rpc", [r for r in CALLS if r != "Status"])
def test_another_clients_id_is_permission_denied(tokened: Tokens, rpc: str) -> None:
    before = tokened.state()
    err = refusal(CALLS[rpc], tokened.stub("alice"), "bob")
    assert err.code() == DENIED, err.details()
    assert "'alice', not 'bob'" in err.details() and "act only as itself" in err.details()
    assert tokened.state() == before  # bob's registration, releases and last-seen time untouched


def test_an_operator_may_not_act_for_a_client_either(tokened: Tokens) -> None:
    before = tokened.state()
    assert refusal(CALLS["Forget"], tokened.stub("ops"), "bob").code() == DENIED
    assert tokened.state() == before


def test_every_chunk_of_a_release_stream_is_checked(tokened: Tokens) -> None:
    before = tokened.server.store.counts()
    stream = own_chunks("alice", 20, [0], "mixed") + own_chunks("bob", 20, [0], "mixed-bob")
    err = rpc_error(tokened.stub("alice").Release, iter(stream))
    assert err.code() == DENIED
    assert tokened.server.store.counts()["bob"] == before["bob"]


def test_status_shows_a_client_only_itself_and_an_operator_everyone(tokened: Tokens) -> None:
    def seen(who: str) -> set[str]:
        return {c.client_id for c in tokened.stub(who).Status(collafuse_pb2.StatusRequest(), timeout=10).clients}

    assert seen("alice") == {"alice"}
    assert seen("bob") == {"bob"}
    assert seen("ops") == {"alice", "bob"}


def test_probes_stay_open(tokened: Tokens) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(open_channel(tokened.server.address))
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"labels": [2]}, "class 'c' is not among the classes client 'alice' registered"),
        ({"labels": [0, 3]}, "labels[1]: the null label samples every class"),
        ({"cut": 0}, "cut 0: client 'alice' registered cut 20"),
        ({"cut": 19}, "not trained below 20"),
    ],
)
def test_sample_serves_only_own_classes_and_trained_cuts(tokened: Tokens, fields: dict[str, Any], needle: str) -> None:
    request = {"client_id": "alice", "labels": [0, 1], "num_inference_steps": 2, "cut": 20, **fields}
    err = rpc_error(tokened.stub("alice").Sample, collafuse_pb2.SampleRequest(**request))
    assert err.code() == DENIED and needle in err.details(), err.details()


@pytest.mark.parametrize("cut", [20, 30, T])
def test_sample_at_own_or_a_trained_cut_is_served(tokened: Tokens, cut: int) -> None:
    request = collafuse_pb2.SampleRequest(client_id="alice", labels=[0, 1], num_inference_steps=2, cut=cut)
    events = list(tokened.stub("alice").Sample(request, timeout=60))
    assert events[-1].WhichOneof("event") == "chunk"


def test_the_shared_dev_token_still_acts_for_anyone(tmp_path: Path) -> None:
    running = start(tmp_path, start_trainer=False, token="dev")
    try:
        api = stub(running, token="dev")
        register(api, "x", cut=20)
        register(api, "y", cut=20)
        assert {c.client_id for c in api.Status(collafuse_pb2.StatusRequest(), timeout=10).clients} == {"x", "y"}
        assert rpc_error(stub(running, token="x.dev").Status, collafuse_pb2.StatusRequest()).code() == UNAUTH
    finally:
        running.stop(0)
