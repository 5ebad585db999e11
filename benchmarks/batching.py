"""Cross-client batching: images/s of N concurrent clients with the server merging
their requests into one model call, against the same server running each alone.

Two real server processes (``collafuse-server``, same model, same settings but for
``--no-sample-cross-client`` / ``--no-split-cross-client``) take turns, A/B/A/B, so both see the same machine
load. ``--protocol sample``: each round N client threads each send ``--requests`` Sample calls of ``--images``
images back to back. ``--protocol split``: each client sends ``--requests`` split steps of ``--images`` images
(SplitForward, the client's loss gradient, SplitBackward); only the forwards can merge, each backward is one
client's optimizer step.

    python benchmarks/batching.py                  # 8 clients x 2 requests x 16 images, 50 steps, 2 rounds
    python benchmarks/batching.py --rounds 1 --steps 20
    python benchmarks/batching.py --protocol split --requests 20
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

import torch
from bench_common import ServerProcess, free_port, log, scrape_metric, write_result

from collafuse.client.protocols.split import forward_request, loss_gradient, noise_batch
from collafuse.common.codec import decode, encode
from collafuse.common.rpc import open_channel
from collafuse.common.schedule import ScheduleConfig
from collafuse.v1 import collafuse_pb2, collafuse_pb2_grpc

CUT = 100
PROTOCOLS = {"sample": collafuse_pb2.PROTOCOL_AMBIENT, "split": collafuse_pb2.PROTOCOL_SPLIT}


def arms(protocol: str) -> dict[str, tuple[str, ...]]:
    return {"batched": (f"--{protocol}-cross-client",), "alone": (f"--no-{protocol}-cross-client",)}


def server_flags(args: argparse.Namespace) -> list[str]:
    return ["--model-preset", args.preset, "--image-size", str(args.image_size), "--threads", str(args.threads),
            "--max-steps", "0", "--min-clients", "1000", "--start-timeout", "100000", "--log-level", "WARNING",
            f"--{args.protocol}-max-wait-ms", str(args.max_wait_ms), f"--{args.protocol}-max-batch", str(args.max_batch)]


def register(api: collafuse_pb2_grpc.CollaFuseStub, clients: int, protocol: str) -> collafuse_pb2.RegisterReply:
    for c in range(clients):
        reply = api.Register(collafuse_pb2.RegisterRequest(
            client_id=f"client-{c}", cut=CUT, protocol=PROTOCOLS[protocol],
            class_names=[str(i) for i in range(10)]), timeout=30)
    return reply


def split_steps(api: collafuse_pb2_grpc.CollaFuseStub, c: int, args: argparse.Namespace) -> None:
    """``--requests`` split steps of client ``c``: forward, the loss gradient here, backward."""
    schedule = ScheduleConfig()
    alphas = schedule.alphas_cumprod()
    g = torch.Generator().manual_seed(c)
    for _ in range(args.requests):
        x0 = torch.rand((args.images, 1, args.image_size, args.image_size), generator=g) * 2 - 1
        t = torch.randint(CUT + 1, schedule.num_train_timesteps + 1, (args.images,), generator=g)
        batch = noise_batch(x0, t, torch.randint(0, 10, (args.images,), generator=g), torch.randn(x0.shape, generator=g),
                            alphas, CUT)
        reply = api.SplitForward(forward_request(f"client-{c}", batch, CUT, float(alphas[CUT]), alphas), timeout=600)
        grad, loss = loss_gradient(decode(reply.eps_hat), batch.eps)
        api.SplitBackward(collafuse_pb2.SplitBackwardRequest(client_id=f"client-{c}", step_id=reply.step_id,
                                                             grad=encode(grad / args.images), loss=loss), timeout=600)


def one_round(address: str, args: argparse.Namespace) -> dict[str, Any]:
    """N clients sampling (or split-training) at once; images/s over the round's wall time."""
    api = collafuse_pb2_grpc.CollaFuseStub(open_channel(address))
    errors: list[str] = []

    def client(c: int) -> None:
        if args.protocol == "split":
            try:
                split_steps(api, c, args)
            except Exception as exc:  # noqa: BLE001 -- reported, the round goes on
                errors.append(repr(exc))
            return
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
    parser.add_argument("--protocol", choices=sorted(PROTOCOLS), default="sample",
                        help="what the clients send: Sample calls, or split steps (only forwards merge)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=2, help="Sample calls (or split steps) per client per round")
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
        ports = {arm: free_port() for arm in arms(args.protocol)}
        servers = {arm: ServerProcess(Path(tmp) / arm, *server_flags(args), *flags, "--metrics-port", str(ports[arm]))
                   for arm, flags in arms(args.protocol).items()}
        try:
            for server in servers.values():
                register(collafuse_pb2_grpc.CollaFuseStub(open_channel(server.address)), args.clients, args.protocol)
            rounds: dict[str, list[dict[str, Any]]] = {arm: [] for arm in servers}
            for r in range(args.rounds):
                for arm, server in servers.items():
                    result = one_round(server.address, args)
                    log.info("round %d %s: %.2f images/s (%.1fs)", r, arm, result["images_per_s"], result["seconds"])
                    rounds[arm].append(result)
            if args.protocol == "split":  # how many forwards rode in another client's model call
                merged = {arm: {name: scrape_metric(ports[arm], f"collafuse_split_{name}_total")
                                for name in ("forwards", "forwards_merged", "forward_model_calls")} for arm in servers}
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
    if args.protocol == "split":
        summary["split_forwards"] = merged
    path = write_result("batching" if args.protocol == "sample" else f"batching-{args.protocol}", {"settings": vars(args), "rounds": rounds, "summary": summary,
                                     "server_exit": exits})
    log.info("batched / alone: %.2fx (%s); written to %s", summary["ratio_batched_over_alone"],
             summary["images_per_s"], path)
    return summary


if __name__ == "__main__":
    main()
