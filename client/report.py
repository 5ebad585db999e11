"""The client's measurements: ``<workdir>/metrics.json`` and ``<workdir>/loss.png``.

Each entry describes the latest run of its phase (the latest Register, Release, ...),
so running single sub-commands one after another builds up the same file a full
``run`` writes. Writes are atomic (temp file + rename): a crash leaves the previous file.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from collafuse.common.files import read_json, write_json_atomic
from collafuse.common.images import save_curves

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
LOSS_PLOT = "loss.png"


class RunReport:
    """Accumulates one workdir's metrics and writes them as JSON."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.path = self.workdir / METRICS_FILE
        self.data: dict[str, Any] = read_json(self.path)
        self.data.setdefault("wall_seconds", {})
        self.data.setdefault("rpc", {})
        # A split client trains its local model while it sends split steps: two threads report.
        self._lock = threading.RLock()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time a phase; the file is rewritten afterwards even when the phase fails."""
        started = time.perf_counter()
        try:
            yield
        finally:
            with self._lock:
                self.data["wall_seconds"][name] = round(time.perf_counter() - started, 4)
                self.save()

    def update(self, **fields: Any) -> None:
        with self._lock:
            self.data.update(fields)

    def record_traffic(self, traffic: dict[str, dict[str, float]]) -> None:
        """Per-RPC calls, attempts and bytes of this process (replacing earlier runs of the same RPC)."""
        with self._lock:
            self.data["rpc"].update(traffic)
            self.data["bytes_sent"] = int(sum(t["bytes_sent"] for t in self.data["rpc"].values()))
            self.data["bytes_received"] = int(sum(t["bytes_received"] for t in self.data["rpc"].values()))

    def save(self) -> None:
        with self._lock:
            self.workdir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.path, self.data)

    def plot_losses(self, losses: Sequence[tuple[int, float]], title: str) -> Path | None:
        if not losses:
            return None
        return save_curves(self.workdir / LOSS_PLOT, {"client loss (t <= cut)": list(losses)}, title)
