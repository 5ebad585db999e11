"""The release ledger: what left this client, when, at which noise level, and the noise it used.

One SQLite file in the workdir (transactions make every change all-or-nothing and
durable). It holds

- the client secret (random, created once; it keys the image HMACs and never leaves)
  and the client id;
- per image: ``image_key = HMAC-SHA256(secret, relative path + content hash)`` (the
  server sees this opaque key, never a file name) and a persistent random noise seed;
- every acknowledged release (time, server, cut, protocol, label, seed, SHA-256 of the
  bytes sent), and forget / reset events;
- the fingerprint last seen from the server.

Why the rules: a release x_cut = sqrt(ab) x0 + sqrt(1-ab) eps is a Gaussian mechanism.
Sending the *same* bytes twice discloses nothing new, so an image keeps one seed and a
retry or restart resends identical bytes. Fresh noise at the same cut lets a server
average copies; the same noise at a *different* cut is worse still (two equations in
x0 and eps: the server solves for x0 exactly). So the ledger refuses a second cut or a
release after ``forget`` until the user explicitly resets, and a reset draws fresh
noise for any image whose seed was used at another cut.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from collafuse.client.errors import ClientError, LedgerRefusal

log = logging.getLogger(__name__)

LEDGER_FILE = "ledger.sqlite"
SCHEMA_VERSION = "1"
_SEED_BITS = 63  # torch.Generator.manual_seed takes a signed 64-bit value

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS images (
    image_key TEXT PRIMARY KEY,
    seed INTEGER NOT NULL,
    seed_cut INTEGER,
    path TEXT,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS releases (
    seq INTEGER PRIMARY KEY,
    image_key TEXT NOT NULL REFERENCES images(image_key),
    time REAL NOT NULL,
    server TEXT NOT NULL,
    cut INTEGER NOT NULL,
    protocol TEXT NOT NULL,
    label INTEGER NOT NULL,
    seed INTEGER NOT NULL,
    payload_sha256 TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS releases_by_image ON releases(image_key);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    time REAL NOT NULL,
    kind TEXT NOT NULL,
    server TEXT NOT NULL,
    detail TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class ReleaseRecord:
    seq: int
    image_key: str
    time: float
    server: str
    cut: int
    protocol: str
    label: int
    seed: int
    payload_sha256: str


@dataclass
class ReleasePlan:
    """Which images to send now (indices into the caller's list, with their seeds) and which to skip."""

    pending: list[int]
    seeds: list[int]
    already_released: list[int]


@dataclass(frozen=True)
class AckedItem:
    image_key: str
    label: int
    seed: int
    payload_sha256: str


class Ledger:
    """The persistent release ledger of one client workdir."""

    def __init__(self, workdir: Path) -> None:
        self.path = Path(workdir) / LEDGER_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not self.path.exists()
        try:
            self._db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            self._db.executescript(_SCHEMA)
            if fresh:
                # The file holds the HMAC secret: keep it private to the user.
                os.chmod(self.path, 0o600)
            with self._transaction():
                self._meta_default("schema", SCHEMA_VERSION)
                self._meta_default("secret", secrets.token_hex(32))
                self._meta_default("seq", "0")
        except sqlite3.DatabaseError as exc:
            raise ClientError(
                f"the release ledger {self.path} cannot be read ({exc}). It holds the per-image noise "
                "seeds: restore it from a backup rather than deleting it, or use a fresh --workdir."
            ) from exc
        version = self._meta("schema")
        if version != SCHEMA_VERSION:
            raise ClientError(f"the ledger {self.path} has schema {version}; this client reads {SCHEMA_VERSION}")
        self._secret = bytes.fromhex(self._meta("secret") or "")

    # -- plumbing ---------------------------------------------------------------------------------

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        # IMMEDIATE takes the write lock up front: no half-applied change survives an error or crash.
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def _set_meta(self, key: str, value: str) -> None:
        self._db.execute("INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, value))

    def _meta_default(self, key: str, value: str) -> None:
        self._db.execute("INSERT OR IGNORE INTO meta(key, value) VALUES (?, ?)", (key, value))

    def _next_seq(self) -> int:
        # One sequence over releases and events, so "released before that forget" is well defined.
        seq = int(self._meta("seq") or 0) + 1
        self._set_meta("seq", str(seq))
        return seq

    # -- identity ---------------------------------------------------------------------------------

    def client_id(self, requested: str | None = None) -> str:
        """The workdir's client id: created once (random) or taken from ``requested`` the first time."""
        with self._transaction():
            current = self._meta("client_id")
            if current is None:
                current = requested or f"client-{secrets.token_hex(6)}"
                self._set_meta("client_id", current)
        if requested and requested != current:
            raise LedgerRefusal(
                f"this workdir ({self.path.parent}) belongs to client {current!r}, not {requested!r}; "
                f"pass --client-id {current} or use another --workdir"
            )
        return current

    def image_key(self, relative_path: str, content: bytes) -> str:
        """HMAC-SHA256(secret, relative path + content hash): stable per image, meaningless to the server."""
        digest = hashlib.sha256(content).hexdigest()
        message = f"{Path(relative_path).as_posix()}\0{digest}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    def image_keys(self, root: Path, relative_paths: Sequence[str]) -> list[str]:
        """Keys for image files under ``root`` (reads each file once to hash its content)."""
        return [self.image_key(p, (Path(root) / p).read_bytes()) for p in relative_paths]

    # -- server fingerprint -----------------------------------------------------------------------

    @property
    def fingerprint(self) -> str:
        return self._meta("fingerprint") or ""

    def set_fingerprint(self, fingerprint: str, server: str) -> None:
        with self._transaction():
            self._set_meta("fingerprint", fingerprint)
            self._set_meta("fingerprint_server", server)

    # -- seeds ------------------------------------------------------------------------------------

    def seeds(self, keys: Sequence[str], paths: Sequence[str] | None = None) -> list[int]:
        """The persistent noise seed of each image, drawn at random the first time it is asked for."""
        with self._transaction():
            return [self._seed_row(k, paths[i] if paths else None)[0] for i, k in enumerate(keys)]

    def seed_for(self, key: str) -> int:
        return self.seeds([key])[0]

    def _seed_row(self, key: str, path: str | None) -> tuple[int, int | None]:
        row = self._db.execute("SELECT seed, seed_cut FROM images WHERE image_key = ?", (key,)).fetchone()
        if row is not None:
            return int(row[0]), (None if row[1] is None else int(row[1]))
        seed = secrets.randbits(_SEED_BITS)
        self._db.execute(
            "INSERT INTO images(image_key, seed, seed_cut, path, created) VALUES (?, ?, NULL, ?, ?)",
            (key, seed, path, time.time()),
        )
        return seed, None

    # -- releases ---------------------------------------------------------------------------------

    def _last_event_seq(self, kind: str, after: int = 0) -> int:
        row = self._db.execute("SELECT MAX(seq) FROM events WHERE kind = ? AND seq > ?", (kind, after)).fetchone()
        return int(row[0] or 0)

    def plan_release(
        self,
        keys: Sequence[str],
        cut: int,
        protocol: str,
        server: str,
        paths: Sequence[str] | None = None,
        resend: bool = False,
    ) -> ReleasePlan:
        """Decide per image: send (with its seed), skip (already released to this server), or refuse.

        ``resend`` sends images already released to this server again (identical bytes: same seed,
        same cut), e.g. when the server reports that it lost its store. Raises ``LedgerRefusal`` naming how many images (and a few paths) would be released at a
        second cut or after a forget; nothing is changed then.
        """
        with self._transaction():
            reset_seq = self._last_event_seq("reset")
            forget_seq = self._last_event_seq("forget", after=reset_seq)
            other_cut: dict[int, int] = {}
            forgotten: list[int] = []
            plan = ReleasePlan([], [], [])
            for i, key in enumerate(keys):
                rows = self._db.execute(
                    "SELECT seq, server, cut FROM releases WHERE image_key = ? AND seq > ?", (key, reset_seq)
                ).fetchall()
                cuts = {int(r[2]) for r in rows}
                if cuts - {cut}:
                    other_cut[i] = min(cuts - {cut})
                elif forget_seq and any(int(r[0]) < forget_seq for r in rows):
                    forgotten.append(i)
                elif not resend and any(r[1] == server for r in rows):
                    plan.already_released.append(i)
                else:
                    plan.pending.append(i)
            if other_cut:
                raise LedgerRefusal(self._refusal_other_cut(other_cut, cut, paths))
            if forgotten:
                raise LedgerRefusal(
                    f"refusing to release {len(forgotten)} image(s) again{_examples(forgotten, paths)}: they were "
                    "released before you asked the server to forget them, and sending them again would undo "
                    "that. Run `collafuse-client reset --yes` first if you really mean to release them again."
                )
            fresh = 0
            for i in plan.pending:
                seed, rotated = self._bind_seed(keys[i], cut, paths[i] if paths else None)
                plan.seeds.append(seed)
                fresh += rotated
        if fresh:
            log.warning("%d image(s) were prepared at another cut before; fresh noise was drawn for cut %d", fresh, cut)
        return plan

    def _bind_seed(self, key: str, cut: int, path: str | None) -> tuple[int, bool]:
        """The image's seed for a release at ``cut`` (and whether it is new): fresh noise if its seed was
        ever bound to another cut.

        Bound *before* sending, so an upload whose ack was lost still counts: the same noise
        never goes out at two cuts, even if the user changes --cut before the ledger saw an ack.
        """
        seed, seed_cut = self._seed_row(key, path)
        rotated = seed_cut is not None and seed_cut != cut
        if rotated:
            seed = secrets.randbits(_SEED_BITS)
        self._db.execute("UPDATE images SET seed = ?, seed_cut = ? WHERE image_key = ?", (seed, cut, key))
        return seed, rotated

    def _refusal_other_cut(self, other_cut: dict[int, int], cut: int, paths: Sequence[str] | None) -> str:
        previous = sorted(set(other_cut.values()))
        return (
            f"refusing to release {len(other_cut)} image(s){_examples(list(other_cut), paths)} at cut {cut}: "
            f"they were already released at cut {', '.join(map(str, previous))}. A second release at another "
            f"noise level discloses more about each image. Keep --cut {previous[0]}, use a fresh --workdir "
            "for other data, or run `collafuse-client reset --yes` to accept the extra disclosure "
            "(fresh noise is then drawn)."
        )

    def record_releases(self, items: Sequence[AckedItem], cut: int, protocol: str, server: str) -> None:
        """Record acknowledged releases (call only after the server's ack)."""
        now = time.time()
        with self._transaction():
            for item in items:
                self._db.execute(
                    "INSERT INTO releases(seq, image_key, time, server, cut, protocol, label, seed, payload_sha256) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (self._next_seq(), item.image_key, now, server, cut, protocol, item.label, item.seed, item.payload_sha256),
                )

    def record_forget(self, server: str, removed: int) -> None:
        with self._transaction():
            self._db.execute(
                "INSERT INTO events(seq, time, kind, server, detail) VALUES (?, ?, 'forget', ?, ?)",
                (self._next_seq(), time.time(), server, f"server removed {removed} releases"),
            )

    def reset(self, reason: str = "user reset") -> None:
        """Accept that earlier releases happened: later releases are no longer refused.

        History stays (the ledger is an audit record); the stored fingerprint is cleared so the
        client can join a server whose setup changed.
        """
        with self._transaction():
            self._db.execute(
                "INSERT INTO events(seq, time, kind, server, detail) VALUES (?, ?, 'reset', '', ?)",
                (self._next_seq(), time.time(), reason),
            )
            self._db.execute("DELETE FROM meta WHERE key IN ('fingerprint', 'fingerprint_server')")

    # -- queries ----------------------------------------------------------------------------------

    def releases(self, key: str | None = None) -> list[ReleaseRecord]:
        """Every acknowledged release (of one image, or all), oldest first."""
        sql = "SELECT seq, image_key, time, server, cut, protocol, label, seed, payload_sha256 FROM releases"
        rows = (
            self._db.execute(sql + " WHERE image_key = ? ORDER BY seq", (key,)).fetchall()
            if key is not None
            else self._db.execute(sql + " ORDER BY seq").fetchall()
        )
        return [ReleaseRecord(*row) for row in rows]

    def release_counts(self) -> dict[str, int]:
        """Acknowledged releases per image key (images never released are absent)."""
        rows = self._db.execute("SELECT image_key, COUNT(*) FROM releases GROUP BY image_key").fetchall()
        return {str(k): int(n) for k, n in rows}

    def events(self) -> list[dict[str, Any]]:
        rows = self._db.execute("SELECT seq, time, kind, server, detail FROM events ORDER BY seq").fetchall()
        return [dict(zip(("seq", "time", "kind", "server", "detail"), row)) for row in rows]

    def summary(self) -> dict[str, Any]:
        """Counts for people and metrics: images known, released, releases per cut, most per image."""
        images = int(self._db.execute("SELECT COUNT(*) FROM images").fetchone()[0])
        counts = self.release_counts()
        per_cut = dict(self._db.execute("SELECT cut, COUNT(*) FROM releases GROUP BY cut ORDER BY cut").fetchall())
        return {
            "client_id": self._meta("client_id"),
            "images": images,
            "released_images": len(counts),
            "releases": sum(counts.values()),
            "releases_per_cut": {str(k): int(v) for k, v in per_cut.items()},
            "max_releases_per_image": max(counts.values(), default=0),
            "forgets": sum(1 for e in self.events() if e["kind"] == "forget"),
            "resets": sum(1 for e in self.events() if e["kind"] == "reset"),
            "fingerprint": self.fingerprint,
        }


def _examples(indices: Sequence[int], paths: Sequence[str] | None, limit: int = 3) -> str:
    if not paths:
        return ""
    shown = ", ".join(paths[i] for i in list(indices)[:limit])
    more = f" and {len(indices) - limit} more" if len(indices) > limit else ""
    return f" ({shown}{more})"
