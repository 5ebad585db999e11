"""Load: N concurrent clients on loopback for a fixed time, mixing Release, Heartbeat, Status
and Sample against a real ``collafuse-server`` process that trains meanwhile.

Every client is a thread with its own channel: its main loop sends a Heartbeat every ``--beat-ms``,
a Status every 4th beat and a Release of ``--release-images`` every 8th; a second thread per
client keeps one Sample call in flight, so sampling is saturated the whole run. Reported: calls
and failures per RPC (RESOURCE_EXHAUSTED with a retry hint is counted apart: the client waits
as told and retries), p50/p99/max latency per RPC, Heartbeat latency while the sampling queue
held more requests than workers (read from the server's Prometheus endpoint), and the server's
RSS every ``--rss-every`` s. Bounded: it stops itself after ``--duration`` s, cancelling the Sample
calls still in flight (counted as cut off, not failed), and SIGTERMs the server.

    python benchmarks/load.py                      # 16 clients, 120 s
    python benchmarks/load.py --clients 4 --duration 20
"""

from __future__ import annotations

import argparse
import logging
import re
import tempfile
import threading
import time
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import torch
from bench_common import ServerProcess, free_port, log, percentiles, write_result

from collafuse.common.codec import encode
from collafuse.common.rpc import RETRY_AFTER_KEY, open_channel
from collafuse.v1 import collafuse_pb2, collafuse_pb2_grpc

CUT = 100
SIDE = 16
DEADLINES = {"Heartbeat": 3.0, "Status": 10.0, "Register": 10.0, "Release": 30.0, "Sample": 600.0}
DEPTH = re.compile(r"^collafuse_sampling_queue_depth\s+([0-9.eE+-]+)", re.MULTILINE)


class Recorder:
    """Latencies, failures and refusals per RPC, from every client thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.failures: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.refused: dict[str, int] = defaultdict(int)
        self.cut_off = 0
        self.saturated_beats: list[float] = []
        self.depth = 0.0  # the sampling queue depth last read from /metrics

    def call(self, name: str, run: Callable[[], object], stopping: threading.Event | None = None) -> float | None:
        """Run one call; its latency, or the retry hint (s, negative) when refused, or None on failure."""
        began = time.monotonic()
        try:
            run()
        except grpc.RpcError as exc:
            code = exc.code()
            with self._lock:
                if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    self.refused[name] += 1
                    hint = dict(exc.trailing_metadata() or ()).get(RETRY_AFTER_KEY, "1000")
                    return -int(hint) / 1000
                if code == grpc.StatusCode.CANCELLED and stopping is not None and stopping.is_set():
                    self.cut_off += 1
                    return None
                self.failures[name][code.name if code else "?"] += 1
            return None
        took = time.monotonic() - began
        with self._lock:
            self.latency[name].append(took)
            if name == "Heartbeat" and self.depth > 1:
                self.saturated_beats.append(took)
        return took


def release_chunk(client_id: str, start: int, n: int) -> collafuse_pb2.ReleaseChunk:
    g = torch.Generator().manual_seed(hash((client_id, start)) & 0xFFFF_FFFF)
    items = [collafuse_pb2.ReleaseItem(image_key=f"{client_id}-{start + i}", label=(start + i) % 10,
                                       x_cut=encode(torch.randn((1, SIDE, SIDE), generator=g)))
             for i in range(n)]
    return collafuse_pb2.ReleaseChunk(client_id=client_id, cut=CUT, items=items)


def run_client(c: int, address: str, args: argparse.Namespace, rec: Recorder, deadline: float,
               stopping: threading.Event) -> None:
    client_id = f"client-{c:02d}"
    api = collafuse_pb2_grpc.CollaFuseStub(open_channel(address))
    register = collafuse_pb2.RegisterRequest(client_id=client_id, cut=CUT, protocol=collafuse_pb2.PROTOCOL_AMBIENT,
                                             class_names=[str(i) for i in range(10)])
    rec.call("Register", lambda: api.Register(register, timeout=DEADLINES["Register"]))
    calls: list[grpc.Future] = []

    def sampler() -> None:
        r = 0
        while not stopping.is_set():
            request = collafuse_pb2.SampleRequest(
                client_id=client_id, labels=[(c + i) % 10 for i in range(args.sample_images)], seed=c * 10_000 + r,
                num_inference_steps=args.sample_steps, scheduler="ddpm", guidance_scale=1.0, cut=CUT)
            call = api.Sample(request, timeout=DEADLINES["Sample"])
            calls.append(call)

            def drain(stream: Iterator[collafuse_pb2.SampleEvent] = call) -> None:
                for _ in stream:
                    pass

            outcome = rec.call("Sample", drain, stopping)
            if outcome is not None and outcome < 0:
                stopping.wait(-outcome)  # refused: come back when the server said
            r += 1

    sampling = threading.Thread(target=sampler, name=f"{client_id}-sample")
    sampling.start()
    beat, released = 0, 0
    while time.monotonic() < deadline:
        heartbeat = collafuse_pb2.HeartbeatRequest(client_id=client_id)
        rec.call("Heartbeat", partial(api.Heartbeat, heartbeat, timeout=DEADLINES["Heartbeat"]))
        if beat % 4 == 0:
            rec.call("Status", lambda: api.Status(collafuse_pb2.StatusRequest(), timeout=DEADLINES["Status"]))
        if beat % 8 == 0 and (args.release_cap is None or released < args.release_cap):
            chunk = release_chunk(client_id, released, args.release_images)
            rec.call("Release", partial(api.Release, iter([chunk]), timeout=DEADLINES["Release"]))
            released += args.release_images
        beat += 1
        time.sleep(args.beat_ms / 1000)
    stopping.set()
    for call in calls:
        call.cancel()
    sampling.join(60)


def watch_depth(metrics_url: str, rec: Recorder, stopping: threading.Event, samples: list[float]) -> None:
    while not stopping.is_set():
        try:
            text = urllib.request.urlopen(metrics_url, timeout=2).read().decode()
            found = DEPTH.search(text)
            if found:
                rec.depth = float(found.group(1))
                samples.append(rec.depth)
        except OSError:
            pass
        stopping.wait(0.25)


def watch_rss(server: ServerProcess, began: float, every: float, stopping: threading.Event,
              series: list[tuple[float, float]]) -> None:
    """(seconds since the load began, server RSS in MB) every ``every`` seconds: does the growth level off?"""
    while not stopping.wait(every):
        series.append((round(time.monotonic() - began, 1), server.rss_mb()))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of load")
    parser.add_argument("--beat-ms", type=float, default=200.0, help="pause between a client's heartbeats")
    parser.add_argument("--release-images", type=int, default=16)
    parser.add_argument("--sample-images", type=int, default=16)
    parser.add_argument("--sample-steps", type=int, default=50, help="inference steps (T = 1000, cut 100)")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--train-steps", type=int, default=0, help="server training steps (0: all run long)")
    parser.add_argument("--release-cap", type=int, default=None,
                        help="images each client releases in all (default: no cap); RSS should level off after it")
    parser.add_argument("--rss-every", type=float, default=10.0, help="seconds between server RSS readings")
    parser.add_argument("--malloc-arena-max", type=int, default=0,
                        help="MALLOC_ARENA_MAX for the server process (0: glibc's default, 8 per core)")
    parser.add_argument("--tag", default="", help="written to results/load-<tag>-<date>.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    rec = Recorder()
    depths: list[float] = []
    metrics_port = free_port()
    with tempfile.TemporaryDirectory(prefix="collafuse-load-") as tmp:
        server = ServerProcess(
            Path(tmp) / "store", "--model-preset", args.preset, "--image-size", str(SIDE), "--batch-size", "32",
            "--max-steps", str(args.train_steps), "--checkpoint-every", "100", "--metrics-port", str(metrics_port),
            "--log-level", "WARNING",
            env={"MALLOC_ARENA_MAX": str(args.malloc_arena_max)} if args.malloc_arena_max else None,
        )
        try:
            rss_start = server.rss_mb()
            stopping = threading.Event()
            watcher = threading.Thread(target=watch_depth, args=(f"http://127.0.0.1:{metrics_port}/metrics", rec,
                                                                  stopping, depths))
            watcher.start()
            began = time.monotonic()
            rss_series: list[tuple[float, float]] = []
            rss_reader = threading.Thread(target=watch_rss, args=(server, began, args.rss_every, stopping, rss_series))
            rss_reader.start()
            deadline = began + args.duration
            client_stops = [threading.Event() for _ in range(args.clients)]
            threads = [threading.Thread(target=run_client, args=(c, server.address, args, rec, deadline, stop))
                       for c, stop in enumerate(client_stops)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(args.duration + 120)
            wall = time.monotonic() - began
            stopping.set()
            watcher.join(5)
            rss_reader.join(5)
            status = collafuse_pb2_grpc.CollaFuseStub(open_channel(server.address)).Status(
                collafuse_pb2.StatusRequest(), timeout=10)
            rss_end = server.rss_mb()
        finally:
            exit_info = server.stop()
    failed = sum(sum(codes.values()) for codes in rec.failures.values())
    result = {
        "settings": vars(args),
        "wall_seconds": round(wall, 1),
        "failed_calls": failed,
        "failures": {name: dict(codes) for name, codes in rec.failures.items()},
        "refused_with_retry_hint": dict(rec.refused),
        "sample_calls_cut_off_at_end": rec.cut_off,
        "latency": {name: percentiles(values) for name, values in sorted(rec.latency.items())},
        "heartbeat_while_sampling_saturated": percentiles(rec.saturated_beats),
        "sampling_queue_depth": {"mean": round(sum(depths) / max(1, len(depths)), 2), "max": max(depths, default=0),
                                 "reads": len(depths)},
        "server_rss_mb": {"start": rss_start, "end": rss_end, "series": rss_series},
        "server_releases_stored": sum(c.releases for c in status.clients),
        "server_training_step": status.trainer.step,
        "server_exit": exit_info,
    }
    path = write_result(f"load-{args.tag}" if args.tag else "load", result)
    log.info("failed calls %d; heartbeat p99 saturated %s; RSS %s -> %s MB; written to %s", failed,
             result["heartbeat_while_sampling_saturated"], rss_start, rss_end, path)
    return result


if __name__ == "__main__":
    main()
