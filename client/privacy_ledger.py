"""The privacy a client has spent, kept in its ledger file: per image, every split send, and per step.

The tables live in the release ledger's own SQLite file (``<workdir>/ledger.sqlite``) so that what left and
what it cost are one durable record:

- ``split_sends``: one row per image per split send (image key, t, mu^2 of the send; client/dp.py);
- ``split_exposure``: per image, the sum of its sends' mu^2 and how many sends (what its cap is held against);
- ``privacy_spend``: one row per split step (the step's images, the share of the sendable images it drew,
  its least noisy send as a noise multiplier 1/mu, and epsilon after it).

Like a release, a step is recorded *before* its bytes go (status ``sent``) and marked ``acked`` after the
server's answer: an unanswered send counts as spent.

The unit is one image under replace-one (client/dp.py): Gaussian mechanisms compose by adding mu^2, so the
client's epsilon at delta is that of its most exposed image, epsilon(max_i sum_k mu_ik^2). Ambient releases are
priced the same way (one Gaussian mechanism per release, ``release_epsilon``).
"""

from __future__ import annotations

import math
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from collafuse.client.dp import epsilon_of_mu2, release_epsilon, release_mu2
from collafuse.client.errors import FRESH_WORKDIR_RISK, ClientError
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
CREATE TABLE IF NOT EXISTS split_exposure (
    image_key TEXT PRIMARY KEY,
    mu2 REAL NOT NULL,
    sends INTEGER NOT NULL,
    phash TEXT
);
CREATE TABLE IF NOT EXISTS split_sends (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    step INTEGER NOT NULL,
    image_key TEXT NOT NULL,
    t INTEGER NOT NULL,
    mu2 REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS split_sends_by_image ON split_sends(image_key);
"""


@dataclass(frozen=True)
class Exposure:
    """What split has sent of one image: mu^2 summed over its sends, and their number."""

    mu2: float = 0.0
    sends: int = 0


@dataclass(frozen=True)
class Send:
    """One image in one split step: its key, the t it was sent at, and the send's mu^2."""

    image_key: str
    t: int
    mu2: float
    phash: int | None = None


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
    """The split tables of a workdir's ledger file: per-image exposure, every send, and the steps."""

    def __init__(self, ledger_path: Path) -> None:
        self.path = Path(ledger_path)
        try:
            self._db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            self._db.executescript(SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise ClientError(f"the ledger {self.path} cannot be read ({exc}); restore it from a backup. "
                              f"{FRESH_WORKDIR_RISK}") from exc

    def close(self) -> None:
        self._db.close()

    # -- per image ------------------------------------------------------------------------------------

    def exposures(self) -> dict[str, Exposure]:
        rows = self._db.execute("SELECT image_key, mu2, sends FROM split_exposure").fetchall()
        return {str(k): Exposure(float(m), int(s)) for k, m, s in rows}

    def sent_hashes(self) -> dict[str, int]:
        """Perceptual hash of every image split has sent (for near-duplicate checks, like released ones)."""
        rows = self._db.execute("SELECT image_key, phash FROM split_exposure WHERE sends > 0 AND phash IS NOT NULL")
        return {str(k): int(h, 16) for k, h in rows.fetchall()}

    def max_mu2(self) -> float:
        row = self._db.execute("SELECT MAX(mu2) FROM split_exposure").fetchone()
        return float(row[0] or 0.0)

    def epsilon(self, delta: float) -> float:
        """Epsilon at delta of the most exposed image over every split send in this ledger."""
        return epsilon_of_mu2(self.max_mu2(), delta)

    # -- steps ----------------------------------------------------------------------------------------

    def record_step(
        self,
        *,
        server: str,
        protocol: str,
        sends: Sequence[Send],
        sample_rate: float,
        delta: float,
    ) -> tuple[int, float]:
        """Charge one step's sends (before its bytes go); returns (row, epsilon after it)."""
        if not sends:
            raise ValueError("a step sends at least one image")
        worst = max(s.mu2 for s in sends)
        with self._transaction() as db:
            for send in sends:
                db.execute(
                    "INSERT INTO split_exposure(image_key, mu2, sends, phash) VALUES (?, ?, 1, ?) "
                    "ON CONFLICT(image_key) DO UPDATE SET mu2 = mu2 + excluded.mu2, sends = sends + 1, "
                    "phash = COALESCE(excluded.phash, phash)",
                    (send.image_key, send.mu2, None if send.phash is None else f"{send.phash:016x}"),
                )
            epsilon = epsilon_of_mu2(float(db.execute("SELECT MAX(mu2) FROM split_exposure").fetchone()[0]), delta)
            cursor = db.execute(
                "INSERT INTO privacy_spend(time, server, protocol, images, sample_rate, noise_multiplier, epsilon, "
                "delta, status) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'sent')",
                (time.time(), server, protocol, len(sends), float(sample_rate),
                 0.0 if math.isinf(worst) else worst**-0.5, epsilon, delta),
            )
            seq = int(cursor.lastrowid or 0)
            db.executemany("INSERT INTO split_sends(step, image_key, t, mu2) VALUES (?, ?, ?, ?)",
                           [(seq, s.image_key, int(s.t), s.mu2) for s in sends])
        return seq, epsilon

    def mark_acked(self, seqs: Sequence[int]) -> None:
        self._db.executemany("UPDATE privacy_spend SET status = 'acked' WHERE seq = ?", [(s,) for s in seqs])

    def records(self) -> list[SpendRecord]:
        rows = self._db.execute(
            "SELECT seq, time, server, protocol, images, sample_rate, noise_multiplier, epsilon, delta, status "
            "FROM privacy_spend ORDER BY seq"
        ).fetchall()
        return [SpendRecord(*row) for row in rows]

    def sends(self) -> list[tuple[int, str, int, float]]:
        """(step, image key, t, mu^2) of every split send, in order."""
        rows = self._db.execute("SELECT step, image_key, t, mu2 FROM split_sends ORDER BY seq").fetchall()
        return [(int(a), str(b), int(c), float(d)) for a, b, c, d in rows]

    def summary(self, delta: float, reference_mu2: float | None = None) -> dict[str, Any]:
        """Steps and sends charged, and epsilon at ``delta`` of the most exposed image.

        ``reference_mu2``: mu^2 of one ambient release at the client's floor, to state exposure in those units.
        """
        one = self._db.execute
        steps = int(one("SELECT COUNT(*) FROM privacy_spend").fetchone()[0])
        by_protocol = dict(one("SELECT protocol, COUNT(*) FROM privacy_spend GROUP BY protocol").fetchall())
        images, sends = one("SELECT COUNT(*), COALESCE(SUM(sends), 0) FROM split_exposure WHERE sends > 0").fetchone()
        worst = self.max_mu2()
        epsilon = epsilon_of_mu2(worst, delta)
        out: dict[str, Any] = {
            "accountant": "per-image Gaussian composition (exact), replace-one, labels public; no subsampling "
                          "amplification",
            "delta": delta,
            "epsilon": finite_or_none(epsilon),
            "epsilon_unbounded": math.isinf(epsilon),
            "steps": steps,
            "steps_by_protocol": {str(k): int(v) for k, v in by_protocol.items()},
            "images_sent": int(images),
            "sends": int(sends),
            "max_sends_per_image": int(one("SELECT COALESCE(MAX(sends), 0) FROM split_exposure").fetchone()[0]),
            "max_image_mu": finite_or_none(math.sqrt(worst)),
            "sent_unacknowledged": int(one("SELECT COUNT(*) FROM privacy_spend WHERE status = 'sent'").fetchone()[0]),
        }
        if reference_mu2 is not None and 0 < reference_mu2 < math.inf:
            out["max_image_exposure_releases"] = finite_or_none(worst / reference_mu2)
        return out

    # -- plumbing -------------------------------------------------------------------------------------

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, kind: object, *_: object) -> None:
        self.db.execute("COMMIT" if kind is None else "ROLLBACK")


def ambient_mu2(ledger: Ledger, num_elements: int, bound: float = 1.0) -> dict[str, float]:
    """mu^2 (replace-one) of every image's ambient releases in the ledger, by image key: each release counts.
    ``bound``: the data's range per element (1 for pixels; client/dp.py)."""
    out: dict[str, float] = {}
    for record in ledger.releases():
        out[record.image_key] = out.get(record.image_key, 0.0) + release_mu2(record.alpha_bar, num_elements,
                                                                              bound=bound)
    return out


def privacy_report(ledger: Ledger, delta: float, image_shape: Sequence[int], bound: float = 1.0) -> dict[str, Any]:
    """What this client's data has cost, in one unit (epsilon at ``delta``, replace-one), for metrics.json and status.

    ``split``: the most exposed image over every split send in the ledger. ``ambient``: per noise level released
    at, the epsilon of one release of an image there (a Gaussian mechanism on the image in [-1, 1]^d) and how many
    releases were made at it. ``worst_image``: an image's releases and split sends together, for the most exposed
    image (what the client's data has cost as a whole). ``bound``: the data's range per element (1 for pixels,
    LATENT_BOUND for latents: client/dp.py).
    """
    elements = math.prod(int(d) for d in image_shape)
    levels: dict[float, list[int]] = {}
    for record in ledger.releases():
        levels.setdefault(record.alpha_bar, []).append(record.cut)
    ambient = []
    for alpha_bar, cuts in sorted(levels.items()):
        cost = release_epsilon(alpha_bar, elements, delta, bound=bound)
        ambient.append({
            "cut": max(set(cuts), key=cuts.count), "alpha_bar": alpha_bar, "releases": len(cuts),
            "relation": "replace-one",
            "noise_multiplier": finite_or_none(float(cost["noise_multiplier"])),
            "epsilon_per_release": finite_or_none(float(cost["epsilon_exact"])),
        })
    split = PrivacyLedger(ledger.path)
    try:
        totals = ambient_mu2(ledger, elements, bound)
        for key, exposure in split.exposures().items():
            totals[key] = totals.get(key, 0.0) + exposure.mu2
        worst = max(totals.values(), default=0.0)
        return {"delta": delta, "relation": "replace-one (labels public)", "split": split.summary(delta),
                "ambient": ambient, "worst_image": {"mu": finite_or_none(math.sqrt(worst)),
                                                    "epsilon": finite_or_none(epsilon_of_mu2(worst, delta))}}
    finally:
        split.close()
