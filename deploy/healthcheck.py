"""Exit 0 when a CollaFuse server answers SERVING on the standard gRPC health service.

Used by the Docker healthcheck: ``python -m collafuse.deploy.healthcheck HOST:PORT``.
"""

from __future__ import annotations

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVICE = "collafuse.v1.CollaFuse"


def check(target: str, timeout: float = 3.0) -> bool:
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=timeout)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def main() -> int:
    target = sys.argv[1] if len(sys.argv) > 1 else "localhost:50051"
    return 0 if check(target) else 1


if __name__ == "__main__":
    raise SystemExit(main())
