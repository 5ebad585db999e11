"""The training core: non-finite losses are skipped, counted and stop training; the client's checkpoints
resume bit-identically through the same core; the server's Status shows why its trainer stopped."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import torch
from server_support import tiny_settings

from collafuse.client.trainer import model_dir, train_local
from collafuse.common import checkpoint
from collafuse.common.config import ClientSettings, TrainOptions
from collafuse.common.diffusion import Denoiser
from collafuse.common.models import build_unet, load_model
from collafuse.common.schedule import ScheduleConfig
from collafuse.common.train_loop import NonFiniteLoss, TrainCore
from collafuse.server.protocols import store_tables
from collafuse.server.protocols.ambient import AmbientBatch, AmbientSource
from collafuse.server.store import ReleaseStore
from collafuse.server.trainer import Trainer
from collafuse.v1 import collafuse_pb2

torch.set_num_threads(1)
CPU = torch.device("cpu")
SHAPE = (1, 8, 8)


def batches(gen: torch.Generator) -> torch.Tensor:
    return torch.randn((4, *SHAPE), generator=gen)


def scripted_loss(values: list[float]):  # type: ignore[no-untyped-def]
    """A loss whose value follows ``values`` (NaN where scripted), with a real gradient where finite."""
    calls = iter(values)

    def loss(net: Denoiser, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        eps = net(x, torch.full((x.shape[0],), 5), torch.zeros(x.shape[0], dtype=torch.long))
        loss = eps.pow(2).mean()
        return loss * float("nan") if math.isnan(next(calls)) else loss

    return loss


def core(**options: object) -> TrainCore:
    model = build_unet("tiny", SHAPE, 3)
    return TrainCore(model, TrainOptions(lr=1e-3, **options), CPU)  # type: ignore[arg-type]


def test_a_non_finite_loss_is_skipped_counted_and_stops_training_after_k_in_a_row() -> None:
    nan = float("nan")
    trainer = core(max_nonfinite_steps=3)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.run(batches, scripted_loss([nan, nan, 1.0]), until=1)
    assert (trainer.step, trainer.skipped_steps, trainer.nonfinite_in_row) == (1, 2, 0), "a finite step resets the run"
    stepped = [p.detach().clone() for p in trainer.model.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(before, stepped))
    with pytest.raises(NonFiniteLoss, match="3 training steps in a row had a non-finite loss"):
        trainer.run(batches, scripted_loss([nan] * 5), until=5)
    assert (trainer.step, trainer.skipped_steps) == (1, 5)
    for a, b in zip(stepped, trainer.model.parameters()):
        assert torch.equal(a, b), "the optimizer never steps on a non-finite loss"
    assert [s for s, _ in trainer.losses] == [1]


class NanSource(AmbientSource):
    """An ambient source whose loss is always NaN (as with a schedule whose alpha_bar_1 rounds to 1)."""

    def loss(self, net: Denoiser, batch: AmbientBatch, generator: torch.Generator) -> torch.Tensor:
        return super().loss(net, batch, generator) * float("nan")


def test_the_server_trainer_stops_on_non_finite_losses_and_status_says_why(tmp_path: Path) -> None:
    from test_server_trainer import add

    from collafuse.server.protocols.ambient import ReleaseTable

    store = ReleaseStore(tmp_path, store_tables())
    add(store, "alice", 10)
    settings = tiny_settings(tmp_path, max_steps=50)
    source = NanSource(ReleaseTable(store), settings.schedule().alphas_cumprod(), batch_size=4, label_dropout=0.0,
                       null_label=3, device=CPU)
    trainer = Trainer(settings, store, "fp", device=CPU, poll_interval=0.02, source=source)
    trainer.start()
    deadline = time.monotonic() + 60
    while trainer.state().error is None:
        assert time.monotonic() < deadline, "the trainer kept stepping on NaN losses"
        time.sleep(0.02)
    trainer.stop()
    state = trainer.state()
    assert state.phase == collafuse_pb2.PHASE_IDLE and state.step == 0
    assert state.skipped_steps == TrainOptions().max_nonfinite_steps
    assert state.error is not None and "non-finite loss" in state.error and "beta_start" in state.error


def test_client_training_resumes_bit_identically(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    images, labels = torch.rand((12, *SHAPE), generator=gen) * 2 - 1, torch.arange(12) % 3
    schedule = ScheduleConfig(num_train_timesteps=50)

    def train(workdir: Path, steps: int) -> list[tuple[int, float]]:
        settings = ClientSettings(workdir=workdir, train_steps=steps, batch_size=4, seed=3, device="cpu")
        return train_local(images=images, labels=labels, num_classes=3, image_shape=SHAPE, schedule=schedule, cut=20,
                           fingerprint="fp", workdir=workdir, settings=settings, show_progress=False).losses

    straight = train(tmp_path / "straight", 4)
    train(tmp_path / "split", 2)
    resumed = train(tmp_path / "split", 4)
    assert resumed == straight
    a, meta = load_model(model_dir(tmp_path / "straight"))
    b, _ = load_model(model_dir(tmp_path / "split"))
    assert meta["step"] == 4 and meta["cut"] == 20
    for x, y in zip(a.parameters(), b.parameters()):
        assert torch.equal(x, y)
    raw_a, _ = load_model(checkpoint.latest(tmp_path / "straight" / "checkpoints") / "model")
    raw_b, _ = load_model(checkpoint.latest(tmp_path / "split" / "checkpoints") / "model")
    for x, y in zip(raw_a.parameters(), raw_b.parameters()):
        assert torch.equal(x, y)
