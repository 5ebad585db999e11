"""The server's store: one SQLite file holding client registrations and each protocol's tables.

``<store>/releases.sqlite`` runs in WAL mode with ``synchronous=FULL``, so when a
transaction commits, its rows are on disk and the server may acknowledge them.
This module owns the tables every protocol shares (``meta``, ``clients``); a
protocol brings its own tables as a ``TableSpec`` (``server/protocols/``), and
``forget``, ``counts`` and the fingerprint check cover them without knowing
what they hold. ``version`` moves with every commit that changes training data,
``forget_epoch`` with every deletion, so a trainer loads only what is new and
reloads everything only after a forget.

A write the disk refuses (full, over quota, failing) raises ``StorageFull`` (RESOURCE_EXHAUSTED with a retry
hint, naming the store's folder) after rolling the transaction back, so the connection stays usable once
space is freed. A caller may make one transaction's COMMIT conditional (``commit_only_if``): the check runs
under the store's lock right before COMMIT, and a refusal rolls everything back (the Release handler uses it
so that a stream whose call ended, or whose client was re-registered or forgotten meanwhile, stores nothing).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from collafuse.common.enums import protocol_value
from collafuse.server.errors import (
    FingerprintMismatch,
    RequestRefused,
    StorageFull,
    StoreError,
    is_storage_error,
)
from collafuse.v1 import collafuse_pb2

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
    protocol INTEGER NOT NULL,  -- the wire's Protocol value (stores before it hold the short name)
    class_names TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    registered_at REAL NOT NULL,
    last_seen REAL NOT NULL
);
"""


@dataclass(frozen=True)
class TableSpec:
    """A protocol's own tables: ``schema`` creates them, ``client_tables`` have a ``client_id`` column
    whose rows ``forget`` deletes and ``counts`` counts (as releases held for that client)."""

    schema: str
    client_tables: tuple[str, ...]


@dataclass(frozen=True)
class ClientRecord:
    client_id: str
    cut: int
    protocol: collafuse_pb2.Protocol  # the wire's Protocol value
    class_names: list[str]
    fingerprint: str
    registered_at: float
    last_seen: float


class ReleaseStore:
    """Thread-safe: one connection, every access under one lock (SQLite serialises writers anyway).

    ``tables`` are the protocols' own tables (``server.protocols.store_tables()``: every protocol's).
    """

    def __init__(self, root: Path, tables: Sequence[TableSpec]) -> None:
        self.tables = tuple(tables)
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.path = self.root / DB_FILE
        self._lock = threading.RLock()
        # A check the next transaction of this thread runs before its COMMIT (commit_only_if).
        self._commit_checks = threading.local()
        try:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves so one upload is one transaction.
            self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30.0)
            self._conn.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit is fsynced before it returns, so an ack really means durable.
            self._conn.execute("PRAGMA synchronous=FULL")
            # Forgotten releases are overwritten with zeros, not left in free pages.
            self._conn.execute("PRAGMA secure_delete=ON")
            self._conn.executescript(_SCHEMA + "".join(t.schema for t in self.tables))
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"cannot open the release store {self.path}: {exc}. Use another --store or move the file away.") from exc
        for key, value in (("version", "0"), ("forget_epoch", "0"), ("release_conflicts", "0"),
                           ("server_id", f"collafuse-{uuid.uuid4().hex[:12]}")):
            self._ensure_meta(key, value)

    # ---- plumbing -------------------------------------------------------------------------
    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE ... COMMIT, ROLLBACK on any exception, a failed COMMIT
        included). A disk that refuses the write raises ``StorageFull``; a ``commit_only_if`` check of this thread
        runs before the COMMIT and its refusal is raised after the ROLLBACK."""
        check: Callable[[], RequestRefused | None] | None = getattr(self._commit_checks, "check", None)
        self._commit_checks.check = None  # for this transaction only, not for any later one of the call
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    yield self._conn
                    refused = check() if check is not None else None
                    if refused is not None:
                        raise refused
                    self._conn.execute("COMMIT")
                except BaseException:
                    if self._conn.in_transaction:
                        self._rollback()
                    raise
            except (sqlite3.Error, OSError) as exc:
                if is_storage_error(exc):
                    raise StorageFull(self.root, exc) from exc
                raise

    def _rollback(self) -> None:
        try:
            self._conn.execute("ROLLBACK")
        except sqlite3.Error as exc:  # SQLite may have rolled back by itself (a full disk does that)
            log.warning("rollback of the store %s: %s", self.path, exc)

    @contextmanager
    def commit_only_if(self, check: Callable[[], RequestRefused | None]) -> Iterator[None]:
        """The next transaction this thread opens commits only if ``check()`` returns None right before its COMMIT
        (under the store's lock); otherwise it rolls back and raises what ``check`` returned."""
        self._commit_checks.check = check
        try:
            yield
        finally:
            self._commit_checks.check = None

    @contextmanager
    def reading(self) -> Iterator[sqlite3.Connection]:
        """The connection under the store's lock: several reads see one state."""
        with self._lock:
            yield self._conn

    def _ensure_meta(self, key: str, value: str) -> None:
        with self.transaction() as conn:
            conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def _meta(self, key: str) -> str | None:
        with self._lock:
            row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    @staticmethod
    def bump(conn: sqlite3.Connection, key: str = "version", by: int = 1) -> None:
        """Add ``by`` to the counter ``key`` of the meta table inside the caller's transaction."""
        conn.execute("UPDATE meta SET value = CAST(value AS INTEGER) + ? WHERE key = ?", (int(by), key))

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
        with self.transaction() as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = 'fingerprint'").fetchone()
            if row is not None and row[0] != fingerprint:
                held = sum(self._counts(conn).values())
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
        self, client_id: str, cut: int, protocol: int, class_names: Sequence[str], fingerprint: str
    ) -> ClientRecord:
        """Insert or update a registration; ``registered_at`` of an existing client is kept."""
        now = time.time()
        with self.transaction() as conn:
            conn.execute(
                "INSERT INTO clients (client_id, cut, protocol, class_names, fingerprint, registered_at, last_seen) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(client_id) DO UPDATE SET cut = excluded.cut, protocol = excluded.protocol, "
                "class_names = excluded.class_names, fingerprint = excluded.fingerprint, last_seen = excluded.last_seen",
                (client_id, int(cut), int(protocol), json.dumps(list(class_names)), fingerprint, now, now),
            )
        record = self.get_client(client_id)
        assert record is not None
        return record

    def touch(self, client_id: str) -> None:
        """Record that a client was heard from (no-op for unknown clients)."""
        with self.transaction() as conn:
            conn.execute("UPDATE clients SET last_seen = ? WHERE client_id = ?", (time.time(), client_id))

    def client_count(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM clients").fetchone()[0])

    def clients_page(self, after: str = "", limit: int = 1000) -> list[ClientRecord]:
        """Clients whose id sorts after ``after``, in id order, at most ``limit`` of them."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT client_id, cut, protocol, class_names, fingerprint, registered_at, last_seen "
                "FROM clients WHERE client_id > ? ORDER BY client_id LIMIT ?", (after, int(limit)),
            ).fetchall()
        return [_client(r) for r in rows]

    def counts_of(self, client_ids: Sequence[str]) -> dict[str, int]:
        """Releases held per client for ``client_ids`` (clients holding none are left out)."""
        totals: dict[str, int] = {}
        ids = list(dict.fromkeys(client_ids))
        with self._lock:
            for start in range(0, len(ids), 500):  # SQLite's bound-parameter limit
                part = ids[start:start + 500]
                marks = ", ".join("?" * len(part))
                for spec in self.tables:
                    for table in spec.client_tables:
                        query = f"SELECT client_id, COUNT(*) FROM {table} WHERE client_id IN ({marks}) GROUP BY client_id"
                        for client, n in self._conn.execute(query, part):
                            totals[str(client)] = totals.get(str(client), 0) + int(n)
        return totals

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

    # ---- what the protocols' tables hold, per client --------------------------------------
    def forget(self, client_id: str) -> int:
        """Delete the client's rows in every protocol table and its registration; returns rows removed."""
        with self.transaction() as conn:
            removed = sum(
                conn.execute(f"DELETE FROM {table} WHERE client_id = ?", (client_id,)).rowcount
                for spec in self.tables for table in spec.client_tables
            )
            conn.execute("DELETE FROM clients WHERE client_id = ?", (client_id,))
            if removed:
                self.bump(conn)
                # Readers that load incrementally must start over: rows they hold are gone.
                self.bump(conn, "forget_epoch")
        if removed:
            # Reclaim the pages so deleted x_cut bytes do not linger in the file.
            try:
                with self._lock:
                    self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as exc:  # the deletion is committed; the next checkpoint reclaims the pages
                log.warning("store %s: WAL checkpoint after a forget failed: %s", self.path, exc)
        return int(removed)

    def _counts(self, conn: sqlite3.Connection) -> dict[str, int]:
        totals: dict[str, int] = {}
        for spec in self.tables:
            for table in spec.client_tables:
                for client, n in conn.execute(f"SELECT client_id, COUNT(*) FROM {table} GROUP BY client_id"):
                    totals[str(client)] = totals.get(str(client), 0) + int(n)
        return dict(sorted(totals.items()))

    def count(self, client_id: str) -> int:
        with self._lock:
            return sum(
                int(self._conn.execute(f"SELECT COUNT(*) FROM {table} WHERE client_id = ?", (client_id,)).fetchone()[0])
                for spec in self.tables for table in spec.client_tables
            )

    def counts(self) -> dict[str, int]:
        """Releases per client, for clients that hold any."""
        with self._lock:
            return self._counts(self._conn)

    @property
    def version(self) -> int:
        """Bumped by every commit that changes the training data: cheap to poll."""
        return int(self._meta("version") or 0)

    @property
    def forget_epoch(self) -> int:
        """Bumped by every forget that deleted rows: what a reader loaded before may be gone."""
        return int(self._meta("forget_epoch") or 0)

    @property
    def release_conflicts(self) -> int:
        """Items refused because a different payload came under an already stored key (kept over restarts)."""
        return int(self._meta("release_conflicts") or 0)

    def count_conflicts(self, n: int) -> None:
        with self.transaction() as conn:
            self.bump(conn, "release_conflicts", n)


def _protocol(stored: int | str) -> collafuse_pb2.Protocol:
    """The stored protocol as its wire value: stores written before the value was kept hold the short name
    ("ambient"), and a TEXT column returns a number as text."""
    text = str(stored)
    if text.isdigit():
        return cast(collafuse_pb2.Protocol, int(text))
    try:
        return protocol_value(text)
    except ValueError:
        return collafuse_pb2.PROTOCOL_UNSPECIFIED


def _client(row: tuple) -> ClientRecord:  # type: ignore[type-arg]
    return ClientRecord(
        client_id=str(row[0]),
        cut=int(row[1]),
        protocol=_protocol(row[2]),
        class_names=list(json.loads(row[3])),
        fingerprint=str(row[4]),
        registered_at=float(row[5]),
        last_seen=float(row[6]),
    )
