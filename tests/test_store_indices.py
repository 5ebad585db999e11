"""The store stays fast as it grows: every query that Register, Status and training make reads through an
index (``EXPLAIN QUERY PLAN``), not a scan of every row (issue 20)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import torch

from collafuse.server.protocols import store_tables
from collafuse.server.protocols.ambient import NewRelease, ReleaseTable
from collafuse.server.store import ReleaseStore
from collafuse.v1 import collafuse_pb2


def _hot_queries(store: ReleaseStore) -> list[str]:
    """The SELECTs (parameters bound) that the store runs for Register, Status and the trainer's refresh."""
    table = ReleaseTable(store)
    gen = torch.Generator().manual_seed(0)
    for k in range(3):
        client = f"client-{k}"
        store.register_client(client, 100 * (k + 1), collafuse_pb2.PROTOCOL_AMBIENT, ["a", "b"], "fp")
        table.add(client, 100 * (k + 1), [NewRelease.of(f"{client}-{i}", i % 2, torch.randn((1, 4, 4), generator=gen))
                                          for i in range(4)])
    seen: list[str] = []
    with store.reading() as conn:
        conn.set_trace_callback(seen.append)
    try:
        # Register: the client, what it holds, how many are registered.
        assert store.get_client("client-1") and store.count("client-1") and store.client_count()
        # Status: a page of clients in id order and their release counts.
        page = store.clients_page("client-0", 2)
        assert store.counts_of([c.client_id for c in page])
        # The trainer: counters, new rows, the summary of clients and cuts, the per-client counts, payloads.
        assert store.version and store.forget_epoch == 0
        ids, _, _ = table.row_ids(0)
        assert table.summary() and store.counts() and len(table.load(2)) and table.fetch(ids[:2].tolist())
    finally:
        with store.reading() as conn:
            conn.set_trace_callback(None)
    return [q for q in seen if q.lstrip().upper().startswith("SELECT")]


def _full_scans(store: ReleaseStore, queries: list[str]) -> dict[str, list[str]]:
    """Query -> the steps of its plan that read a table row by row (a SCAN without an index)."""
    scans: dict[str, list[str]] = {}
    with store.reading() as conn:
        for query in queries:
            steps = [str(row[3]) for row in conn.execute(f"EXPLAIN QUERY PLAN {query}")]
            bare = [s for s in steps if s.startswith("SCAN") and "USING" not in s]
            if bare:
                scans[query] = bare
    return scans


def test_register_status_and_training_queries_use_an_index(tmp_path: Path) -> None:
    store = ReleaseStore(tmp_path, store_tables())
    try:
        queries = _hot_queries(store)
        assert any("DISTINCT cut" in q for q in queries) and any("ORDER BY client_id" in q for q in queries)
        assert _full_scans(store, queries) == {}
    finally:
        store.close()


def test_the_check_sees_a_dropped_index(tmp_path: Path) -> None:
    """Without the cut index, the trainer's summary scans every release: the check above would fail."""
    store = ReleaseStore(tmp_path, store_tables())
    try:
        queries = _hot_queries(store)
        with store.transaction() as conn:
            conn.execute("DROP INDEX releases_cut")
        scans = _full_scans(store, queries)
        assert list(scans) == ["SELECT DISTINCT cut FROM releases ORDER BY 1"], scans
    finally:
        store.close()


def test_an_existing_store_gets_the_index_when_opened(tmp_path: Path) -> None:
    ReleaseStore(tmp_path, store_tables()).close()
    with sqlite3.connect(tmp_path / "releases.sqlite") as conn:
        conn.execute("DROP INDEX releases_cut")  # a store made before the index existed
    store = ReleaseStore(tmp_path, store_tables())
    try:
        with store.reading() as conn:
            names = {str(r[0]) for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert "releases_cut" in names
    finally:
        store.close()
