"""Many clients in one simulation: ``collafuse-sim --engine ray --clients 1000`` on the bundled digits with tiny
budgets, against the real server process, on this machine (issue 20).

Reports the run's wall time (and each phase's), the peak memory of the whole process tree (the simulation,
the server, Ray's own processes and its worker actors; RSS summed, and PSS, which counts pages shared between
processes once), the server's peak RSS, clients and calls failed (the goal is 0), the server's Register and
Release latency as the clients measured it, and the time to read every client through Status pages (from the
run's store, served again after the run). A smaller side-by-side run compares ``--engine process`` with
``--engine ray`` at the same number of clients.

    .venv/bin/python benchmarks/sim_clients.py                     # 1,000 clients, and 16 on each engine
    .venv/bin/python benchmarks/sim_clients.py --clients 200 --compare 0
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import grpc
from bench_common import percentiles, write_result

from collafuse.common.config import DIGIT_CLASSES
from collafuse.common.rpc import open_channel
from collafuse.common.settings import to_cli_args
from collafuse.deploy.launcher import ChildProcess
from collafuse.deploy.sim import SimSettings, free_port, server_command, with_image_spec
from collafuse.v1 import collafuse_pb2, collafuse_pb2_grpc

log = logging.getLogger("collafuse.benchmarks.sim_clients")
SAMPLE_SECONDS = 0.5
STATUS_PAGE_SIZE = 1000


def _parents() -> dict[int, int]:
    """pid -> ppid of every process, from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # ended meanwhile
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    return parents


def _tree(root: int) -> dict[int, int]:
    """pid -> ppid of ``root`` and every process below it."""
    parents = _parents()
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = {}, [root]
    while todo:
        pid = todo.pop()
        found[pid] = parents.get(pid, 0)
        todo.extend(children.get(pid, []))
    return found


def _memory_mb(pid: int) -> tuple[float, float]:
    """(RSS, PSS) of one process in MB; zeros once it has ended."""
    try:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:])
    except (OSError, ValueError):
        return 0.0, 0.0
    return int(fields["Rss"].split()[0]) / 1024, int(fields["Pss"].split()[0]) / 1024


def _kind(pid: int, ppid: int, server_pid: int | None, root: int) -> str:
    if pid == server_pid:
        return "server"
    if pid == root:
        return "simulation"
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "other"
    # Before the Ray rules: a fork server's command line carries sys.path, which holds Ray's own folder.
    if "multiprocessing.forkserver" in command:
        # The launcher's fork server (a child of the simulation) and what it forked besides the server: clients.
        return "launcher" if ppid == root else "client_processes"
    if "multiprocessing.resource_tracker" in command:
        return "launcher"
    if "ClientWorker" in command:
        return "ray_workers"  # the worker actors (while one starts it shows as ray::IDLE)
    if command.startswith("ray::") or "/site-packages/ray/" in command:
        return "ray_system"  # GCS, raylet, agents, monitors, idle workers
    return "client_processes" if "collafuse.client" in command else "other"


class MemorySampler(threading.Thread):
    """Peak memory of a process tree, sampled every SAMPLE_SECONDS from /proc (no psutil needed)."""

    def __init__(self, root: int, server_file: Path) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.server_file = server_file
        self.server_pid: int | None = None
        self.peak_rss = self.peak_pss = self.server_peak_rss = 0.0
        self.peak_processes = 0
        self.at_peak: dict[str, float] = {}
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(SAMPLE_SECONDS):
            if self.server_pid is None and self.server_file.is_file():
                try:
                    self.server_pid = int(json.loads(self.server_file.read_text())["pid"])
                except (ValueError, KeyError):
                    pass  # being written
            rss = pss = 0.0
            by_kind: dict[str, float] = {}
            pids = _tree(self.root)
            for pid, ppid in pids.items():
                r, p = _memory_mb(pid)
                rss, pss = rss + r, pss + p
                kind = _kind(pid, ppid, self.server_pid, self.root)
                by_kind[kind] = by_kind.get(kind, 0.0) + r
                if pid == self.server_pid:
                    self.server_peak_rss = max(self.server_peak_rss, r)
            self.peak_pss = max(self.peak_pss, pss)
            if rss > self.peak_rss:
                self.peak_rss, self.peak_processes = rss, len(pids)
                self.at_peak = {k: round(v, 1) for k, v in sorted(by_kind.items())}

    def stop(self) -> dict[str, Any]:
        self._done.set()
        self.join()
        return {"peak_tree_rss_mb": round(self.peak_rss, 1), "peak_tree_pss_mb": round(self.peak_pss, 1),
                "processes_at_peak": self.peak_processes, "rss_mb_at_peak_by_kind": self.at_peak,
                "server_peak_rss_mb": round(self.server_peak_rss, 1)}


def sim_settings(out: Path, clients: int, engine: str, args: argparse.Namespace) -> SimSettings:
    return SimSettings(
        engine=engine, clients=clients, ray_workers=args.workers, out=out, dataset="digits", partition="iid",
        steps=args.steps, client_steps=args.client_steps, batch_size=8, samples_per_class=1,
        inference_steps=args.inference_steps, server_preset="tiny", client_preset="tiny", cut=200, seed=0,
        timeout=args.timeout,
    )


def _rpc_latencies(metrics: dict[str, Any], name: str) -> dict[str, float | int]:
    """Per client, the mean seconds of its ``name`` calls (retries included), as percentiles over clients."""
    per_client = [c["rpc"][name]["seconds"] / c["rpc"][name]["calls"] for c in metrics["clients"].values()
                  if c.get("rpc", {}).get(name, {}).get("calls")]
    return percentiles(per_client)


def status_pages(settings: SimSettings, logs: Path) -> dict[str, Any]:
    """The run's store served again (the run stopped its server): every client through Status pages."""
    port = free_port()
    server = ChildProcess("server", server_command(with_image_spec(settings), port, list(DIGIT_CLASSES)),
                          logs / "status-server.log", {**os.environ, "HF_HUB_OFFLINE": "1"}, "subprocess")
    try:
        with open_channel(f"127.0.0.1:{port}") as channel:
            api = collafuse_pb2_grpc.CollaFuseStub(channel)
            deadline = time.monotonic() + 120
            while True:  # until it serves
                try:
                    api.Status(collafuse_pb2.StatusRequest(page_size=1), timeout=5)
                    break
                except grpc.RpcError:
                    if time.monotonic() > deadline or server.poll() is not None:
                        raise RuntimeError(f"the server did not serve the run's store again:\n{server.tail()}") from None
                    time.sleep(0.5)
            timings = []
            for _ in range(3):
                started, seen, token, pages, with_releases = time.perf_counter(), 0, "", 0, 0
                while True:
                    reply = api.Status(collafuse_pb2.StatusRequest(page_size=STATUS_PAGE_SIZE, page_token=token),
                                       timeout=60)
                    seen, token, pages = seen + len(reply.clients), reply.next_page_token, pages + 1
                    with_releases += sum(1 for c in reply.clients if c.releases > 0)
                    if not token:
                        break
                timings.append(time.perf_counter() - started)
    finally:
        server.stop()
    return {"page_size": STATUS_PAGE_SIZE, "pages": pages, "clients_seen": seen, "clients_with_releases": with_releases,
            "clients_total": reply.clients_total, "all_pages_seconds_median_of_3": round(statistics.median(timings), 4)}


def measure(out: Path, clients: int, engine: str, args: argparse.Namespace) -> dict[str, Any]:
    settings = sim_settings(out, clients, engine, args)
    command = [str(Path(sys.executable).with_name("collafuse-sim")), *to_cli_args(settings)]
    log.info("%s", " ".join(command))
    out.mkdir(parents=True, exist_ok=True)
    with (out / "sim.log").open("w") as output:
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
        sampler = MemorySampler(process.pid, out / "server" / "server.json")
        sampler.start()
        code = process.wait()
        wall = time.perf_counter() - started
        memory = sampler.stop()
    if code != 0:
        tail = (out / "sim.log").read_text(errors="replace").splitlines()[-20:]
        raise RuntimeError(f"collafuse-sim --engine {engine} --clients {clients} exited with {code}:\n" + "\n".join(tail))
    metrics = json.loads((out / "metrics.json").read_text())
    calls = sum(int(t["calls"]) for c in metrics["clients"].values() for t in c["rpc"].values())
    attempts = sum(int(t["attempts"]) for c in metrics["clients"].values() for t in c["rpc"].values())
    finished = sum(1 for k in range(clients) if (out / "clients" / f"client-{k}" / "samples" / "samples.npy").is_file())
    result = {
        "engine": engine, "clients": clients, "workers": metrics["engine"].get("workers"),
        "wall_seconds": round(wall, 1), "run_wall_seconds": round(metrics["pooled"]["wall_seconds"], 1),
        "phase_seconds": metrics["engine"].get("phase_seconds"),
        # A client whose call failed (after its retries) stops there and has no samples: each counts once.
        "failed_calls": int(metrics["engine"].get("failed_clients", 0)) + clients - finished,
        "clients_with_samples": finished, "rpc_calls": calls, "rpc_retried_attempts": attempts - calls,
        "server_releases": metrics["server"].get("releases"),
        "server_clients_with_releases": metrics["server"].get("clients_with_releases"),
        "server_steps": metrics["server"].get("step"),
        "register_latency": _rpc_latencies(metrics, "Register"),
        "release_latency": _rpc_latencies(metrics, "Release"),
        "sample_latency": _rpc_latencies(metrics, "Sample"),
        **memory,
    }
    result["status"] = status_pages(settings, out / "logs")
    log.info("%s", json.dumps(result))
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--compare", type=int, default=16, help="clients of the process-vs-ray comparison (0: skip)")
    parser.add_argument("--workers", type=int, default=0, help="Ray worker actors (0: one per core)")
    parser.add_argument("--steps", type=int, default=20, help="server training steps")
    parser.add_argument("--client-steps", type=int, default=1)
    parser.add_argument("--inference-steps", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=7200.0)
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    with tempfile.TemporaryDirectory() as tmp:
        root = args.out or Path(tmp)
        run = measure(root / f"ray-{args.clients}", args.clients, "ray", args)
        comparison: dict[str, Any] = {}
        if args.compare:
            pair = {engine: measure(root / f"{engine}-{args.compare}", args.compare, engine, args)
                    for engine in ("process", "ray")}
            comparison = {
                "clients": args.compare, **pair,
                "ray_over_process": {key: round(pair["ray"][key] / pair["process"][key], 2)
                                     for key in ("wall_seconds", "peak_tree_rss_mb", "peak_tree_pss_mb")},
            }
    import ray  # the version the numbers are of (the engine itself imports it in the simulation's process)

    budgets = {"steps": args.steps, "client_steps": args.client_steps, "inference_steps": args.inference_steps,
               "samples_per_class": 1, "presets": "tiny", "partition": "iid", "dataset": "digits 8x8 (1,797 images)"}
    path = write_result("sim_clients", {**run, "ray_version": ray.__version__, "budgets": budgets,
                                        "comparison": comparison})
    log.info("wrote %s", path)
    failed = run["failed_calls"] + sum(comparison.get(e, {}).get("failed_calls", 0) for e in ("process", "ray"))
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
