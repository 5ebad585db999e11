"""The server's own limits with many clients and no training: N registrations against one real
``collafuse-server`` process over gRPC, from a pool of threads, then every Status page.

Reports registrations per second, calls failed (the goal is 0), the server's RSS before and after, and the
time to read every client through Status pages.

    .venv/bin/python benchmarks/registrations.py                  # 10,000 clients, 16 threads
    .venv/bin/python benchmarks/registrations.py --clients 1000
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from bench_common import ServerProcess, write_result
from tqdm import tqdm

from collafuse.common.rpc import open_channel
from collafuse.v1 import collafuse_pb2, collafuse_pb2_grpc

log = logging.getLogger("collafuse.benchmarks.registrations")
CLASSES = [str(k) for k in range(10)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=10_000)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--page-size", type=int, default=1000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    with tempfile.TemporaryDirectory() as tmp:
        server = ServerProcess(Path(tmp) / "store", "--image-size", "8", "--channels", "1", "--classes", *CLASSES,
                               "--model-preset", "tiny", "--max-steps", "1", "--max-clients", str(args.clients + 10))
        try:
            api = collafuse_pb2_grpc.CollaFuseStub(open_channel(server.address))
            rss_before = server.rss_mb()
            failed: list[str] = []

            def register(k: int) -> None:
                request = collafuse_pb2.RegisterRequest(client_id=f"client-{k:05d}", cut=200, class_names=CLASSES,
                                                        protocol=collafuse_pb2.PROTOCOL_AMBIENT)
                try:
                    api.Register(request, timeout=60)
                except grpc.RpcError as exc:
                    failed.append(f"{exc.code().name}: {exc.details()}")

            started = time.perf_counter()
            with ThreadPoolExecutor(args.threads) as pool, tqdm(total=args.clients, desc="Register") as bar:
                for _ in pool.map(register, range(args.clients)):
                    bar.update(1)
            register_s = time.perf_counter() - started
            rss_after = server.rss_mb()
            started, seen, token, pages = time.perf_counter(), 0, "", 0
            while True:
                reply = api.Status(collafuse_pb2.StatusRequest(page_size=args.page_size, page_token=token), timeout=60)
                seen, token, pages = seen + len(reply.clients), reply.next_page_token, pages + 1
                if not token:
                    break
            status_s = time.perf_counter() - started
        finally:
            stopped = server.stop()
    result = {
        "clients": args.clients, "threads": args.threads, "registrations_per_s": round(args.clients / register_s, 1),
        "register_seconds": round(register_s, 2), "failed_calls": len(failed), "failures": sorted(set(failed))[:5],
        "server_rss_mb_before": rss_before, "server_rss_mb_after": rss_after,
        "status_pages": pages, "status_clients_seen": seen, "status_all_pages_seconds": round(status_s, 3),
        "server_exit": stopped,
    }
    log.info("%s", result)
    print(write_result("registrations", result))
    return 0 if not failed and seen == args.clients else 1


if __name__ == "__main__":
    raise SystemExit(main())
