"""Exit 0 when a CollaFuse server answers SERVING on the standard gRPC health service.

Used by the Docker healthcheck: ``python -m collafuse.deploy.healthcheck HOST:PORT``. Against a mutual-TLS
server, give a certificate the server's CA signed (any client id: the health service is open to every valid
certificate) with ``--tls-cert/--tls-key/--tls-ca``; each defaults to its ``COLLAFUSE_TLS_*`` variable.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from collafuse.common.tls import TlsError, channel_credentials

SERVICE = "collafuse.v1.CollaFuse"
log = logging.getLogger("collafuse.healthcheck")


def check(target: str, timeout: float = 3.0, credentials: grpc.ChannelCredentials | None = None) -> bool:
    """Whether ``target`` reports SERVING; over TLS with ``credentials`` (common/tls.py), else plaintext."""
    channel = grpc.secure_channel(target, credentials) if credentials is not None else grpc.insecure_channel(target)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=timeout)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m collafuse.deploy.healthcheck", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", nargs="?", default="localhost:50051", help="HOST:PORT of the server")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    for flag, env in (("--tls-cert", "COLLAFUSE_TLS_CERT"), ("--tls-key", "COLLAFUSE_TLS_KEY"),
                      ("--tls-ca", "COLLAFUSE_TLS_CA")):
        parser.add_argument(flag, type=Path, default=_env_path(env), help=f"PEM file (default: ${env})")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        credentials = channel_credentials(args.tls_cert, args.tls_key, args.tls_ca)
    except TlsError as exc:
        logging.basicConfig(format="%(name)s: %(message)s")
        log.error("%s", exc)
        return 2
    return 0 if check(args.target, args.timeout, credentials) else 1


if __name__ == "__main__":
    raise SystemExit(main())
