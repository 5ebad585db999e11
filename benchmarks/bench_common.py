"""What the server benchmarks share: machine info, result files, percentiles, a real server process."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("collafuse.benchmarks")
RESULTS = Path(__file__).resolve().parent / "results"
SERVER_FILE = "server.json"


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "load_average_1m": os.getloadavg()[0],  # other users of the machine skew every number
    }


def write_result(name: str, payload: dict[str, Any]) -> Path:
    """``results/<name>-<date>.json`` with the date and the machine added."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    today = dt.date.today().isoformat()
    path = RESULTS / f"{name}-{today}.json"
    record = {"benchmark": name, "date": dt.datetime.now().isoformat(timespec="seconds"), "machine": machine(),
              **payload}
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def percentiles(values: list[float]) -> dict[str, float | int]:
    """count, p50, p99 and max of latencies in seconds, reported in milliseconds."""
    if not values:
        return {"count": 0}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)

    return {"count": len(ordered), "p50_ms": at(0.50), "p99_ms": at(0.99), "max_ms": round(1000 * ordered[-1], 2)}


def save_figure(fig: Any, path: Path, title: str) -> None:
    """Title, lay out, write and close a matplotlib figure (the result picture beside a benchmark's JSON)."""
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class ServerProcess:
    """``collafuse-server`` as its own process on loopback; ``stop`` sends SIGTERM and waits for it."""

    def __init__(self, store: Path, *flags: str, log_file: Path | None = None, env: dict[str, str] | None = None) -> None:
        self.store = store
        binary = Path(sys.executable).with_name("collafuse-server")
        command = [str(binary), "--host", "127.0.0.1", "--port", "0", "--store", str(store), "--device", "cpu", *flags]
        self._log = open(log_file or store.with_suffix(".log"), "w")  # noqa: SIM115 -- closed in stop()
        store.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT,
                                        env={**os.environ, **(env or {})})
        self.address = self._wait_address()

    def _wait_address(self, timeout: float = 120.0) -> str:
        deadline = time.monotonic() + timeout
        info = self.store / SERVER_FILE
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self._log.flush()
                tail = Path(self._log.name).read_text().splitlines()[-5:]
                raise RuntimeError(f"collafuse-server exited with {self.process.returncode}: " + " | ".join(tail))
            if info.is_file():
                try:
                    return str(json.loads(info.read_text())["address"])
                except (ValueError, KeyError):
                    pass  # written atomically, but be safe against a reader racing the rename
            time.sleep(0.1)
        raise RuntimeError(f"collafuse-server did not start within {timeout:.0f}s; see {self._log.name}")

    def rss_mb(self) -> float:
        """Resident memory of the server process (MB)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
        return float("nan")

    def stop(self, timeout: float = 60.0) -> dict[str, Any]:
        """SIGTERM; the exit code and how long the server took to exit."""
        began = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        self._log.close()
        return {"exit_code": code, "exit_seconds": round(time.monotonic() - began, 2)}


def scrape_metric(port: int, name: str) -> float:
    """The sum of a server's ``/metrics`` samples called ``name`` (0 when none)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples if s.name == name)
