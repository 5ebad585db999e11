"""ReleaseStore: idempotent releases, forgetting, persistence across restarts."""

from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path

import pytest
import torch

from collafuse.server.errors import FingerprintMismatch
from collafuse.server.store import NewRelease, ReleaseStore

torch.set_num_threads(1)


def items(n: int, prefix: str = "k", seed: int = 0) -> list[NewRelease]:
    gen = torch.Generator().manual_seed(seed)
    return [NewRelease(f"{prefix}{i}", i % 3, torch.randn((1, 4, 4), generator=gen)) for i in range(n)]


def test_add_is_idempotent_and_keeps_the_first_release(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = ReleaseStore(tmp_path)
    store.register_client("alice", 20, "ambient", ["a", "b", "c"], "fp")
    first = items(3)
    assert store.add_releases("alice", 20, first) == (3, 0)
    version = store.version
    assert store.add_releases("alice", 20, first) == (0, 3)
    assert store.version == version, "a pure retry must not make the trainer reload"
    # Same key, different noise: ignored, loudly.
    changed = [NewRelease("k0", 0, first[0].x_cut + 1.0)]
    with caplog.at_level(logging.WARNING):
        assert store.add_releases("alice", 20, changed) == (0, 1)
    assert "different content" in caplog.text
    data = store.load_all()
    assert len(data) == 3 and data.version == version
    assert torch.equal(data.x_cut[0], first[0].x_cut)
    assert data.labels.tolist() == [0, 1, 2] and data.cuts.tolist() == [20, 20, 20]
    # Duplicate keys within one batch: the first wins.
    assert store.add_releases("alice", 20, [NewRelease("new", 1, first[1].x_cut), NewRelease("new", 2, first[2].x_cut)]) == (1, 1)
    assert store.counts() == {"alice": 4}


def test_forget_removes_everything_of_one_client(tmp_path: Path) -> None:
    store = ReleaseStore(tmp_path)
    for client, cut in (("alice", 10), ("bob", 30)):
        store.register_client(client, cut, "ambient", ["a"], "fp")
        store.add_releases(client, cut, items(4, prefix=client))
    version = store.version
    assert store.forget("alice") == 4
    assert store.version == version + 1
    assert store.get_client("alice") is None
    assert store.counts() == {"bob": 4}
    data = store.load_all()
    assert data.client_ids == ["bob"] and data.cuts.tolist() == [30] * 4
    assert store.forget("alice") == 0 and store.forget("nobody") == 0
    store.close()
    # Nothing of alice's rows is left in the database.
    with sqlite3.connect(tmp_path / "releases.sqlite") as conn:
        assert conn.execute("SELECT COUNT(*) FROM releases WHERE client_id = 'alice'").fetchone()[0] == 0


def test_store_survives_a_restart(tmp_path: Path) -> None:
    store = ReleaseStore(tmp_path)
    store.bind_fingerprint("fp")
    record = store.register_client("alice", 20, "ambient", ["a", "b"], "fp")
    store.add_releases("alice", 20, items(5))
    before, server_id, version = store.load_all(), store.server_id, store.version
    store.close()

    again = ReleaseStore(tmp_path)
    again.bind_fingerprint("fp")
    after = again.load_all()
    assert again.server_id == server_id and again.version == version
    assert torch.equal(before.x_cut, after.x_cut) and torch.equal(before.labels, after.labels)
    client = again.get_client("alice")
    assert client is not None and client.cut == 20 and client.class_names == ["a", "b"]
    assert client.registered_at == record.registered_at
    assert again.add_releases("alice", 20, items(5)) == (0, 5)
    # Re-registering keeps registered_at and updates the rest.
    updated = again.register_client("alice", 20, "ambient", ["a"], "fp")
    assert updated.registered_at == record.registered_at and updated.class_names == ["a"]


def test_fingerprint_binding_refuses_foreign_releases(tmp_path: Path) -> None:
    store = ReleaseStore(tmp_path)
    store.bind_fingerprint("one")
    store.bind_fingerprint("two")  # nothing stored yet: rebinding is harmless
    store.register_client("alice", 20, "ambient", ["a"], "two")
    store.add_releases("alice", 20, items(1))
    with pytest.raises(FingerprintMismatch, match="fresh folder"):
        store.bind_fingerprint("three")


def test_concurrent_uploads(tmp_path: Path) -> None:
    store = ReleaseStore(tmp_path)
    results: list[tuple[int, int]] = []

    def upload(client: str) -> None:
        store.register_client(client, 20, "ambient", ["a"], "fp")
        for batch in range(3):
            results.append(store.add_releases(client, 20, items(4, prefix=f"{client}-{batch}-")))

    threads = [threading.Thread(target=upload, args=(f"c{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(s for s, _ in results) == 48
    assert store.counts() == {f"c{i}": 12 for i in range(4)}
