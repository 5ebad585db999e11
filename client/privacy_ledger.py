"""The privacy a client has spent, kept in its ledger file: one row per split step or release batch.

The rows live in the release ledger's own SQLite file (``<workdir>/ledger.sqlite``, table
``privacy_spend``) so that what left and what it cost are one durable record. Like a release, a step is
recorded *before* its bytes go (status ``sent``) and marked ``acked`` after the server's answer: an
unanswered send counts as spent.

Each row is one Gaussian mechanism on every image of the client's data set: a noise multiplier s (noise
std / L2 sensitivity; client/dp.py) and a sample rate q (the share of the images it touched). The spent
epsilon at delta is Opacus' RDP accountant over all rows (client/dp.py ``PrivacyAccountant`` composes the
same way); ``RdpTotal`` keeps the running RDP vector so that a step costs one vector addition instead of a
fresh analysis of the whole history (0.36 s per step with the accountant, which a split step cannot afford).
"""

from __future__ import annotations

import math
import sqlite3
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from collafuse.client.dp import RDP_ORDERS, release_epsilon
from collafuse.client.errors import ClientError
from collafuse.client.ledger import Ledger

SCHEMA = """
CREATE TABLE IF NOT EXISTS privacy_spend (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    server TEXT NOT NULL,
    protocol TEXT NOT NULL,
    images INTEGER NOT NULL,
    sample_rate REAL NOT NULL,
    noise_multiplier REAL NOT NULL,
    epsilon REAL NOT NULL,
    delta REAL NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('sent', 'acked'))
);
"""


class RdpTotal:
    """RDP of a composition of (sub)sampled Gaussian mechanisms over ``RDP_ORDERS``, kept as a running sum."""

    def __init__(self) -> None:
        self.orders = list(RDP_ORDERS)
        self.rdp = np.zeros(len(self.orders))
        self.unbounded = False  # a mechanism without noise was composed: epsilon is infinite
        self.steps = 0
        self._per_step: dict[tuple[float, float], np.ndarray] = {}

    def _one(self, noise_multiplier: float, sample_rate: float) -> np.ndarray:
        key = (noise_multiplier, sample_rate)
        if key not in self._per_step:
            from opacus.accountants.analysis.rdp import compute_rdp

            self._per_step[key] = np.asarray(
                compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=self.orders), dtype=float
            )
        return self._per_step[key]

    def with_steps(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> tuple[np.ndarray, bool]:
        """(rdp, unbounded) after ``steps`` more steps; ``self`` unchanged."""
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample rate q must lie in (0, 1], got {sample_rate}")
        if steps == 0 or math.isinf(noise_multiplier):
            return self.rdp, self.unbounded  # the step releases nothing about an image
        if noise_multiplier <= 0:
            return self.rdp, True
        return self.rdp + steps * self._one(noise_multiplier, sample_rate), self.unbounded

    def add(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        self.rdp, self.unbounded = self.with_steps(noise_multiplier, sample_rate, steps)
        self.steps += steps

    def epsilon(self, delta: float, rdp: np.ndarray | None = None, unbounded: bool | None = None) -> float:
        from opacus.accountants.analysis.rdp import get_privacy_spent

        rdp = self.rdp if rdp is None else rdp
        if self.unbounded if unbounded is None else unbounded:
            return math.inf
        if not rdp.any():
            return 0.0
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Optimal order is the (smallest|largest) alpha")
            eps, _ = get_privacy_spent(orders=self.orders, rdp=rdp, delta=delta)
        return float(eps)

    def epsilon_if(self, delta: float, noise_multiplier: float, sample_rate: float, steps: int = 1) -> float:
        rdp, unbounded = self.with_steps(noise_multiplier, sample_rate, steps)
        return self.epsilon(delta, rdp, unbounded)


@dataclass(frozen=True)
class SpendRecord:
    seq: int
    time: float
    server: str
    protocol: str
    images: int
    sample_rate: float
    noise_multiplier: float
    epsilon: float
    delta: float
    status: str


def finite_or_none(value: float) -> float | None:
    """JSON has no infinity: an unbounded epsilon is written as null (with ``epsilon_unbounded``)."""
    return value if math.isfinite(value) else None


class PrivacyLedger:
    """The ``privacy_spend`` table of a workdir's ledger file, with the running accountant over it."""

    def __init__(self, ledger_path: Path) -> None:
        self.path = Path(ledger_path)
        try:
            self._db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            self._db.executescript(SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise ClientError(f"the ledger {self.path} cannot be read ({exc}); restore it or use a fresh --workdir") from exc
        self.total = RdpTotal()
        for s, q, n in self._history():
            self.total.add(s, q, n)

    def close(self) -> None:
        self._db.close()

    def _history(self) -> list[tuple[float, float, int]]:
        """Consecutive rows with the same (multiplier, rate) merged: the accountant's history."""
        merged: list[tuple[float, float, int]] = []
        for s, q in self._db.execute("SELECT noise_multiplier, sample_rate FROM privacy_spend ORDER BY seq"):
            if merged and merged[-1][:2] == (s, q):
                merged[-1] = (s, q, merged[-1][2] + 1)
            else:
                merged.append((float(s), float(q), 1))
        return merged

    def record(
        self, *, server: str, protocol: str, images: int, sample_rate: float, noise_multiplier: float, delta: float
    ) -> tuple[int, float]:
        """Charge one mechanism (before its bytes go); returns (row, epsilon spent after it)."""
        self.total.add(noise_multiplier, sample_rate)
        epsilon = self.total.epsilon(delta)
        cursor = self._db.execute(
            "INSERT INTO privacy_spend(time, server, protocol, images, sample_rate, noise_multiplier, epsilon, delta, "
            "status) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'sent')",
            (time.time(), server, protocol, int(images), float(sample_rate), float(noise_multiplier), epsilon, delta),
        )
        return int(cursor.lastrowid or 0), epsilon

    def mark_acked(self, seqs: Sequence[int]) -> None:
        self._db.executemany("UPDATE privacy_spend SET status = 'acked' WHERE seq = ?", [(s,) for s in seqs])

    def records(self) -> list[SpendRecord]:
        rows = self._db.execute(
            "SELECT seq, time, server, protocol, images, sample_rate, noise_multiplier, epsilon, delta, status "
            "FROM privacy_spend ORDER BY seq"
        ).fetchall()
        return [SpendRecord(*row) for row in rows]

    def summary(self, delta: float) -> dict[str, Any]:
        """Steps charged, and the epsilon spent at ``delta`` over all of them."""
        one = self._db.execute
        by_protocol = dict(one("SELECT protocol, COUNT(*) FROM privacy_spend GROUP BY protocol").fetchall())
        epsilon = self.total.epsilon(delta)
        return {
            "accountant": "rdp",
            "delta": delta,
            "epsilon": finite_or_none(epsilon),
            "epsilon_unbounded": math.isinf(epsilon),
            "steps": self.total.steps,
            "steps_by_protocol": {str(k): int(v) for k, v in by_protocol.items()},
            "sent_unacknowledged": int(one("SELECT COUNT(*) FROM privacy_spend WHERE status = 'sent'").fetchone()[0]),
        }


def privacy_report(ledger: Ledger, delta: float, image_shape: Sequence[int]) -> dict[str, Any]:
    """What this client's data has cost, in one unit (epsilon at ``delta``), for metrics.json and status.

    ``split``: the accountant over every split step in the ledger. ``ambient``: per noise level released at,
    the epsilon of one release of an image there (a Gaussian mechanism on the image clipped to [-1, 1];
    client/dp.py ``release_epsilon``) and how many releases were made at it.
    """
    elements = math.prod(int(d) for d in image_shape)
    levels: dict[float, list[int]] = {}
    for record in ledger.releases():
        levels.setdefault(record.alpha_bar, []).append(record.cut)
    ambient = []
    for alpha_bar, cuts in sorted(levels.items()):
        cost = release_epsilon(alpha_bar, elements, delta)
        ambient.append({
            "cut": max(set(cuts), key=cuts.count), "alpha_bar": alpha_bar, "releases": len(cuts),
            "noise_multiplier": finite_or_none(cost["noise_multiplier"]),
            "epsilon_per_release": finite_or_none(cost.get("epsilon_exact", cost["epsilon_rdp"])),
            "epsilon_per_release_rdp": finite_or_none(cost["epsilon_rdp"]),
        })
    split = PrivacyLedger(ledger.path)
    try:
        return {"delta": delta, "split": split.summary(delta), "ambient": ambient}
    finally:
        split.close()
