"""Trainer: waits for clients, trains on all releases, checkpoints atomically, resumes exactly."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from server_support import tiny_settings

from collafuse.common.models import load_model
from collafuse.server.errors import FingerprintMismatch, StartupError
from collafuse.server.protocols import store_tables
from collafuse.server.protocols.ambient import AmbientSource, NewRelease, ReleaseTable
from collafuse.server.store import ReleaseStore
from collafuse.server.trainer import Trainer
from collafuse.v1 import collafuse_pb2
from collafuse.v1.collafuse_pb2 import PHASE_DONE, PHASE_IDLE, PHASE_WAITING

torch.set_num_threads(1)
CPU = torch.device("cpu")


def add(store: ReleaseStore, client: str, cut: int, n: int = 4, seed: int = 0) -> None:
    store.register_client(client, cut, collafuse_pb2.PROTOCOL_AMBIENT, ["a", "b", "c"], "fp")
    gen = torch.Generator().manual_seed(seed)
    ReleaseTable(store).add(client, cut, [NewRelease.of(f"{client}{i}", i % 3, torch.randn((1, 8, 8), generator=gen)) for i in range(n)])


def wait_for(predicate, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def train_to_max_steps(store: ReleaseStore, **overrides: Any) -> Trainer:
    """A trainer on ``store`` (settings ``tiny_settings(store.root, **overrides)``) that has reached max_steps."""
    trainer = Trainer(tiny_settings(store.root, **overrides), store, "fp", device=CPU, poll_interval=0.02)
    trainer.start()
    assert trainer.wait_done(60)
    return trainer


def test_trains_on_releases_of_two_clients_and_checkpoints(tmp_path: Path) -> None:
    store = ReleaseStore(tmp_path, store_tables())
    trainer = Trainer(tiny_settings(tmp_path, min_clients=2, max_steps=4, checkpoint_every=2), store, "fp", device=CPU, poll_interval=0.02)
    add(store, "alice", 10)
    trainer.start()
    wait_for(lambda: trainer.state().phase == PHASE_WAITING)
    time.sleep(0.1)
    assert trainer.state().step == 0, "one client of min_clients=2 must not start training"
    add(store, "bob", 30, seed=1)
    assert trainer.wait_done(60)
    state = trainer.state()
    assert (state.phase, state.step, state.max_steps) == (PHASE_DONE, 4, 4)
    assert (state.releases, state.clients_with_releases) == (8, 2)
    assert state.last_loss is not None and math.isfinite(state.last_loss)
    source = trainer.source
    assert isinstance(source, AmbientSource), "the ambient protocol trains on an AmbientSource"
    assert source.client_ids == ["alice", "bob"]
    assert sorted(set(source.cuts.tolist())) == [10, 30]

    latest = tmp_path / "checkpoints" / "latest"
    for part in ("model", "ema"):
        assert (latest / part / "config.json").is_file()
        assert (latest / part / "diffusion_pytorch_model.safetensors").is_file()
        assert json.loads((latest / part / "collafuse.json").read_text())["step"] == 4
    assert (latest / "trainer.pt").is_file()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["latest"], "no tmp-* or previous left behind"
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [s for s, _ in metrics["losses"]] == [1, 2, 3, 4] and metrics["steps_per_s"] > 0
    ema, meta = load_model(latest / "ema")
    assert meta["fingerprint"] == "fp"
    step, snapshot = trainer.ema_snapshot()
    assert step == 4 and trainer.ema_snapshot()[1] is snapshot, "snapshots are cached per step"
    for a, b in zip(ema.parameters(), snapshot.parameters()):
        assert torch.equal(a, b)
    trainer.stop()


def test_resume_continues_exactly(tmp_path: Path) -> None:
    straight_store, split_store = ReleaseStore(tmp_path / "straight", store_tables()), ReleaseStore(tmp_path / "split", store_tables())
    for store in (straight_store, split_store):
        add(store, "alice", 10)
        add(store, "bob", 30, seed=1)

    straight = train_to_max_steps(straight_store, max_steps=4)
    first = train_to_max_steps(split_store, max_steps=2)
    first.stop()
    resumed = Trainer(tiny_settings(tmp_path / "split", max_steps=4), split_store, "fp", device=CPU, poll_interval=0.02)
    assert resumed.state().step == 2 and [s for s, _ in resumed.core.losses] == [1, 2]
    resumed.start()
    assert resumed.wait_done(60)

    assert resumed.core.losses == straight.core.losses
    for a, b in zip(weights(resumed.model), weights(straight.model)):
        assert torch.equal(a, b)
    for a, b in zip(weights(resumed.ema.model), weights(straight.ema.model)):
        assert torch.equal(a, b)

    # Restarting at max_steps: same step, nothing trained, "done" at once.
    again = Trainer(tiny_settings(tmp_path / "split", max_steps=4), split_store, "fp", device=CPU, poll_interval=0.02)
    assert again.state().step == 4
    again.start()
    assert again.wait_done(10) and again.state().step == 4


def test_resume_refuses_another_fingerprint_or_preset(tmp_path: Path) -> None:
    store = ReleaseStore(tmp_path, store_tables())
    add(store, "alice", 10)
    train_to_max_steps(store, max_steps=1)
    with pytest.raises(FingerprintMismatch, match="fresh --store"):
        Trainer(tiny_settings(tmp_path), store, "another", device=CPU)
    with pytest.raises(StartupError, match="--model-preset tiny"):
        Trainer(tiny_settings(tmp_path, model_preset="small"), store, "fp", device=CPU)


def test_interrupted_checkpoint_swap_is_recovered(tmp_path: Path) -> None:
    store = ReleaseStore(tmp_path, store_tables())
    add(store, "alice", 10)
    train_to_max_steps(store, max_steps=2)
    ckpt = tmp_path / "checkpoints"
    # A crash between the two renames leaves only "previous" (and maybe a half-written tmp-*).
    os.replace(ckpt / "latest", ckpt / "previous")
    (ckpt / "tmp-deadbeef").mkdir()
    resumed = Trainer(tiny_settings(tmp_path, max_steps=2), store, "fp", device=CPU)
    assert resumed.state().step == 2
    assert sorted(os.listdir(ckpt)) == ["latest"]


def test_start_timeout_and_stop_saves_a_checkpoint(tmp_path: Path) -> None:
    store = ReleaseStore(tmp_path, store_tables())
    add(store, "alice", 10)
    # min_clients=2 but no wait: trains on the one client there is; max_steps=0 trains until stopped.
    trainer = Trainer(tiny_settings(tmp_path, min_clients=2, start_timeout=0, max_steps=0), store, "fp", device=CPU, poll_interval=0.02)
    trainer.start()
    wait_for(lambda: trainer.state().step >= 2)
    trainer.stop()
    state = trainer.state()
    assert state.phase == PHASE_IDLE
    meta = json.loads((tmp_path / "checkpoints" / "latest" / "ema" / "collafuse.json").read_text())
    assert meta["step"] == state.step >= 2
