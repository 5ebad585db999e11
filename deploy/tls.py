"""``collafuse-tls``: a development CA and certificates for mutual TLS (not for production keys).

    collafuse-tls init-ca --dir certs                     certs/ca.pem, certs/ca.key
    collafuse-tls server --dir certs --host localhost --host 127.0.0.1
                                                          certs/server.pem, certs/server.key
    collafuse-tls issue --dir certs --client-id client-0  certs/client-0.pem, certs/client-0.key

A client certificate carries the client id as its common name and as a DNS SAN; the
server accepts a call only for the id its certificate names (server/auth.py).
Keys are EC P-256 and written with mode 0600.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from collafuse.common.runtime import run_cli, setup_logging

log = logging.getLogger("collafuse.tls")

CA_NAME = "ca"
SERVER_NAME = "server"
DEFAULT_DAYS = 365
# A client id becomes a file name and a certificate name: keep it to a safe alphabet.
CLIENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class TlsToolError(ValueError):
    """A request collafuse-tls cannot carry out; the message says what to do."""


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _load_ca(folder: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = folder / f"{CA_NAME}.pem", folder / f"{CA_NAME}.key"
    if not cert_path.is_file() or not key_path.is_file():
        raise TlsToolError(f"no CA in {folder}: run `collafuse-tls init-ca --dir {folder}` first")
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TlsToolError(f"{key_path} is not an EC key made by collafuse-tls")
    return cert, key


def _builder(subject: str, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey, days: int) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        # Backdated a little so a clock that is slightly behind still accepts a fresh certificate.
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
    )


def init_ca(folder: Path, *, days: int = DEFAULT_DAYS * 5, force: bool = False) -> Issued:
    """A self-signed CA in ``folder`` (ca.pem, ca.key); refuses to overwrite one unless ``force``."""
    folder.mkdir(parents=True, exist_ok=True)
    out = Issued(folder / f"{CA_NAME}.pem", folder / f"{CA_NAME}.key")
    if out.cert.exists() and not force:
        raise TlsToolError(f"{out.cert} exists: every certificate it signed would stop working; pass --force to replace it")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "CollaFuse development CA")])
    cert = (
        _builder("CollaFuse development CA", name, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False, data_encipherment=False,
                          key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    _write_key(out.key, key)
    _write_cert(out.cert, cert)
    log.info("development CA written to %s (keep %s private)", out.cert, out.key)
    return out


def _issue(folder: Path, name: str, subject: str, sans: list[x509.GeneralName], usage: x509.ObjectIdentifier,
           days: int) -> Issued:
    ca_cert, ca_key = _load_ca(folder)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _builder(subject, ca_cert.subject, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    out = Issued(folder / f"{name}.pem", folder / f"{name}.key")
    _write_key(out.key, key)
    _write_cert(out.cert, cert)
    return out


def issue_client(folder: Path, client_id: str, *, days: int = DEFAULT_DAYS) -> Issued:
    """``<id>.pem`` / ``<id>.key``: a client certificate whose CN and SAN are the client id."""
    if not CLIENT_ID.match(client_id) or client_id in (CA_NAME, SERVER_NAME):
        raise TlsToolError(
            f"client id {client_id!r}: use letters, digits, '.', '_' or '-' (at most 128, not 'ca' or 'server')"
        )
    out = _issue(folder, client_id, client_id, [x509.DNSName(client_id)], ExtendedKeyUsageOID.CLIENT_AUTH, days)
    log.info("client certificate for %r written to %s", client_id, out.cert)
    return out


def issue_server(folder: Path, hosts: Sequence[str], *, days: int = DEFAULT_DAYS) -> Issued:
    """``server.pem`` / ``server.key`` valid for every name or address in ``hosts`` (what clients dial)."""
    if not hosts:
        raise TlsToolError("give at least one --host: the name or address clients use in --server HOST:PORT")
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host.strip("[]"))))
        except ValueError:
            sans.append(x509.DNSName(host))
    out = _issue(folder, SERVER_NAME, hosts[0], sans, ExtendedKeyUsageOID.SERVER_AUTH, days)
    log.info("server certificate for %s written to %s", ", ".join(hosts), out.cert)
    return out


@dataclass(frozen=True)
class DevPki:
    """A development CA with a server certificate and one certificate per client id (collafuse-sim --tls)."""

    ca: Issued
    server: Issued
    clients: dict[str, Issued]

    def server_fields(self) -> dict[str, Path]:
        """ServerSettings' TLS fields."""
        return {"tls_cert": self.server.cert, "tls_key": self.server.key, "tls_ca": self.ca.cert}

    def client_fields(self, client_id: str) -> dict[str, Path]:
        """ClientSettings' TLS fields for ``client_id``."""
        issued = self.clients[client_id]
        return {"tls_cert": issued.cert, "tls_key": issued.key, "tls_ca": self.ca.cert}


def dev_pki(folder: Path, hosts: Sequence[str], client_ids: Sequence[str]) -> DevPki:
    """A fresh CA in ``folder``, a server certificate for ``hosts`` and a certificate per client id."""
    ca = init_ca(folder, force=True)
    return DevPki(ca, issue_server(folder, hosts), {cid: issue_client(folder, cid) for cid in client_ids})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="collafuse-tls", description="Development CA and certificates for CollaFuse's mutual TLS."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    ca = sub.add_parser("init-ca", help="create ca.pem / ca.key")
    ca.add_argument("--force", action="store_true", help="replace an existing CA (invalidates what it signed)")
    server = sub.add_parser("server", help="create server.pem / server.key")
    server.add_argument("--host", action="append", required=True,
                        help="a DNS name or IP clients dial (repeat: --host localhost --host 127.0.0.1)")
    client = sub.add_parser("issue", help="create <client-id>.pem / .key")
    client.add_argument("--client-id", required=True, help="the id the client runs with (--client-id)")
    for p in (ca, server, client):
        p.add_argument("--dir", type=Path, default=Path("certs"), help="folder of the CA and certificates")
        p.add_argument("--days", type=int, default=None, help="validity in days")
    return parser


def run(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    days = {"days": args.days} if args.days else {}
    if args.command == "init-ca":
        init_ca(args.dir, force=args.force, **days)
    elif args.command == "server":
        issue_server(args.dir, args.host, **days)
    else:
        issue_client(args.dir, args.client_id, **days)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging("INFO", "tls")
    return run_cli(lambda: run(argv), expected=(TlsToolError,))


if __name__ == "__main__":
    raise SystemExit(main())
