"""The release store: one SQLite file holding every client's registration and x_cut releases.

``<store>/releases.sqlite`` runs in WAL mode with ``synchronous=FULL``, so when
``add_releases`` returns, the rows are on disk and the server may acknowledge
them. One record per (client, image key): re-sending a key is a no-op counted as
a duplicate, which makes release uploads safe to retry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from collafuse.server.errors import FingerprintMismatch, StoreError

log = logging.getLogger(__name__)

DB_FILE = "releases.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS clients (
    client_id TEXT PRIMARY KEY,
    cut INTEGER NOT NULL,
    protocol TEXT NOT NULL,
    class_names TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    registered_at REAL NOT NULL,
    last_seen REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS releases (
    client_id TEXT NOT NULL,
    image_key TEXT NOT NULL,
    label INTEGER NOT NULL,
    cut INTEGER NOT NULL,
    dtype TEXT NOT NULL,
    shape TEXT NOT NULL,
    data BLOB NOT NULL,
    sha256 TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (client_id, image_key)
);
"""


@dataclass(frozen=True)
class ClientRecord:
    client_id: str
    cut: int
    protocol: str
    class_names: list[str]
    fingerprint: str
    registered_at: float
    last_seen: float


@dataclass(frozen=True)
class NewRelease:
    """One x_cut to store: shape [C, H, W], already validated by the servicer."""

    image_key: str
    label: int
    x_cut: torch.Tensor


@dataclass(frozen=True)
class ReleaseSet:
    """Every stored release, ready for training (all on the CPU)."""

    x_cut: torch.Tensor  # float32 [N, C, H, W]
    labels: torch.Tensor  # int64 [N]
    cuts: torch.Tensor  # int64 [N]
    client_index: torch.Tensor  # int64 [N], index into client_ids
    client_ids: list[str]
    version: int

    def __len__(self) -> int:
        return int(self.labels.shape[0])


class ReleaseStore:
    """Thread-safe: one connection, every access under one lock (SQLite serialises writers anyway)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.path = self.root / DB_FILE
        self._lock = threading.RLock()
        try:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves so one upload is one transaction.
            self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30.0)
            self._conn.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit is fsynced before it returns, so an ack really means durable.
            self._conn.execute("PRAGMA synchronous=FULL")
            # Forgotten releases are overwritten with zeros, not left in free pages.
            self._conn.execute("PRAGMA secure_delete=ON")
            self._conn.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"cannot open the release store {self.path}: {exc}. Use another --store or move the file away.") from exc
        self._ensure_meta("version", "0")
        self._ensure_meta("server_id", f"collafuse-{uuid.uuid4().hex[:12]}")

    # ---- plumbing -------------------------------------------------------------------------
    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _ensure_meta(self, key: str, value: str) -> None:
        with self._transaction() as conn:
            conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def _meta(self, key: str) -> str | None:
        with self._lock:
            row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    @staticmethod
    def _bump_version(conn: sqlite3.Connection) -> None:
        conn.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'version'")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # ---- identity -------------------------------------------------------------------------
    @property
    def server_id(self) -> str:
        """A stable id of this store (and so of the server that owns it), kept across restarts."""
        return self._meta("server_id") or ""

    def bind_fingerprint(self, fingerprint: str) -> None:
        """Tie the store to one configuration; releases made under another one cannot be reused."""
        with self._transaction() as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = 'fingerprint'").fetchone()
            if row is not None and row[0] != fingerprint:
                held = conn.execute("SELECT COUNT(*) FROM releases").fetchone()[0]
                if held:
                    raise FingerprintMismatch(
                        f"the store {self.root} holds {held} releases made for another schedule, image spec or "
                        f"class list (fingerprint {row[0][:12]}..., this server: {fingerprint[:12]}...): start the "
                        "server with the settings the store was made with, or point --store at a fresh folder"
                    )
                log.warning("store %s was bound to another fingerprint but holds no releases: rebinding", self.root)
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('fingerprint', ?)", (fingerprint,))

    # ---- clients --------------------------------------------------------------------------
    def register_client(
        self, client_id: str, cut: int, protocol: str, class_names: Sequence[str], fingerprint: str
    ) -> ClientRecord:
        """Insert or update a registration; ``registered_at`` of an existing client is kept."""
        now = time.time()
        with self._transaction() as conn:
            conn.execute(
                "INSERT INTO clients (client_id, cut, protocol, class_names, fingerprint, registered_at, last_seen) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(client_id) DO UPDATE SET cut = excluded.cut, protocol = excluded.protocol, "
                "class_names = excluded.class_names, fingerprint = excluded.fingerprint, last_seen = excluded.last_seen",
                (client_id, int(cut), protocol, json.dumps(list(class_names)), fingerprint, now, now),
            )
        record = self.get_client(client_id)
        assert record is not None
        return record

    def touch(self, client_id: str) -> None:
        """Record that a client was heard from (no-op for unknown clients)."""
        with self._transaction() as conn:
            conn.execute("UPDATE clients SET last_seen = ? WHERE client_id = ?", (time.time(), client_id))

    def get_client(self, client_id: str) -> ClientRecord | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT client_id, cut, protocol, class_names, fingerprint, registered_at, last_seen "
                "FROM clients WHERE client_id = ?",
                (client_id,),
            ).fetchone()
        return None if row is None else _client(row)

    def clients(self) -> list[ClientRecord]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT client_id, cut, protocol, class_names, fingerprint, registered_at, last_seen "
                "FROM clients ORDER BY client_id"
            ).fetchall()
        return [_client(r) for r in rows]

    # ---- releases -------------------------------------------------------------------------
    def add_releases(self, client_id: str, cut: int, items: Sequence[NewRelease]) -> tuple[int, int]:
        """Store items in one transaction; returns (stored, duplicates). Existing keys are kept as they are."""
        now = time.time()
        stored = duplicates = 0
        rows = []
        for item in items:
            array = np.ascontiguousarray(item.x_cut.detach().cpu().numpy(), dtype="<f4")
            data = array.tobytes()
            rows.append((item.image_key, int(item.label), json.dumps(list(array.shape)), data, hashlib.sha256(data).hexdigest()))
        with self._transaction() as conn:
            for key, label, shape, data, digest in rows:
                cursor = conn.execute(
                    "INSERT OR IGNORE INTO releases (client_id, image_key, label, cut, dtype, shape, data, sha256, created_at) "
                    "VALUES (?, ?, ?, ?, 'float32', ?, ?, ?, ?)",
                    (client_id, key, label, int(cut), shape, data, digest, now),
                )
                if cursor.rowcount == 1:
                    stored += 1
                    continue
                duplicates += 1
                kept = conn.execute(
                    "SELECT sha256, cut FROM releases WHERE client_id = ? AND image_key = ?", (client_id, key)
                ).fetchone()
                if kept is not None and (kept[0] != digest or kept[1] != cut):
                    # Two different releases of one image would let an observer average the noise away.
                    log.warning(
                        "client %s re-sent image key %s with different content (cut %s, stored cut %s): "
                        "kept the first release; a client must release each image once, with one noise draw",
                        client_id, key, cut, kept[1],
                    )
            if stored:
                self._bump_version(conn)
        return stored, duplicates

    def forget(self, client_id: str) -> int:
        """Delete the client's releases and registration; returns how many releases were removed."""
        with self._transaction() as conn:
            removed = conn.execute("DELETE FROM releases WHERE client_id = ?", (client_id,)).rowcount
            conn.execute("DELETE FROM clients WHERE client_id = ?", (client_id,))
            if removed:
                self._bump_version(conn)
        if removed:
            # Reclaim the pages so deleted x_cut bytes do not linger in the file.
            with self._lock:
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return int(removed)

    def count(self, client_id: str) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM releases WHERE client_id = ?", (client_id,)).fetchone()[0])

    def counts(self) -> dict[str, int]:
        """Releases per client, for clients that hold any."""
        with self._lock:
            rows = self._conn.execute("SELECT client_id, COUNT(*) FROM releases GROUP BY client_id ORDER BY client_id").fetchall()
        return {str(c): int(n) for c, n in rows}

    @property
    def version(self) -> int:
        """Bumped by every commit that changes the release set: cheap to poll."""
        return int(self._meta("version") or 0)

    def load_all(self) -> ReleaseSet:
        """Every release as tensors, ordered by (client, key) so a reload is deterministic."""
        with self._lock:
            # Version and rows under one lock: the pair is consistent.
            version = self.version
            rows = self._conn.execute(
                "SELECT client_id, label, cut, shape, data FROM releases ORDER BY client_id, image_key"
            ).fetchall()
        client_ids = sorted({str(r[0]) for r in rows})
        index = {c: i for i, c in enumerate(client_ids)}
        if not rows:
            return ReleaseSet(
                torch.empty((0,)), torch.empty((0,), dtype=torch.long), torch.empty((0,), dtype=torch.long),
                torch.empty((0,), dtype=torch.long), [], version,
            )
        shapes = {r[3] for r in rows}
        if len(shapes) != 1:
            raise StoreError(f"the store {self.root} holds releases of several shapes {sorted(shapes)}; use a fresh --store")
        shape = json.loads(rows[0][3])
        # One buffer for all rows; the blobs are float32 little-endian as written above.
        x = np.frombuffer(b"".join(r[4] for r in rows), dtype="<f4").reshape(len(rows), *shape)
        return ReleaseSet(
            x_cut=torch.from_numpy(x.astype(np.float32, copy=True)),
            labels=torch.tensor([r[1] for r in rows], dtype=torch.long),
            cuts=torch.tensor([r[2] for r in rows], dtype=torch.long),
            client_index=torch.tensor([index[str(r[0])] for r in rows], dtype=torch.long),
            client_ids=client_ids,
            version=version,
        )


def _client(row: tuple) -> ClientRecord:  # type: ignore[type-arg]
    return ClientRecord(
        client_id=str(row[0]),
        cut=int(row[1]),
        protocol=str(row[2]),
        class_names=list(json.loads(row[3])),
        fingerprint=str(row[4]),
        registered_at=float(row[5]),
        last_seen=float(row[6]),
    )
