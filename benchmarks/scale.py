"""Scale on one machine: ``collafuse-sim`` with 8, 16, 32 and 64 clients at tiny
budgets. Per run: wall time, the server's peak RSS, the clients' peak RSS (median and max), the server's
seconds per training step (its own clock: steps only, no waiting) and whether the run finished in time.

Every process's memory is sampled from /proc twice a second; a process is named by the log file it holds
open (``logs/server.log``, ``logs/client-<k>.log``), which works for both of the sim's launchers. RSS
counts pages shared with the fork server (torch's code) in every process; PSS splits them fairly, so the
sum of PSS is what the machine really holds.

    python benchmarks/scale.py                        # 8 16 32 64 clients
    python benchmarks/scale.py --clients 8 16 --time-limit 300
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench_common import write_result

log = logging.getLogger("collafuse.benchmarks.scale")
LOG_NAME = re.compile(r"/logs/((?:server|client-\d+))\.log$")


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        for child in children.get(pid, []):
            found.append(child)
            todo.append(child)
    return found


def role(pid: int) -> str | None:
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            match = LOG_NAME.search(os.readlink(f"/proc/{pid}/fd/{fd}"))
            if match:
                return match.group(1)
    except OSError:
        return None
    return None


def memory_mib(pid: int) -> tuple[float, float]:
    """(RSS, PSS) in MiB."""
    rss = pss = 0.0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                rss = int(line.split()[1]) / 1024
            elif line.startswith("Pss:"):
                pss = int(line.split()[1]) / 1024
    except OSError:
        pass
    return rss, pss


class Sampler(threading.Thread):
    """Peak RSS and PSS per named process under ``root`` while the run lasts."""

    def __init__(self, root: int) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.peak: dict[str, tuple[float, float]] = {}
        self.peak_total_pss = 0.0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.5):
            total = 0.0
            for pid in descendants(self.root):
                name = role(pid)
                if name is None:
                    continue
                rss, pss = memory_mib(pid)
                total += pss
                old = self.peak.get(name, (0.0, 0.0))
                self.peak[name] = (max(old[0], rss), max(old[1], pss))
            self.peak_total_pss = max(self.peak_total_pss, total)


def run(clients: int, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    command = [
        str(Path(sys.executable).with_name("collafuse-sim")), "--clients", str(clients), "--out", str(out),
        "--steps", str(args.steps), "--client-steps", str(args.client_steps), "--batch-size", str(args.batch),
        "--samples-per-class", "0", "--partition", "iid", "--server-preset", "tiny", "--client-preset", "tiny", "--threads", "1",
        "--timeout", str(args.time_limit), "--log-level", "WARNING", "--fresh",
    ]
    started = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    sampler = Sampler(process.pid)
    sampler.start()
    try:
        _, stderr = process.communicate(timeout=args.time_limit + 120)
    except subprocess.TimeoutExpired:
        process.kill()
        _, stderr = process.communicate()
    wall = time.monotonic() - started
    sampler.done.set()
    sampler.join()
    metrics_file = out / "metrics.json"
    server = json.loads(metrics_file.read_text())["server"] if metrics_file.is_file() else {}
    client_rss = [v[0] for k, v in sampler.peak.items() if k.startswith("client-")]
    client_pss = [v[1] for k, v in sampler.peak.items() if k.startswith("client-")]
    steps_per_s = server.get("steps_per_s")
    result = {
        "clients": clients, "exit_code": process.returncode, "wall_seconds": round(wall, 1),
        "server_steps": server.get("step"), "server_seconds_per_step": 1 / steps_per_s if steps_per_s else None,
        "server_peak_rss_mib": sampler.peak.get("server", (None, None))[0],
        "server_peak_pss_mib": sampler.peak.get("server", (None, None))[1],
        "client_peak_rss_mib_median": statistics.median(client_rss) if client_rss else None,
        "client_peak_rss_mib_max": max(client_rss) if client_rss else None,
        "client_peak_pss_mib_median": statistics.median(client_pss) if client_pss else None,
        "peak_total_pss_mib": round(sampler.peak_total_pss, 1),
        "clients_seen": len(client_rss),
    }
    if process.returncode:
        result["stderr_tail"] = stderr.strip().splitlines()[-3:]
    log.info("%s", result)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--steps", type=int, default=20, help="server training steps")
    parser.add_argument("--client-steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--time-limit", type=float, default=600.0, help="seconds each run may take")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.clients:
            runs.append(run(n, args, Path(tmp) / f"sim{n}"))
    log.info("wrote %s", write_result("scale", {"args": vars(args), "runs": runs}))


if __name__ == "__main__":
    main()
