"""ReleaseStore and the ambient release table: idempotent releases, conflicts, forgetting, incremental loads,
persistence across restarts."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest
import torch

from collafuse.server.errors import FingerprintMismatch
from collafuse.server.protocols import store_tables
from collafuse.server.protocols.ambient import AmbientSource, NewRelease, ReleaseConflict, ReleaseTable
from collafuse.server.store import ReleaseStore
from collafuse.v1 import collafuse_pb2

torch.set_num_threads(1)


def items(n: int, prefix: str = "k", seed: int = 0) -> list[NewRelease]:
    gen = torch.Generator().manual_seed(seed)
    return [NewRelease.of(f"{prefix}{i}", i % 3, torch.randn((1, 4, 4), generator=gen)) for i in range(n)]


def x_of(item: NewRelease) -> torch.Tensor:
    return torch.frombuffer(bytearray(item.data), dtype=torch.float32).reshape(item.shape)


def test_add_is_idempotent_and_refuses_another_payload_under_a_key(tmp_path: Path) -> None:
    store = ReleaseStore(tmp_path, store_tables())
    table = ReleaseTable(store)
    store.register_client("alice", 20, collafuse_pb2.PROTOCOL_AMBIENT, ["a", "b", "c"], "fp")
    first = items(3)
    assert table.add("alice", 20, first) == (3, 0)
    version = store.version
    assert table.add("alice", 20, first) == (0, 3)
    assert store.version == version, "a pure retry must not make the trainer reload"
    # Same key, different noise: a conflict, and nothing of that batch is stored (not even its new key).
    changed = [NewRelease.of("fresh", 1, x_of(first[1])), NewRelease.of("k0", 0, x_of(first[0]) + 1.0)]
    with pytest.raises(ReleaseConflict, match="'k0'") as caught:
        table.add("alice", 20, changed)
    assert caught.value.keys == ["k0"]
    # The same payload at another cut is a conflict too (one image, one noise level).
    with pytest.raises(ReleaseConflict):
        table.add("alice", 40, first[:1])
    data = table.load()
    assert len(data) == 3 and data.version == version
    assert torch.equal(data.x_cut[0], x_of(first[0]))
    assert data.labels.tolist() == [0, 1, 2] and data.cuts.tolist() == [20, 20, 20]
    # The same key twice within one batch with the same payload: stored once, counted once as a duplicate.
    assert table.add("alice", 20, [NewRelease.of("new", 1, x_of(first[1])), NewRelease.of("new", 1, x_of(first[1]))]) == (1, 1)
    assert store.counts() == {"alice": 4}
    store.count_conflicts(2)
    assert store.release_conflicts == 2


def test_forget_removes_everything_of_one_client(tmp_path: Path) -> None:
    store = ReleaseStore(tmp_path, store_tables())
    for client, cut in (("alice", 10), ("bob", 30)):
        store.register_client(client, cut, collafuse_pb2.PROTOCOL_AMBIENT, ["a"], "fp")
        ReleaseTable(store).add(client, cut, items(4, prefix=client))
    version, epoch = store.version, store.forget_epoch
    assert store.forget("alice") == 4
    assert (store.version, store.forget_epoch) == (version + 1, epoch + 1)
    assert store.get_client("alice") is None
    assert store.counts() == {"bob": 4}
    data = ReleaseTable(store).load()
    assert set(data.client_ids) == {"bob"} and data.cuts.tolist() == [30] * 4
    assert store.forget("alice") == 0 and store.forget("nobody") == 0
    store.close()
    # Nothing of alice's rows is left in the database.
    with sqlite3.connect(tmp_path / "releases.sqlite") as conn:
        assert conn.execute("SELECT COUNT(*) FROM releases WHERE client_id = 'alice'").fetchone()[0] == 0


def test_store_survives_a_restart(tmp_path: Path) -> None:
    store = ReleaseStore(tmp_path, store_tables())
    store.bind_fingerprint("fp")
    record = store.register_client("alice", 20, collafuse_pb2.PROTOCOL_AMBIENT, ["a", "b"], "fp")
    ReleaseTable(store).add("alice", 20, items(5))
    before, server_id, version = ReleaseTable(store).load(), store.server_id, store.version
    store.close()

    again = ReleaseStore(tmp_path, store_tables())
    again.bind_fingerprint("fp")
    after = ReleaseTable(again).load()
    assert again.server_id == server_id and again.version == version
    assert torch.equal(before.x_cut, after.x_cut) and torch.equal(before.labels, after.labels)
    client = again.get_client("alice")
    assert client is not None and client.cut == 20 and client.class_names == ["a", "b"]
    assert client.registered_at == record.registered_at
    assert ReleaseTable(again).add("alice", 20, items(5)) == (0, 5)
    # Re-registering keeps registered_at and updates the rest.
    updated = again.register_client("alice", 20, collafuse_pb2.PROTOCOL_AMBIENT, ["a"], "fp")
    assert updated.registered_at == record.registered_at and updated.class_names == ["a"]


def test_fingerprint_binding_refuses_foreign_releases(tmp_path: Path) -> None:
    store = ReleaseStore(tmp_path, store_tables())
    store.bind_fingerprint("one")
    store.bind_fingerprint("two")  # nothing stored yet: rebinding is harmless
    store.register_client("alice", 20, collafuse_pb2.PROTOCOL_AMBIENT, ["a"], "two")
    ReleaseTable(store).add("alice", 20, items(1))
    with pytest.raises(FingerprintMismatch, match="fresh folder"):
        store.bind_fingerprint("three")


def test_concurrent_uploads(tmp_path: Path) -> None:
    store = ReleaseStore(tmp_path, store_tables())
    results: list[tuple[int, int]] = []

    def upload(client: str) -> None:
        store.register_client(client, 20, collafuse_pb2.PROTOCOL_AMBIENT, ["a"], "fp")
        for batch in range(3):
            results.append(ReleaseTable(store).add(client, 20, items(4, prefix=f"{client}-{batch}-")))

    threads = [threading.Thread(target=upload, args=(f"c{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(s for s, _ in results) == 48
    assert store.counts() == {f"c{i}": 12 for i in range(4)}


def test_incremental_loading_equals_a_full_reload_and_reflects_forget(tmp_path: Path) -> None:
    store = ReleaseStore(tmp_path, store_tables())
    table = ReleaseTable(store)
    alphas_cumprod = torch.linspace(1.0, 0.1, 51)
    incremental, full = (
        AmbientSource(table, alphas_cumprod, batch_size=2, label_dropout=0.0, null_label=3, device=torch.device("cpu"),
                      incremental=flag)
        for flag in (True, False)
    )

    def same() -> None:
        assert incremental.refresh() and full.refresh()
        assert not incremental.refresh(), "nothing new: no reload"
        assert torch.equal(incremental.x_cut, full.x_cut) and torch.equal(incremental.labels, full.labels)
        assert torch.equal(incremental.cuts, full.cuts) and incremental.client_ids == full.client_ids

    for k, (client, cut) in enumerate((("alice", 10), ("bob", 30), ("carol", 20))):
        store.register_client(client, cut, collafuse_pb2.PROTOCOL_AMBIENT, ["a"], "fp")
        table.add(client, cut, items(20, prefix=client, seed=k))
        same()
    assert (incremental.rows_loaded, full.rows_loaded) == (60, 20 + 40 + 60), "only new rows are read"
    store.forget("bob")
    same()
    assert incremental.client_ids == ["alice", "carol"] and len(incremental) == 40
    assert 30 not in incremental.cuts.tolist(), "a forget drops the client's rows from the training set"
    store.register_client("dave", 5, collafuse_pb2.PROTOCOL_AMBIENT, ["a"], "fp")
    table.add("dave", 5, items(3, prefix="dave"))
    same()
    assert len(incremental) == 43 and incremental.rows_loaded == 60 + 40 + 3
