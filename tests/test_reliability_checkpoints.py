"""Checkpoints you can go back to, and a trainer that survives a failed save (issue 16).

The last ``--keep-checkpoints`` are kept; only finite weights are written; a resume starts from the newest finite
one; ``collafuse-server checkpoints list|rollback`` shows them and goes back (only with the server stopped). A
save that fails (a full disk) leaves no temporary folder, does not stop training, shows in Status and is retried.
"""

from __future__ import annotations

import errno
import fcntl
import os
import resource
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from server_support import tiny_settings
from test_server_trainer import add, wait_for

from collafuse.client.errors import ClientError
from collafuse.client.trainer import checkpoint_root, train_local
from collafuse.common import checkpoint
from collafuse.common.config import ClientSettings, TrainOptions
from collafuse.common.models import build_unet
from collafuse.common.schedule import ScheduleConfig
from collafuse.common.train_loop import TrainCore
from collafuse.server import cli
from collafuse.server import trainer as trainer_module
from collafuse.server.app import LOCK_FILE
from collafuse.server.protocols import store_tables
from collafuse.server.servicer import _trainer_message
from collafuse.server.store import ReleaseStore
from collafuse.server.trainer import Trainer
from collafuse.v1.collafuse_pb2 import PHASE_DONE

torch.set_num_threads(1)
CPU = torch.device("cpu")
SHAPE = (1, 8, 8)


def core_at(step: int) -> TrainCore:
    core = TrainCore(build_unet("tiny", SHAPE, 3), TrainOptions(), CPU)
    core.step = step
    return core


def test_the_last_k_are_kept_and_listed(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    core = core_at(0)
    for step in (1, 2, 3, 4, 5):
        core.step = step
        checkpoint.save(root, core, {}, keep=3, durable=False)
    assert os.listdir(root) == ["latest"], "older checkpoints live beside root, not in it"
    found = checkpoint.list_checkpoints(root)
    assert [(c.step, c.latest) for c in found] == [(5, True), (4, False), (3, False)]
    assert checkpoint.saved_step(checkpoint.latest(root)) == 5
    # keep=1 (the client's) keeps only latest, as before.
    single = tmp_path / "single"
    for step in (1, 2):
        core.step = step
        checkpoint.save(single, core, {}, durable=False)
    assert [c.step for c in checkpoint.list_checkpoints(single)] == [2]
    assert not checkpoint.history(single).exists()


def test_non_finite_weights_are_never_saved(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    core = core_at(1)
    checkpoint.save(root, core, {}, keep=3, durable=False)
    core.step = 2
    with torch.no_grad():
        next(core.model.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(checkpoint.NonFiniteCheckpoint, match="NaN or Inf"):
        checkpoint.save(root, core, {}, keep=3, durable=False)
    assert [c.step for c in checkpoint.list_checkpoints(root)] == [1]
    assert os.listdir(root) == ["latest"]


def test_a_failed_write_leaves_no_temporary_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "checkpoints"
    core = core_at(1)
    checkpoint.save(root, core, {}, keep=2, durable=False)

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full)
    core.step = 2
    with pytest.raises(OSError, match="No space left"):
        checkpoint.save(root, core, {}, keep=2, durable=False)
    assert os.listdir(root) == ["latest"] and checkpoint.saved_step(checkpoint.latest(root)) == 1


def _poison_latest(root: Path) -> None:
    """Write NaN into the saved EMA weights of ``root/latest`` (a checkpoint that should never have been written)."""
    from safetensors.torch import load_file, save_file

    path = checkpoint.latest(root) / checkpoint.EMA / "diffusion_pytorch_model.safetensors"
    tensors = load_file(path)
    first = min(tensors)
    tensors[first] = torch.full_like(tensors[first], float("nan"))
    save_file(tensors, path)


def test_resume_starts_from_the_newest_finite_checkpoint(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    core = core_at(0)
    for step in (1, 2, 3):
        core.step = step
        checkpoint.save(root, core, {}, keep=3, durable=False)
    _poison_latest(root)
    saved = checkpoint.load(root, CPU)
    assert saved is not None and int(saved.state["step"]) == 2 and checkpoint.is_finite(saved)
    assert [c.step for c in checkpoint.list_checkpoints(root)] == [2, 1], "the kept step 2 became latest"
    moved = list(checkpoint.discarded(root).rglob("nonfinite-step-000000003-*"))
    assert len(moved) == 1, "the non-finite checkpoint is moved aside, not deleted"
    # Nothing finite at all: a clear error, not a silent fresh start.
    only = tmp_path / "only"
    core.step = 7
    checkpoint.save(only, core, {}, durable=False)
    _poison_latest(only)
    with pytest.raises(checkpoint.CheckpointError, match="no finite checkpoint"):
        checkpoint.load(only, CPU)


def test_the_operator_lists_and_rolls_back(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "store"
    root = store / trainer_module.CHECKPOINTS
    core = core_at(0)
    for step in (10, 20, 30):
        core.step = step
        checkpoint.save(root, core, {}, keep=3, durable=False)
    assert cli.main(["checkpoints", "list", "--store", str(store), "--check"]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in listing] == ["30", "20", "10"]
    assert "latest" in listing[0] and all(line.endswith("finite") for line in listing)
    # While a server holds the store, a rollback is refused.
    with open(store / LOCK_FILE, "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert cli.main(["checkpoints", "rollback", "--store", str(store), "--step", "10"]) == 2
    assert checkpoint.saved_step(checkpoint.latest(root)) == 30
    assert cli.main(["checkpoints", "rollback", "--store", str(store), "--step", "15"]) == 2  # not kept
    assert cli.main(["checkpoints", "rollback", "--store", str(store), "--step", "10"]) == 0
    assert [c.step for c in checkpoint.list_checkpoints(root)] == [10]
    kept_aside = sorted(p.name for p in checkpoint.discarded(root).rglob("*step-*") if p.parent.parent == checkpoint.discarded(root))
    assert kept_aside == ["latest-step-000000030", "step-000000020"], "what a rollback replaces is kept aside"


def test_an_interrupted_rollback_is_finished_at_start(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    core = core_at(0)
    for step in (1, 2):
        core.step = step
        checkpoint.save(root, core, {}, keep=2, durable=False)
    os.replace(checkpoint.latest(root), tmp_path / "gone")  # a crash after moving latest away
    saved = checkpoint.load(root, CPU)
    assert saved is not None and int(saved.state["step"]) == 1


def _full_disk(monkeypatch: pytest.MonkeyPatch) -> dict[str, bool]:
    """Checkpoint saves fail with ENOSPC while the returned switch's "on" is True; retries come fast. The backoff
    doubles per failure: capped low, so that a loaded machine's many failures before the disk "frees" do not
    push the next retry past a test's wait."""
    monkeypatch.setattr(trainer_module, "SAVE_RETRY_S", 0.05)
    monkeypatch.setattr(trainer_module, "SAVE_RETRY_MAX_S", 0.5)
    real_save = checkpoint.torch.save
    full = {"on": True}

    def maybe_full(obj: object, path: object, *args: object, **kwargs: object) -> None:
        if full["on"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(checkpoint.torch, "save", maybe_full)
    return full


def test_the_trainer_keeps_training_through_failed_saves_and_retries(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Saves fail (ENOSPC) for a while: training goes on, Status says why and how often, no tmp-* is left, and the
    first save after space comes back writes the current step."""
    store = ReleaseStore(tmp_path, store_tables())
    add(store, "alice", 10)
    full = _full_disk(monkeypatch)
    trainer = Trainer(tiny_settings(tmp_path, max_steps=0, checkpoint_every=2), store, "fp", device=CPU,
                      poll_interval=0.02)
    trainer.start()
    try:
        wait_for(lambda: trainer.state().save_failures >= 2 and trainer.state().step >= 6, timeout=60)
        state = trainer.state()
        assert state.error is None and state.save_error is not None and "No space left" in state.save_error
        message = _trainer_message(state)
        assert message.save_failures >= 2 and "disk" in message.save_error and message.saved_step == -1
        full["on"] = False
        wait_for(lambda: trainer.state().save_failures == 0, timeout=60)
        assert trainer.state().save_error is None
        saved = checkpoint.saved_step(checkpoint.latest(tmp_path / "checkpoints"))
        assert saved is not None and saved >= 6
    finally:
        trainer.stop()
    assert checkpoint.saved_step(checkpoint.latest(tmp_path / "checkpoints")) == trainer.core.step
    # Checked once the trainer stopped: while it runs, a save in flight holds its tmp-* folder for a moment.
    assert not list((tmp_path / "checkpoints").glob("tmp-*")), "a failed save leaves no temporary folder"


def test_scheduled_saves_wait_out_the_backoff(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a failed save the every-N-steps schedule does not write to the full disk again before the backoff
    the Status message announces ("retrying in 60s") has passed."""
    store = ReleaseStore(tmp_path, store_tables())
    add(store, "alice", 10)
    _full_disk(monkeypatch)
    monkeypatch.setattr(trainer_module, "SAVE_RETRY_S", 60.0)
    monkeypatch.setattr(trainer_module, "SAVE_RETRY_MAX_S", 300.0)
    trainer = Trainer(tiny_settings(tmp_path, max_steps=0, checkpoint_every=2), store, "fp", device=CPU,
                      poll_interval=0.02)
    trainer.start()
    try:
        wait_for(lambda: trainer.state().step >= 20, timeout=60)
        state = trainer.state()
        assert state.error is None and state.save_failures == 1, state
        assert state.save_error is not None and "retrying in 60s" in state.save_error
    finally:
        monkeypatch.setattr(trainer_module, "SAVE_RETRY_S", 0.05)
        trainer.stop()


@contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """Writes past ``limit`` bytes fail with EFBIG (SIGXFSZ ignored): a real I/O error in every writer, C, Rust or
    Python, without root or a tmpfs."""
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def test_an_io_error_in_the_weights_writer_is_a_failed_save_not_a_dead_trainer(tmp_path: Path) -> None:
    """safetensors' writer reports a full disk as SafetensorError, not OSError; that once stopped the trainer (seen
    in CI's disk-full test). The real writer fails here, not a stand-in."""
    store = ReleaseStore(tmp_path, store_tables())
    add(store, "alice", 10)
    trainer = Trainer(tiny_settings(tmp_path, max_steps=0), store, "fp", device=CPU)
    with file_size_limit(1 << 16):  # config.json fits, the weights do not
        assert trainer.save_checkpoint() is None
    state = trainer.state()
    assert state.error is None and state.save_failures == 1
    assert state.save_error is not None and "File too large" in state.save_error and "disk" in state.save_error
    assert not list((tmp_path / "checkpoints").glob("tmp-*")), "a failed save leaves no temporary folder"
    assert trainer.save_checkpoint() is not None and trainer.state().save_failures == 0


def test_a_client_on_a_full_disk_gets_a_clear_error_and_keeps_its_last_checkpoint(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    images, labels = torch.rand((12, *SHAPE), generator=gen) * 2 - 1, torch.arange(12) % 3

    def train(steps: int) -> None:
        settings = ClientSettings(workdir=tmp_path, train_steps=steps, batch_size=4, seed=3, device="cpu")
        train_local(images=images, labels=labels, num_classes=3, image_shape=SHAPE,
                    schedule=ScheduleConfig(num_train_timesteps=50), cut=20, fingerprint="fp", workdir=tmp_path,
                    settings=settings, show_progress=False)

    train(2)
    with file_size_limit(1 << 16), pytest.raises(ClientError, match=r"at step 4 .*disk full\? .*resumes from step 2"):
        train(4)
    latest = checkpoint.latest(checkpoint_root(tmp_path))
    assert checkpoint.saved_step(latest) == 2, "the last checkpoint is intact"
    train(4)  # space is back: it resumes
    assert checkpoint.saved_step(latest) == 4


def test_a_trainer_that_finished_while_the_disk_was_full_saves_once_it_can(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    store = ReleaseStore(tmp_path, store_tables())
    add(store, "alice", 10)
    full = _full_disk(monkeypatch)
    trainer = Trainer(tiny_settings(tmp_path, max_steps=3), store, "fp", device=CPU, poll_interval=0.02)
    trainer.start()
    try:
        assert trainer.wait_done(60) and trainer.state().phase == PHASE_DONE
        wait_for(lambda: trainer.state().save_failures >= 2)
        assert not checkpoint.latest(tmp_path / "checkpoints").exists()
        full["on"] = False
        wait_for(lambda: checkpoint.saved_step(checkpoint.latest(tmp_path / "checkpoints")) == 3)
        time.sleep(0.1)
        assert trainer.state().save_failures == 0
    finally:
        trainer.stop()


def test_stop_saves_after_the_training_thread_died(tmp_path: Path) -> None:
    """The issue's SIGTERM after a dead trainer thread saved nothing (steps 20 -> 40 lost): stop() saves now."""
    store = ReleaseStore(tmp_path, store_tables())
    add(store, "alice", 10)
    trainer = Trainer(tiny_settings(tmp_path, max_steps=0, checkpoint_every=1000), store, "fp", device=CPU,
                      poll_interval=0.02)
    trainer.start()
    wait_for(lambda: trainer.state().step >= 3)
    real_run = trainer.core.run

    def crash(*args: object, **kwargs: object) -> None:
        raise RuntimeError("the training thread died")

    trainer.core.run = crash  # type: ignore[method-assign]
    trainer.source.refresh = lambda: True  # type: ignore[method-assign]
    with store.transaction() as conn:  # a new store version: the loop leaves core.run and enters it again
        store.bump(conn)
    wait_for(lambda: trainer.state().error is not None)
    trainer.core.run = real_run  # type: ignore[method-assign]
    step = trainer.state().step
    trainer.stop()
    assert checkpoint.saved_step(checkpoint.latest(tmp_path / "checkpoints")) == step >= 3


def test_a_read_only_load_skips_non_finite_checkpoints_without_moving_them(tmp_path: Path) -> None:
    """What a data-parallel replica does beside rank 0 (which repairs): the newest finite one, nothing moved."""
    root = tmp_path / "checkpoints"
    core = core_at(0)
    for step in (1, 2):
        core.step = step
        checkpoint.save(root, core, {}, keep=2, durable=False)
    _poison_latest(root)
    saved = checkpoint.load(root, CPU, repair=False)
    assert saved is not None and int(saved.state["step"]) == 1
    assert [c.step for c in checkpoint.list_checkpoints(root)] == [2, 1] and not checkpoint.discarded(root).exists()


def test_weights_that_went_non_finite_are_replaced_by_the_newest_finite_checkpoint(tmp_path: Path) -> None:
    """The guard keeps NaN out of every update; should the weights go non-finite anyway, the trainer never saves
    them and puts the newest finite checkpoint back in place (same core: the split engine keeps its reference)."""
    store = ReleaseStore(tmp_path, store_tables())
    add(store, "alice", 10)
    trainer = Trainer(tiny_settings(tmp_path, max_steps=2), store, "fp", device=CPU, poll_interval=0.02)
    trainer.start()
    assert trainer.wait_done(60)
    trainer.stop()
    good = [p.detach().clone() for p in trainer.model.parameters()]
    core = trainer.core
    core.step = 3
    with torch.no_grad():
        next(core.model.parameters()).fill_(float("nan"))
    assert trainer.save_checkpoint() is None
    assert trainer.core is core and core.step == 2 and core.finite()
    assert all(torch.equal(a, b) for a, b in zip(good, core.model.parameters()))
    assert checkpoint.saved_step(checkpoint.latest(tmp_path / "checkpoints")) == 2
