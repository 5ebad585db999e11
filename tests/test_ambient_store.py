"""``--train-from-store``: the ambient source that reads each minibatch from the store draws exactly the batches
the in-memory source draws, through new rows and a forget, with a bounded cache; the trainer uses it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from server_support import tiny_settings

from collafuse.server.protocols import store_tables
from collafuse.server.protocols.ambient import AmbientSource, NewRelease, ReleaseTable, ambient_source
from collafuse.server.protocols.ambient_store import StoreSource
from collafuse.server.store import ReleaseStore
from collafuse.server.trainer import Trainer
from collafuse.v1 import collafuse_pb2

CPU = torch.device("cpu")
ALPHAS = torch.linspace(0.9999, 0.01, 1001)


def add(store: ReleaseStore, client: str, cut: int, n: int, seed: int) -> None:
    store.register_client(client, cut, collafuse_pb2.PROTOCOL_AMBIENT, ["a", "b", "c"], "fp")
    gen = torch.Generator().manual_seed(seed)
    ReleaseTable(store).add(client, cut, [NewRelease.of(f"{client}{i}", i % 3, torch.randn((1, 4, 4), generator=gen))
                                          for i in range(n)])


def sources(store: ReleaseStore, cache_rows: int) -> tuple[AmbientSource, StoreSource]:
    options = {"batch_size": 16, "label_dropout": 0.3, "null_label": 3, "device": CPU, "weighting": "pooled"}
    return (AmbientSource(ReleaseTable(store), ALPHAS, **options),  # type: ignore[arg-type]
            StoreSource(ReleaseTable(store), ALPHAS, cache_rows=cache_rows, **options))  # type: ignore[arg-type]


def same_batches(memory: AmbientSource, streamed: StoreSource, seed: int, n: int = 3) -> None:
    for source in (memory, streamed):
        source.refresh()
    assert len(memory) == len(streamed) and memory.client_ids == streamed.client_ids
    g1, g2 = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    for _ in range(n):
        a, b = memory.batch(g1), streamed.batch(g2)
        for field in ("x_cut", "labels", "cuts", "t", "noise"):
            assert torch.equal(getattr(a, field), getattr(b, field)), field
        assert (a.weight is None and b.weight is None) or torch.equal(a.weight, b.weight)  # type: ignore[arg-type]
    assert torch.equal(g1.get_state(), g2.get_state())


def test_the_store_source_draws_the_in_memory_batches_through_new_rows_and_a_forget(tmp_path: Path) -> None:
    store = ReleaseStore(tmp_path, store_tables())
    add(store, "alice", 100, 30, 0)
    memory, streamed = sources(store, cache_rows=8)
    same_batches(memory, streamed, 1)
    add(store, "bob", 300, 25, 1)  # new rows (a second cut: pooled weights change) are read incrementally
    same_batches(memory, streamed, 2)
    assert len(streamed) == 55 and len(streamed._cache) <= 8
    store.forget("alice")
    same_batches(memory, streamed, 3)
    assert len(streamed) == 25 and streamed.client_ids == ["bob"]


def test_a_forget_between_the_index_and_a_batch_is_read_again(tmp_path: Path) -> None:
    store = ReleaseStore(tmp_path, store_tables())
    add(store, "alice", 100, 10, 0)
    add(store, "bob", 100, 10, 1)
    _, streamed = sources(store, cache_rows=0)
    streamed.refresh()
    store.forget("alice")  # the source's index still names alice's rows
    batch = streamed.batch(torch.Generator().manual_seed(0))
    assert len(streamed) == 10 and batch.x_cut.shape == (16, 1, 4, 4)


def test_the_trainer_trains_from_the_store_when_asked(tmp_path: Path) -> None:
    store = ReleaseStore(tmp_path / "store", store_tables())
    add(store, "alice", 10, 12, 0)
    settings = tiny_settings(tmp_path / "store", max_steps=2, train_from_store=True, train_cache_rows=4)
    trainer = Trainer(settings, store, "fp", device=CPU, poll_interval=0.02)
    assert isinstance(trainer.source, StoreSource) and trainer.source.cache_rows == 4
    trainer.start()
    assert trainer.wait_done(60) and trainer.error is None
    trainer.stop()
    assert trainer.source.reads > 0
    assert type(ambient_source(settings.model_copy(update={"train_from_store": False}), ReleaseTable(store), CPU,
                               3)) is AmbientSource


def test_a_store_source_is_never_handed_rows(tmp_path: Path) -> None:
    _, streamed = sources(ReleaseStore(tmp_path, store_tables()), 4)
    with pytest.raises(TypeError, match="reads its rows from the store"):
        streamed.take(ReleaseTable(streamed.store_table.store).load(), True)
