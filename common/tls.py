"""TLS credentials for both ends: PEM files in, gRPC credentials out, with errors that say which file.

The server requires a client certificate whenever it is given a CA (mutual TLS): the
certificate's common name or a subject alternative name is the client's identity
(``server/auth.py``). ``collafuse-tls`` (deploy/tls.py) makes a development CA and certificates.
"""

from __future__ import annotations

from pathlib import Path

import grpc


class TlsError(ValueError):
    """TLS files that cannot be used; the message names the file and the flag."""


def read_pem(path: Path, flag: str) -> bytes:
    """The bytes of a PEM file, or a TlsError naming the flag it came from."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise TlsError(f"{flag} {path}: cannot read it ({exc.strerror}); create it with collafuse-tls") from None
    if b"-----BEGIN " not in data:
        raise TlsError(f"{flag} {path} is not a PEM file (no '-----BEGIN' line)")
    return data


def _pair(cert: Path | None, key: Path | None, side: str) -> tuple[bytes, bytes] | None:
    if (cert is None) != (key is None):
        raise TlsError(f"{side}: give --tls-cert and --tls-key together (a certificate without its key, or "
                       "the other way round, cannot be used)")
    if cert is None or key is None:
        return None
    return read_pem(key, "--tls-key"), read_pem(cert, "--tls-cert")


def server_credentials(cert: Path | None, key: Path | None, ca: Path | None) -> grpc.ServerCredentials | None:
    """None without TLS settings; with --tls-ca, clients must present a certificate signed by that CA."""
    pair = _pair(cert, key, "collafuse-server")
    if pair is None:
        if ca is not None:
            raise TlsError("collafuse-server: --tls-ca needs the server's own --tls-cert and --tls-key as well")
        return None
    roots = read_pem(ca, "--tls-ca") if ca is not None else None
    return grpc.ssl_server_credentials([pair], root_certificates=roots, require_client_auth=roots is not None)


def channel_credentials(cert: Path | None, key: Path | None, ca: Path | None) -> grpc.ChannelCredentials | None:
    """None without TLS settings; --tls-ca verifies the server (else the system roots), cert+key identify us."""
    pair = _pair(cert, key, "collafuse-client")
    if pair is None and ca is None:
        return None
    roots = read_pem(ca, "--tls-ca") if ca is not None else None
    private_key, chain = pair if pair is not None else (None, None)
    return grpc.ssl_channel_credentials(root_certificates=roots, private_key=private_key, certificate_chain=chain)
