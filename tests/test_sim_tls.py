"""``collafuse-sim --tls`` (issue 8): every process of the simulation talks mutual TLS with certificates from a
development CA in <out>/certs; the simulation watches the server with its own operator certificate ("sim")."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from test_e2e import SIZE, _digits_folder

from collafuse.common.rpc import open_channel
from collafuse.common.settings import ConfigError, to_cli_args
from collafuse.common.tls import channel_credentials
from collafuse.deploy import healthcheck
from collafuse.deploy.healthcheck import check as health_check
from collafuse.deploy.sim import (
    SIM_IDENTITY,
    SimSettings,
    client_command,
    client_settings,
    run,
    server_command,
    server_settings,
    sim_pki,
)
from collafuse.deploy.tls import DevPki, Issued
from collafuse.server.app import CollaFuseServer, build_server
from collafuse.v1 import collafuse_pb2, collafuse_pb2_grpc

CLASSES = ["0", "1", "2", "3"]


def test_tls_settings_reach_every_process(tmp_path: Path) -> None:
    settings = SimSettings(out=tmp_path, clients=2, tls=True)
    pki = sim_pki(settings)
    assert pki is not None and set(pki.clients) == {"client-0", "client-1", SIM_IDENTITY}
    server = server_settings(settings, 4321, CLASSES, pki)
    assert (server.tls_cert, server.tls_key, server.tls_ca) == (pki.server.cert, pki.server.key, pki.ca.cert)
    assert server.operators == [SIM_IDENTITY], "the simulation's Status calls must see every client"
    for k in range(2):
        client = client_settings(settings, k, tmp_path, 4321, pki)
        assert (client.client_id, client.tls_cert, client.tls_ca) == (f"client-{k}", pki.clients[f"client-{k}"].cert,
                                                                      pki.ca.cert)
    assert "--tls-ca" in server_command(settings, 4321, CLASSES, pki).args
    assert "--tls-cert" in client_command(settings, 0, tmp_path, 4321, pki).args
    with pytest.raises(ConfigError, match="--tls"):  # never a silent fall-back to plaintext
        server_settings(settings, 4321, CLASSES)
    plain = SimSettings(out=tmp_path)
    assert sim_pki(plain) is None
    assert "--tls-ca" not in to_cli_args(server_settings(plain, 4321, CLASSES))


def _pki_of(certs: Path, client_ids: list[str]) -> DevPki:
    """The run's own certificates, read back from <out>/certs."""

    def issued(name: str) -> Issued:
        return Issued(certs / f"{name}.pem", certs / f"{name}.key")

    return DevPki(issued("ca"), issued("server"), {cid: issued(cid) for cid in client_ids})


@pytest.fixture(scope="module")
def tls_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SimSettings, DevPki, CollaFuseServer]]:
    """A short 2-client simulation with --tls, then its server restarted in-process from the same settings."""
    root = tmp_path_factory.mktemp("sim-tls")
    settings = SimSettings(
        clients=2, cut=200, steps=6, client_steps=4, dataset=str(_digits_folder(root / "digits", per_class=4)),
        partition="classes", out=root / "run", seed=3, batch_size=8, image_size=SIZE, samples_per_class=1,
        inference_steps=5, threads=1, timeout=600, tls=True,
    )
    run(settings)
    pki = _pki_of(settings.out / "certs", ["client-0", "client-1", SIM_IDENTITY])
    server = build_server(server_settings(settings, 0, CLASSES, pki), start_trainer=False)
    try:
        yield settings, pki, server
    finally:
        server.stop(0)


def test_sim_with_tls_completes(tls_run: tuple[SimSettings, DevPki, CollaFuseServer]) -> None:
    settings, _, _ = tls_run
    metrics = json.loads((settings.out / "metrics.json").read_text())
    for k in range(2):
        client = metrics["clients"][f"client-{k}"]
        assert client["contribution"]["stored"] == client["num_images"] > 0, f"client-{k} released over mTLS: {client}"
        assert np.isfinite(np.load(settings.out / "clients" / f"client-{k}" / "samples" / "samples.npy")).all()
    assert metrics["server"]["step"] == settings.steps


def test_plaintext_is_refused_and_the_sim_certificate_is_an_operator(
    tls_run: tuple[SimSettings, DevPki, CollaFuseServer],
) -> None:
    _, pki, server = tls_run

    def credentials(who: str) -> grpc.ChannelCredentials | None:
        fields = pki.client_fields(who)
        return channel_credentials(fields["tls_cert"], fields["tls_key"], fields["tls_ca"])

    def seen(who: str | None) -> set[str]:
        api = collafuse_pb2_grpc.CollaFuseStub(open_channel(server.address, credentials=credentials(who) if who else None))
        return {c.client_id for c in api.Status(collafuse_pb2.StatusRequest(), timeout=10).clients}

    assert not health_check(server.address, timeout=3), "a plaintext probe must not reach the health service"
    with pytest.raises(grpc.RpcError) as refused:
        seen(None)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE  # the TLS handshake fails before any RPC
    assert health_check(server.address, timeout=5, credentials=credentials(SIM_IDENTITY))
    assert seen(SIM_IDENTITY) == {"client-0", "client-1"}
    assert seen("client-1") == {"client-1"}, "a client sees only its own entry"


def test_healthcheck_cli_takes_a_certificate_from_flags_or_the_environment(
    tls_run: tuple[SimSettings, DevPki, CollaFuseServer], monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    _, pki, server = tls_run
    probe = pki.client_fields(SIM_IDENTITY)
    for name in probe:
        monkeypatch.delenv(f"COLLAFUSE_{name.upper()}", raising=False)
    assert healthcheck.main([server.address, "--timeout", "3"]) == 1, "plaintext against mTLS is not healthy"
    flags = [arg for name, path in probe.items() for arg in (f"--{name.replace('_', '-')}", str(path))]
    assert healthcheck.main([server.address, *flags]) == 0
    for name, path in probe.items():  # what the Docker healthcheck of a TLS server container reads
        monkeypatch.setenv(f"COLLAFUSE_{name.upper()}", str(path))
    assert healthcheck.main([server.address]) == 0
    assert healthcheck.main([server.address, "--tls-key", str(tmp_path / "missing.key")]) == 2
