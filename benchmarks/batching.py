"""Cross-client batching (issue 11, benchmark 3): images/s of N concurrent sampling clients with the
server merging their requests into one model call, against the same server running each alone.

Two real server processes (``collafuse-server``, same model, same settings but for
``--no-sample-cross-client``) take turns, A/B/A/B, so both see the same machine load; each round
N client threads each send ``--requests`` Sample calls of ``--images`` images back to back.

    python benchmarks/batching.py                  # 8 clients x 2 requests x 16 images, 50 steps, 2 rounds
    python benchmarks/batching.py --rounds 1 --steps 20
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench_common import ServerProcess, log, write_result

from collafuse.common.rpc import open_channel
from collafuse.v1 import collafuse_pb2, collafuse_pb2_grpc

CUT = 100
ARMS = {"batched": ("--sample-cross-client",), "alone": ("--no-sample-cross-client",)}


def server_flags(args: argparse.Namespace) -> list[str]:
    return ["--model-preset", args.preset, "--image-size", str(args.image_size), "--threads", str(args.threads),
            "--max-steps", "0", "--min-clients", "1000", "--start-timeout", "100000", "--log-level", "WARNING",
            "--sample-max-wait-ms", str(args.max_wait_ms), "--sample-max-batch", str(args.max_batch)]


def register(api: collafuse_pb2_grpc.CollaFuseStub, clients: int) -> None:
    for c in range(clients):
        api.Register(collafuse_pb2.RegisterRequest(
            client_id=f"client-{c}", cut=CUT, protocol=collafuse_pb2.PROTOCOL_AMBIENT,
            class_names=[str(i) for i in range(10)]), timeout=30)


def one_round(address: str, args: argparse.Namespace) -> dict[str, Any]:
    """N clients sampling at once; images/s over the round's wall time."""
    api = collafuse_pb2_grpc.CollaFuseStub(open_channel(address))
    errors: list[str] = []

    def client(c: int) -> None:
        for r in range(args.requests):
            request = collafuse_pb2.SampleRequest(
                client_id=f"client-{c}", labels=[(c + i) % 10 for i in range(args.images)], seed=1000 * c + r,
                num_inference_steps=args.steps, scheduler="ddpm", guidance_scale=1.0, cut=CUT)
            try:
                for _ in api.Sample(request, timeout=1800):
                    pass
            except Exception as exc:  # noqa: BLE001 -- reported, the round goes on
                errors.append(repr(exc))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - began
    images = args.clients * args.requests * args.images
    return {"seconds": round(seconds, 2), "images": images, "images_per_s": round(images / seconds, 2),
            "errors": errors}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=2, help="Sample calls per client per round")
    parser.add_argument("--images", type=int, default=16, help="images per Sample call")
    parser.add_argument("--steps", type=int, default=50, help="inference steps (T = 1000; the cut is 100)")
    parser.add_argument("--rounds", type=int, default=2, help="A/B rounds")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0, help="server torch threads (0: torch's default)")
    parser.add_argument("--max-batch", type=int, default=256)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    with tempfile.TemporaryDirectory(prefix="collafuse-batching-") as tmp:
        servers = {arm: ServerProcess(Path(tmp) / arm, *server_flags(args), *flags) for arm, flags in ARMS.items()}
        try:
            for server in servers.values():
                register(collafuse_pb2_grpc.CollaFuseStub(open_channel(server.address)), args.clients)
            rounds: dict[str, list[dict[str, Any]]] = {arm: [] for arm in ARMS}
            for r in range(args.rounds):
                for arm, server in servers.items():
                    result = one_round(server.address, args)
                    log.info("round %d %s: %.2f images/s (%.1fs)", r, arm, result["images_per_s"], result["seconds"])
                    rounds[arm].append(result)
        finally:
            exits = {arm: server.stop() for arm, server in servers.items()}
    rates = {arm: [r["images_per_s"] for r in results] for arm, results in rounds.items()}
    ratios = [b / a for b, a in zip(rates["batched"], rates["alone"], strict=True)]
    summary = {
        "images_per_s": {arm: statistics.median(values) for arm, values in rates.items()},
        "ratio_batched_over_alone": round(statistics.median(ratios), 3),
        "ratio_per_round": [round(x, 3) for x in ratios],
        "failed_calls": sum(len(r["errors"]) for results in rounds.values() for r in results),
    }
    path = write_result("batching", {"settings": vars(args), "rounds": rounds, "summary": summary,
                                     "server_exit": exits})
    log.info("batched / alone: %.2fx (%s); written to %s", summary["ratio_batched_over_alone"],
             summary["images_per_s"], path)
    return summary


if __name__ == "__main__":
    main()
