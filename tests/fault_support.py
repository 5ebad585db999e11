"""Helpers for the fault tests: a loopback TCP relay that freezes one direction mid-call, and readers of the
server's store and a client's ledger (the tests only read them, also while their owners run)."""

from __future__ import annotations

import socket
import sqlite3
import threading
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Self

Direction = Literal["up", "down"]


class FreezingRelay:
    """A TCP relay on 127.0.0.1 to ``127.0.0.1:target_port`` that stalls one call of one connection.

    The first connection whose client has sent more than ``after_bytes`` gets ``freeze`` frozen for good:
    ``up`` drops the rest of what the client sends (an upload stops mid-stream: the server holds part of it),
    ``down`` drops everything the server answers (the server gets the whole call and commits, its reply never
    arrives). Bytes are counted per connection, so set ``after_bytes`` above what the calls before the
    upload send (a Register is well under 2 kB) and below the upload's size. Later connections (the client's
    retries) are relayed untouched; a connection whose other end closes is closed, as a dead server would be.
    """

    def __init__(self, target_port: int, freeze: Direction, after_bytes: int) -> None:
        self.target_port = target_port
        self.freeze = freeze
        self.after_bytes = after_bytes
        self.triggered = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, name="relay-accept", daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        with self._lock:
            self._closed = True
            sockets, self._sockets = [self._listener, *self._sockets], []
        for sock in sockets:
            _close(sock)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
                server.settimeout(None)
            except OSError:  # nothing listens (the server is down): the client sees a refused connection
                _close(client)
                continue
            with self._lock:
                if self._closed:
                    _close(client)
                    _close(server)
                    return
                self._sockets += [client, server]
            link = _Link()
            threading.Thread(target=self._pump, args=(client, server, link, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, link, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, link: _Link, upward: bool) -> None:
        try:
            while data := source.recv(65536):
                if upward:
                    data = self._count(link, data)
                elif link.frozen == "down":
                    continue  # the reply is swallowed; the server is not blocked by it
                if data:
                    sink.sendall(data)
        except OSError:
            pass
        finally:  # one end gone: close both, as a dying peer would
            _close(source)
            _close(sink)

    def _count(self, link: _Link, data: bytes) -> bytes:
        """What of ``data`` (client to server) to pass on; freezes the link when it crosses ``after_bytes``."""
        if link.frozen == "up":
            return b""
        with self._lock:
            crossing = not self.triggered.is_set() and link.sent + len(data) > self.after_bytes
            if crossing:
                # Set before the crossing bytes go: no reply to them can slip through a 'down' freeze.
                link.frozen = self.freeze
                self.triggered.set()
        passed = data[: max(0, self.after_bytes - link.sent)] if crossing and self.freeze == "up" else data
        link.sent += len(data)
        return passed


@dataclass
class _Link:
    sent: int = 0
    frozen: Direction | None = None


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


def _open(path: Path) -> sqlite3.Connection:
    """Read with an ordinary connection: after a SIGKILL, it rolls back the hot journal a read-only one cannot."""
    if not path.exists():
        raise FileNotFoundError(path)
    return sqlite3.connect(path, timeout=30)


def store_rows(store: Path) -> dict[tuple[str, str], str]:
    """(client_id, image_key) -> SHA-256 of the payload, for every release the server's store holds."""
    with closing(_open(store / "releases.sqlite")) as db:
        return {(str(c), str(k)): str(h) for c, k, h in db.execute("SELECT client_id, image_key, sha256 FROM releases")}


def store_meta(store: Path, key: str) -> str | None:
    with closing(_open(store / "releases.sqlite")) as db:
        row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return None if row is None else str(row[0])


@dataclass(frozen=True)
class LedgerRelease:
    image_key: str
    payload_sha256: str
    status: str  # 'sent' or 'acked'


def ledger_releases(workdir: Path) -> list[LedgerRelease]:
    """Every release record of a client's ledger (client/ledger.py), oldest first."""
    path = workdir / "ledger.sqlite"
    if not path.exists():
        return []
    with closing(_open(path)) as db:
        # The client creates its ledger's tables one statement at a time: a poll that lands in between sees
        # the file without the releases table yet, which is a ledger with nothing released.
        if db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'releases'").fetchone() is None:
            return []
        rows = db.execute("SELECT image_key, payload_sha256, status FROM releases ORDER BY seq").fetchall()
    return [LedgerRelease(str(k), str(h), str(s)) for k, h, s in rows]


def ledger_client_id(workdir: Path) -> str:
    with closing(_open(workdir / "ledger.sqlite")) as db:
        row = db.execute("SELECT value FROM meta WHERE key = 'client_id'").fetchone()
    return str(row[0])
