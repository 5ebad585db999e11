"""Data-parallel training of the server denoiser over several processes: ``torchrun --nproc-per-node N``.

A wrapper around any protocol's ``TrainingSource``: nothing here knows what a batch holds.

Rank 0 is the server as with one process: gRPC, the store, the training source with every row, checkpoints,
sampling and the trainer thread. Ranks 1..N-1 hold a replica of the model and no data. Before each action
rank 0 broadcasts a command (``Op``): STEP (one training step), IDLE (a heartbeat while it waits for data)
or STOP. For a STEP rank 0 draws the global minibatch exactly as one process would (same generator, same
draws), cuts it into N equal shards of rows (``shard_rows``) and scatters them; each rank computes the
protocol's loss on its shard and DistributedDataParallel averages the gradients. After each step every rank
holds the model one process has after the same step on the whole minibatch (up to the order of float sums).

What a source must give for this: a batch that is a dataclass whose tensors all have one row per example
(other fields are copied to every shard), a loss that is the mean over rows and draws nothing from the
generator (the random draws of the loss live in the batch), and a ``replica_source`` on its protocol that
computes that loss without holding data. Rank 0 holds every row as one process does; each step moves
``batch_size`` rows once (48 KiB a 64x64x3 row).

NCCL on GPUs (rank r uses ``cuda:LOCAL_RANK``), gloo on the CPU.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import logging
import os
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from collafuse.common import checkpoint
from collafuse.common.config import ServerSettings, TrainOptions
from collafuse.common.models import build_unet, null_label
from collafuse.common.runtime import resolve_device
from collafuse.common.train_loop import TrainCore, seeded
from collafuse.server.errors import StartupError
from collafuse.server.latent import served_setup
from collafuse.server.protocols import REGISTRY, TRAINING
from collafuse.server.protocols.base import TrainingSource
from collafuse.server.trainer import CHECKPOINTS, Trainer, update_guard

log = logging.getLogger(__name__)

# Waiting for the first releases may take long; rank 0 sends IDLE every poll, so this only bounds a hang.
TIMEOUT = dt.timedelta(minutes=30)
# [op, arg]
HEADER = 2
B = TypeVar("B")


class Op(enum.IntEnum):
    READY = 1  # rank 0 has loaded its checkpoint (arg: its step); the others may load theirs
    STEP = 2  # followed by the scatter of the minibatch's shards
    IDLE = 3
    STOP = 4


class DistributedError(RuntimeError):
    """The ranks disagree (a replica resumed from another checkpoint, a batch that does not split)."""


@dataclass(frozen=True)
class World:
    """This process's place in a torchrun job (RANK, WORLD_SIZE, LOCAL_RANK; one process: 0, 1, 0)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> World:
        return cls(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                   int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def distributed(self) -> bool:
        return self.size > 1


def start(world: World, settings: ServerSettings) -> torch.device:
    """Join the process group (MASTER_ADDR/MASTER_PORT from torchrun); returns this rank's device."""
    if settings.batch_size % world.size:
        raise StartupError(
            f"--batch-size {settings.batch_size} does not split over {world.size} ranks: use a multiple of "
            f"{world.size} (it is the global minibatch; each rank trains on batch_size / ranks rows)"
        )
    try:
        device = resolve_device(settings.device)
    except RuntimeError as exc:
        raise StartupError(str(exc)) from exc
    if device.type == "cuda":
        if world.local_rank >= torch.cuda.device_count():
            raise StartupError(f"LOCAL_RANK {world.local_rank} but torch sees {torch.cuda.device_count()} GPUs: "
                               "start at most one process per GPU (torchrun --nproc-per-node)")
        torch.cuda.set_device(world.local_rank)  # so that build_server's "cuda" is this rank's GPU
        device = torch.device("cuda", world.local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=world.rank,
                                world_size=world.size, timeout=TIMEOUT)
    log.info("data-parallel rank %d of %d on %s (%s)", world.rank, world.size, device, dist.get_backend())
    return device


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def shard_rows(batch: B, part: int, parts: int) -> B:
    """Rows ``part * n / parts ..`` of a batch dataclass: every tensor field is cut along dim 0 (all must have
    the batch's n rows), every other field is copied. The mean of the shards' mean losses is the batch's."""
    if not dataclasses.is_dataclass(batch) or isinstance(batch, type):
        raise DistributedError(f"a {type(batch).__name__} batch cannot be split over data-parallel ranks: "
                               "the training source must return a dataclass of per-row tensors")
    tensors = {f.name: v for f in dataclasses.fields(batch) if isinstance(v := getattr(batch, f.name), torch.Tensor)}
    rows = {v.shape[0] if v.dim() else 0 for v in tensors.values()}
    if len(rows) != 1 or (n := rows.pop()) % parts:
        raise DistributedError(f"{type(batch).__name__}: fields {sorted(tensors)} have rows "
                               f"{[v.shape[:1] for v in tensors.values()]}; each must hold the batch's rows, "
                               f"a multiple of the {parts} ranks")
    size = n // parts
    cut = {name: v[part * size:(part + 1) * size] for name, v in tensors.items()}
    return dataclasses.replace(batch, **cut)  # type: ignore[type-var]


@dataclass(frozen=True)
class _TensorSlot:
    """Where a shard's tensor goes: its shape and dtype, and whether it lives on the training device."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    on_device: bool


class Channel:
    """Rank 0's commands and minibatch shards, broadcast or scattered to the other ranks; the loss mean."""

    def __init__(self, world: World, device: torch.device) -> None:
        self.world = world
        self.training_device = device
        # NCCL moves only CUDA tensors; gloo only CPU ones.
        self.device = device if device.type == "cuda" else torch.device("cpu")

    def _header(self, values: list[int] | None = None) -> list[int]:
        header = torch.zeros(HEADER, dtype=torch.long, device=self.device)
        if values is not None:
            header[: len(values)] = torch.tensor(values, dtype=torch.long)
        dist.broadcast(header, src=0)
        return [int(v) for v in header.tolist()]

    def send(self, op: Op, *args: int) -> None:
        self._header([int(op), *args])

    def receive(self) -> tuple[Op, list[int]]:
        header = self._header()
        return Op(header[0]), header[1:]

    def scatter_batch(self, batch: B) -> B:
        """Rank 0: send each rank its shard of ``batch`` (after ``send(Op.STEP)``); returns rank 0's own."""
        shards = [shard_rows(batch, rank, self.world.size) for rank in range(self.world.size)]
        mine = shards[0]
        # The layout (field names, shapes, dtypes, non-tensor fields) once, then each tensor field scattered.
        layout = dataclasses.replace(mine, **{name: _TensorSlot(tuple(v.shape), v.dtype, v.device.type != "cpu")  # type: ignore[type-var]
                                            for name, v in _tensor_fields(mine).items()})
        dist.broadcast_object_list([layout], src=0, device=self.device)
        for name in _tensor_fields(mine):
            parts = [getattr(shard, name).to(self.device).contiguous() for shard in shards]
            received = torch.empty_like(parts[0])
            dist.scatter(received, parts, src=0)
        return mine

    def receive_batch(self) -> Any:
        """A rank > 0: its shard of the minibatch rank 0 scatters (after ``Op.STEP``)."""
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, device=self.device)
        layout = box[0]
        values = {}
        for f in dataclasses.fields(layout):
            slot = getattr(layout, f.name)
            if isinstance(slot, _TensorSlot):
                received = torch.empty(slot.shape, dtype=slot.dtype, device=self.device)
                dist.scatter(received, None, src=0)
                values[f.name] = received.to(self.training_device if slot.on_device else torch.device("cpu"))
        return dataclasses.replace(layout, **values)

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        total = value.detach().float().to(self.device)
        dist.all_reduce(total)
        return total / self.world.size

    def agree(self, core: TrainCore) -> None:
        """Every rank must continue the same run: same step, generator, EMA and optimizer state as rank 0."""
        mine = torch.tensor(weights_checksum(core), dtype=torch.float64, device=self.device)
        theirs = mine.clone()
        dist.broadcast(theirs, src=0)
        differs = torch.tensor([0.0 if torch.equal(mine, theirs) else 1.0], device=self.device)
        dist.all_reduce(differs)
        if differs.item():
            raise DistributedError(
                f"rank {self.world.rank}: {int(differs.item())} rank(s) resumed another training state than rank 0 "
                f"(step {int(mine[0])} here, {int(theirs[0])} on rank 0): every rank reads "
                "<store>/checkpoints; run all ranks on one host with the same --store (or a shared file system)"
            )


def _tensor_fields(batch: Any) -> dict[str, torch.Tensor]:
    return {f.name: v for f in dataclasses.fields(batch) if isinstance(v := getattr(batch, f.name), torch.Tensor)}


@torch.no_grad()
def weights_checksum(core: TrainCore) -> list[float]:
    """A few numbers that differ when two cores are not in the same training state."""
    optimizer_sum = sum(float(v.double().sum()) for s in core.optimizer.state.values()
                        for v in s.values() if isinstance(v, torch.Tensor))
    return [
        float(core.step),
        float(core.generator.get_state().double().sum()),
        sum(float(p.double().sum()) for p in core.model.parameters()),
        sum(float(p.double().sum()) for p in core.ema.model.parameters()),
        optimizer_sum,
    ]


def replicate(core: TrainCore, world: World, channel: Channel) -> None:
    """Wrap ``core``'s model in DDP (a collective: every rank calls this at the same point)."""
    device_ids = [core.device.index] if core.device.type == "cuda" else None
    core.replicate(lambda model: DistributedDataParallel(model, device_ids=device_ids), channel.mean)


class LeaderSource(TrainingSource[B]):
    """Rank 0's training source: the protocol's, with each minibatch scattered over the ranks."""

    def __init__(self, inner: TrainingSource[B], world: World, channel: Channel) -> None:
        self.inner = inner
        self.world = world
        self.channel = channel

    def refresh(self) -> bool:
        changed = self.inner.refresh()
        self.channel.send(Op.IDLE)  # the others wait in a collective: keep it short of TIMEOUT
        return changed

    def __len__(self) -> int:
        return len(self.inner)

    @property
    def client_ids(self) -> list[str]:
        return self.inner.client_ids

    def batch(self, generator: torch.Generator) -> B:
        batch = self.inner.batch(generator)  # drawn as one process draws it
        self.channel.send(Op.STEP)
        return self.channel.scatter_batch(batch)

    def loss(self, net: Any, batch: B, generator: torch.Generator) -> torch.Tensor:
        return self.inner.loss(net, batch, generator)

    def describe(self) -> str:
        return f"{self.inner.describe()}, minibatch split over {self.world.size} ranks"


def lead(trainer: Trainer, world: World) -> None:
    """Make rank 0's (not yet started) trainer drive the other ranks; call before ``trainer.start()``."""
    channel = Channel(world, trainer.device)
    channel.send(Op.READY, trainer.core.step)
    replicate(trainer.core, world, channel)
    channel.agree(trainer.core)
    trainer.source = LeaderSource(trainer.source, world, channel)

    def release_followers() -> None:
        try:
            channel.send(Op.STOP)
        except Exception:  # a follower that died already: torchrun reports it
            log.exception("could not tell the other ranks to stop")

    trainer.on_exit = release_followers
    log.info("rank 0 leads %d data-parallel ranks (global minibatch %d, %d per rank)",
             world.size, trainer.settings.batch_size, trainer.settings.batch_size // world.size)


def follow(settings: ServerSettings, world: World, device: torch.device) -> TrainCore:
    """A rank > 0: replicate rank 0's model and train on the shards it sends, in lockstep, until rank 0 says
    STOP; returns the trained core."""
    settings = served_setup(settings.for_dataset()).settings  # with --autoencoder: the latent's spec
    channel = Channel(world, device)
    op, _ = channel.receive()
    if op != Op.READY:
        raise DistributedError(f"rank {world.rank}: expected READY from rank 0, got {op.name}")
    core = build_core(settings, device)
    replicate(core, world, channel)
    channel.agree(core)
    source = REGISTRY[TRAINING].replica_source(settings, device, null_label(core.model))
    log.info("rank %d follows rank 0 from step %d", world.rank, core.step)
    while True:
        op, _ = channel.receive()
        if op == Op.STEP:
            core.train_step(lambda _generator: channel.receive_batch(), source.loss)
        elif op == Op.STOP:
            log.info("rank %d: rank 0 stopped training at step %d", world.rank, core.step)
            return core
        elif op != Op.IDLE:
            raise DistributedError(f"rank {world.rank}: unexpected command {op.name} from rank 0")


def build_core(settings: ServerSettings, device: torch.device) -> TrainCore:
    """The core rank 0's trainer has: resumed from ``<store>/checkpoints`` (read only), else seeded fresh."""
    options = TrainOptions.from_settings(settings)
    guard = update_guard(settings)  # rank 0's guard: the replicas must skip and clip exactly the same steps
    # Read only: moving a bad checkpoint aside is rank 0's to do.
    saved = checkpoint.load(settings.store / CHECKPOINTS, device, repair=False)
    if saved is not None:
        return checkpoint.resume_core(saved, options, device, guard=guard)
    shape = settings.image_shape
    return TrainCore(seeded(settings.seed, lambda: build_unet(settings.model_preset, shape, len(settings.classes))),
                     options, device, guard=guard)
