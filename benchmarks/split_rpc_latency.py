"""Loopback latency of one split step's two halves: two unary calls vs one bidirectional stream.

A split step (docs/design.md §3) is a request/reply pair twice: x_t up, eps_hat down, dL/d(eps_hat) up, an ack
down. This measures only the transport (no model): the payloads are byte strings of the sizes a batch
of ``--batch`` float32 images of ``--side``x``--side`` pixels has, echoed by generic handlers.

    python benchmarks/split_rpc_latency.py --steps 300 --batch 64 --side 8
"""

from __future__ import annotations

import argparse
import json
import queue
import statistics
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

SERVICE = "bench.Split"


def _identity(data: bytes) -> bytes:
    return data


def _handlers() -> grpc.GenericRpcHandler:
    def half(request: bytes, context: grpc.ServicerContext) -> bytes:
        return request  # eps_hat has the shape of x_t; the ack is small, so echo is an upper bound

    def stream(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        yield from requests

    return grpc.method_handlers_generic_handler(SERVICE, {
        "Half": grpc.unary_unary_rpc_method_handler(half, _identity, _identity),
        "Step": grpc.stream_stream_rpc_method_handler(stream, _identity, _identity),
    })


def measure(steps: int, payload: int) -> dict[str, Any]:
    server = grpc.server(ThreadPoolExecutor(max_workers=4),
                         options=[("grpc.max_receive_message_length", 64 << 20)])
    server.add_generic_rpc_handlers((_handlers(),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", 64 << 20)])
    grpc.channel_ready_future(channel).result(timeout=10)
    half = channel.unary_unary(f"/{SERVICE}/Half", request_serializer=_identity, response_deserializer=_identity)
    step = channel.stream_stream(f"/{SERVICE}/Step", request_serializer=_identity, response_deserializer=_identity)
    up = b"x" * payload
    try:
        unary: list[float] = []
        for i in range(steps + 20):
            tic = time.perf_counter()
            half(up, timeout=10)  # forward: x_t -> eps_hat
            half(up, timeout=10)  # backward: grad -> ack
            if i >= 20:
                unary.append(time.perf_counter() - tic)
        outbox: queue.Queue[bytes | None] = queue.Queue()

        def requests() -> Iterator[bytes]:
            while (item := outbox.get()) is not None:
                yield item

        replies = step(requests(), timeout=600)
        bidi: list[float] = []
        for i in range(steps + 20):
            tic = time.perf_counter()
            outbox.put(up)
            next(replies)
            outbox.put(up)
            next(replies)
            if i >= 20:
                bidi.append(time.perf_counter() - tic)
        outbox.put(None)
        for _ in replies:
            pass
    finally:
        channel.close()
        server.stop(0)

    def summary(values: list[float]) -> dict[str, float]:
        ordered = sorted(values)
        return {"median_ms": 1e3 * statistics.median(ordered), "p90_ms": 1e3 * ordered[int(0.9 * len(ordered))],
                "mean_ms": 1e3 * statistics.fmean(ordered)}

    return {"payload_bytes": payload, "steps": steps, "unary_pair": summary(unary), "bidi_stream": summary(bidi)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--side", type=int, nargs="+", default=[8, 16])
    args = parser.parse_args()
    results = [measure(args.steps, 4 * b * s * s) | {"batch": b, "side": s} for b in args.batch for s in args.side]
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
