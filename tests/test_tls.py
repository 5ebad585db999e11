"""Mutual TLS (issue 8): the certificate's name is the caller's id. No certificate, or one from another CA,
ends at the handshake; a certificate for another id, or a token that disagrees with it, is refused per RPC
without any state changing; a client reconnects with TLS and a token after the server restarts."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from cryptography import x509
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from server_support import register, start
from test_auth import CALLS, own_chunks, refusal

from collafuse.client.connection import ServerConnection, end_of_stream, tls_credentials
from collafuse.client.errors import ClientError
from collafuse.common.config import ClientSettings, ServerSettings
from collafuse.common.rpc import RetryPolicy, open_channel
from collafuse.common.tls import TlsError, channel_credentials, server_credentials
from collafuse.deploy.tls import Issued, TlsToolError, dev_pki, init_ca, issue_client, issue_server, run
from collafuse.server.app import CollaFuseServer
from collafuse.server.auth import add_token
from collafuse.server.errors import StartupError
from collafuse.v1 import collafuse_pb2, collafuse_pb2_grpc

torch.set_num_threads(1)
UNAUTH, DENIED = grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED
HOSTS = ["localhost", "127.0.0.1"]


@dataclass
class Pki:
    folder: Path
    ca: Issued
    server: Issued
    clients: dict[str, Issued]
    rogue: Issued  # "alice" signed by another CA

    def server_settings(self) -> dict[str, Path]:
        return {"tls_cert": self.server.cert, "tls_key": self.server.key, "tls_ca": self.ca.cert}

    def credentials(self, who: str | None) -> grpc.ChannelCredentials | None:
        issued = self.rogue if who == "rogue" else self.clients.get(who or "")
        return channel_credentials(issued.cert if issued else None, issued.key if issued else None, self.ca.cert)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca = init_ca(folder)
    server = issue_server(folder, HOSTS)
    clients = {who: issue_client(folder, who) for who in ("alice", "bob", "ops")}
    other = tmp_path_factory.mktemp("other-ca")
    init_ca(other)
    return Pki(folder, ca, server, clients, issue_client(other, "alice"))


def test_collafuse_tls_makes_a_ca_and_named_certificates(tmp_path: Path) -> None:
    assert run(["init-ca", "--dir", str(tmp_path)]) == 0
    assert run(["server", "--dir", str(tmp_path), "--host", "server", "--host", "127.0.0.1"]) == 0
    assert run(["issue", "--dir", str(tmp_path), "--client-id", "client-0"]) == 0
    cert = x509.load_pem_x509_certificate((tmp_path / "client-0.pem").read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "client-0"
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["client-0"]
    server = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["server"] and len(names.get_values_for_type(x509.IPAddress)) == 1
    assert stat.S_IMODE(os.stat(tmp_path / "client-0.key").st_mode) == 0o600
    with pytest.raises(TlsToolError, match="pass --force"):
        init_ca(tmp_path)
    with pytest.raises(TlsToolError, match="client id 'a b'"):
        issue_client(tmp_path, "a b")
    with pytest.raises(TlsToolError, match="no CA in"):
        issue_client(tmp_path / "empty", "x")


def test_tls_files_are_checked_with_a_message_that_names_the_flag(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(TlsError, match="--tls-cert and --tls-key together"):
        server_credentials(pki.server.cert, None, None)
    with pytest.raises(TlsError, match="--tls-ca needs"):
        server_credentials(None, None, pki.ca.cert)
    (tmp_path / "bad.pem").write_text("not a certificate")
    with pytest.raises(TlsError, match="--tls-ca .*bad.pem is not a PEM file"):
        channel_credentials(None, None, tmp_path / "bad.pem")
    with pytest.raises(ClientError, match="--tls-key .*cannot read it"):
        tls_credentials(pki.clients["alice"].cert, tmp_path / "missing.key", pki.ca.cert)
    with pytest.raises(StartupError, match="--tls-cert"):
        start(tmp_path / "store", start_trainer=False, tls_cert=tmp_path / "missing.pem", tls_key=pki.server.key)


class MtlsServer:
    def __init__(self, pki: Pki, server: CollaFuseServer, tokens: dict[str, str]) -> None:
        self.pki = pki
        self.server = server
        self.tokens = tokens

    def stub(self, cert: str | None, token: str | None = None) -> collafuse_pb2_grpc.CollaFuseStub:
        credentials = self.pki.credentials(cert)
        return collafuse_pb2_grpc.CollaFuseStub(open_channel(self.server.address, self.tokens.get(token or ""), credentials))

    def state(self) -> tuple[object, ...]:
        return self.server.store.clients(), self.server.store.counts(), self.server.store.version


@pytest.fixture(scope="module")
def mtls(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MtlsServer]:
    root = tmp_path_factory.mktemp("mtls")
    running = start(root / "store", start_trainer=False, operators=["ops"], **pki.server_settings())
    server = MtlsServer(pki, running, {})
    try:
        alice, bob = server.stub("alice"), server.stub("bob")
        register(alice, "alice", cut=20, classes=["a", "b"])
        register(bob, "bob", cut=30, classes=["c"])
        assert alice.Release(end_of_stream(own_chunks("alice", 20, [0, 1], "alice")), timeout=30).stored == 2
        assert bob.Release(end_of_stream(own_chunks("bob", 30, [2], "bob")), timeout=30).stored == 1
        yield server
    finally:
        running.stop(0)


@pytest.mark.parametrize("rpc", list(CALLS))
@pytest.mark.parametrize("cert", [None, "rogue"])
def test_no_certificate_or_another_cas_ends_at_the_handshake(mtls: MtlsServer, rpc: str, cert: str | None) -> None:
    before = mtls.state()
    err = refusal(CALLS[rpc], mtls.stub(cert), "alice")
    # require_client_auth: the TLS handshake fails before any RPC exists, so gRPC reports UNAVAILABLE.
    assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
    assert mtls.state() == before


def test_plaintext_to_a_tls_server_is_refused(mtls: MtlsServer) -> None:
    api = collafuse_pb2_grpc.CollaFuseStub(open_channel(mtls.server.address))
    assert refusal(CALLS["Status"], api, "alice").code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("rpc", [r for r in CALLS if r != "Status"])
def test_a_certificate_for_another_id_is_permission_denied(mtls: MtlsServer, rpc: str) -> None:
    before = mtls.state()
    err = refusal(CALLS[rpc], mtls.stub("alice"), "bob")
    assert err.code() == DENIED and "'alice', not 'bob'" in err.details(), err.details()
    assert mtls.state() == before


def test_status_per_certificate_and_probes_with_any_valid_certificate(mtls: MtlsServer) -> None:
    def seen(who: str) -> set[str]:
        return {c.client_id for c in mtls.stub(who).Status(collafuse_pb2.StatusRequest(), timeout=10).clients}

    assert seen("alice") == {"alice"} and seen("bob") == {"bob"} and seen("ops") == {"alice", "bob"}
    channel = open_channel(mtls.server.address, credentials=mtls.pki.credentials("ops"))
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.fixture(scope="module")
def mtls_tokens(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MtlsServer]:
    root = tmp_path_factory.mktemp("mtls-tokens")
    tokens = {who: add_token(root / "tokens", who) for who in ("alice", "bob")}
    running = start(root / "store", start_trainer=False, tokens=root / "tokens", **pki.server_settings())
    try:
        yield MtlsServer(pki, running, tokens)
    finally:
        running.stop(0)


@pytest.mark.parametrize(
    ("cert", "token", "code", "needle"),
    [
        ("alice", None, UNAUTH, "missing token"),
        ("alice", "bob", DENIED, "the token belongs to 'bob' but the certificate names ['alice']"),
    ],
)
def test_token_and_certificate_must_name_the_same_client(
    mtls_tokens: MtlsServer, cert: str, token: str | None, code: grpc.StatusCode, needle: str
) -> None:
    before = mtls_tokens.state()
    err = refusal(CALLS["Register"], mtls_tokens.stub(cert, token), cert)
    assert err.code() == code and needle in err.details(), err.details()
    assert mtls_tokens.state() == before
    assert register(mtls_tokens.stub("bob", "bob"), "bob", cut=20).fingerprint == mtls_tokens.server.fingerprint


def test_reconnect_with_tls_and_a_token_after_a_server_restart(pki: Pki, tmp_path: Path) -> None:
    token = add_token(tmp_path / "tokens", "alice")
    settings = {"tokens": tmp_path / "tokens", **pki.server_settings()}
    first = start(tmp_path / "store", start_trainer=False, **settings)
    port = first.port
    alice = pki.clients["alice"]
    credentials = tls_credentials(alice.cert, alice.key, pki.ca.cert)
    policy = RetryPolicy(wait_timeout=60.0, initial_delay=0.2, max_delay=1.0)
    with ServerConnection(first.address, token, policy, rpc_timeout=10, credentials=credentials) as conn:
        conn.register("alice", 20, "ambient", ["a"])
        first.stop(0)
        second = start(tmp_path / "store", start_trainer=False, port=port, **settings)
        try:
            # Same channel: it reconnects, redoes the handshake and sends the token again.
            assert [c.client_id for c in conn.status().clients] == ["alice"]
            assert conn.heartbeat("alice").server_time > 0
        finally:
            second.stop(0)


def test_dev_pki_gives_each_process_its_settings(tmp_path: Path) -> None:
    pki = dev_pki(tmp_path, HOSTS, ["client-0", "sim"])
    # As dict[str, Path], ** would also have to fit BaseSettings' typed _-prefixed keywords (_case_sensitive, ...).
    server_tls: dict[str, Any] = pki.server_fields()
    client_tls: dict[str, Any] = pki.client_fields("client-0")
    server, client = ServerSettings(**server_tls), ClientSettings(**client_tls)
    assert server_credentials(server.tls_cert, server.tls_key, server.tls_ca) is not None
    assert tls_credentials(client.tls_cert, client.tls_key, client.tls_ca) is not None
    assert pki.client_fields("sim")["tls_ca"] == pki.ca.cert == tmp_path / "ca.pem"
