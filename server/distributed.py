"""Data-parallel training of the server denoiser over several processes: ``torchrun --nproc-per-node N``.

Rank 0 is the server as with one process: gRPC, the release store, checkpoints, sampling and the trainer
thread. Ranks 1..N-1 hold a replica of the model and follow rank 0's trainer: before each action rank 0
broadcasts a command (``Op``): ROWS (new release rows, or all of them again after a forget), STEP (one
training step), IDLE (a heartbeat while it waits for data) or STOP.

The releases are sharded: row ``p`` of the table (rowid order) lives on rank ``p % N`` only
(``protocols/ambient.py::Partition``). With ROWS rank 0 broadcasts the new rows' labels and cuts (16 bytes
a row) and sends each rank just its part's x_cut (48 KiB a 64x64x3 row), keeping its own part. Every rank
draws the same global minibatch from the same generator (``batch_size / N`` rows from each part, with every
random draw of the loss) and trains on its own part's group; DistributedDataParallel averages the gradients,
so after each step every rank holds the model one process has after the same step on the whole minibatch.

NCCL on GPUs (rank r uses ``cuda:LOCAL_RANK``), gloo on the CPU.
"""

from __future__ import annotations

import datetime as dt
import enum
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from collafuse.common import checkpoint
from collafuse.common.config import ServerSettings, TrainOptions
from collafuse.common.models import build_unet, null_label
from collafuse.common.runtime import resolve_device
from collafuse.common.train_loop import TrainCore, seeded
from collafuse.server.errors import StartupError
from collafuse.server.protocols.ambient import AmbientSource, Partition, ReleaseRows, ambient_source
from collafuse.server.protocols.base import TrainingSource
from collafuse.server.trainer import CHECKPOINTS, Trainer, update_guard

log = logging.getLogger(__name__)

# Waiting for the first releases may take long; rank 0 sends IDLE every poll, so this only bounds a hang.
TIMEOUT = dt.timedelta(minutes=30)
# [op, full, n, last_rowid, version, forget_epoch, C, H, W]
HEADER = 9


class Op(enum.IntEnum):
    READY = 1  # rank 0 has loaded its checkpoint (arg: its step); the others may load theirs
    ROWS = 2
    STEP = 3
    IDLE = 4
    STOP = 5


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


class Channel:
    """Rank 0's commands and release rows, broadcast to the other ranks; the loss mean over ranks."""

    def __init__(self, world: World, device: torch.device) -> None:
        self.world = world
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

    def send_rows(self, rows: ReleaseRows, full: bool, start: int) -> None:
        """Rows ``start .. start + len(rows)`` of the table: labels and cuts to all, x_cut to its part's rank."""
        n = len(rows)
        shape = list(rows.x_cut.shape[1:]) if n else [0, 0, 0]
        self.send(Op.ROWS, int(full), n, rows.last_rowid, rows.version, rows.forget_epoch, *shape)
        if not n:
            return
        for tensor in (rows.labels, rows.cuts):
            dist.broadcast(tensor.to(self.device).contiguous(), src=0)
        parts = Partition(self.world.size)
        for rank in range(1, self.world.size):
            mine = parts.positions(start, n, rank)
            if len(mine):
                dist.send(rows.x_cut[mine].to(self.device).contiguous(), dst=rank)

    def receive_rows(self, args: list[int], start: int) -> tuple[ReleaseRows, bool]:
        """This rank's share of what ``send_rows`` sent; ``start``: the rows it held before (0 after a full)."""
        full, n, last_rowid, version, epoch, *shape = args
        start = 0 if full else start
        labels = torch.empty((n,), dtype=torch.long, device=self.device)
        cuts = torch.empty((n,), dtype=torch.long, device=self.device)
        held = len(Partition(self.world.size).positions(start, n, self.world.rank))
        x_cut = torch.empty((held, *shape) if n else (0,), device=self.device)
        if n:
            for tensor in (labels, cuts):
                dist.broadcast(tensor, src=0)
            if held:
                dist.recv(x_cut, src=0)
        # client ids stay on rank 0: only its trainer decides when to start (min_clients).
        rows = ReleaseRows(x_cut.cpu(), labels.cpu(), cuts.cpu(), [], last_rowid, version, epoch)
        return rows, bool(full)

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


class LeaderSource(TrainingSource[Any]):
    """Rank 0's training source: the protocol's (holding part 0 of the rows), telling the other ranks what it does."""

    def __init__(self, inner: AmbientSource, world: World, channel: Channel) -> None:
        if inner.partition != Partition(world.size, world.rank):
            raise DistributedError(f"rank 0's source holds {inner.partition}, not part 0 of {world.size}")
        self.inner = inner
        self.world = world
        self.channel = channel
        self._sent_rows = False
        inner.on_rows = self._rows

    def _rows(self, rows: ReleaseRows, full: bool) -> None:
        self.channel.send_rows(rows, full, 0 if full else len(self.inner))
        self._sent_rows = True

    def refresh(self) -> bool:
        self._sent_rows = False
        changed = self.inner.refresh()
        if not self._sent_rows:
            self.channel.send(Op.IDLE)  # the others wait in a collective: keep it short of TIMEOUT
        return changed

    def __len__(self) -> int:
        # Every part needs a row before a minibatch can be drawn: until then the trainer waits as for no rows.
        return len(self.inner) if len(self.inner) >= self.world.size else 0

    @property
    def client_ids(self) -> list[str]:
        return self.inner.client_ids

    def batch(self, generator: torch.Generator) -> Any:
        self.channel.send(Op.STEP)
        return self.inner.batch(generator)

    def loss(self, net: Any, batch: Any, generator: torch.Generator) -> torch.Tensor:
        return self.inner.loss(net, batch, generator)

    def describe(self) -> str:
        return f"{self.inner.describe()}, minibatch split over {self.world.size} ranks"


def lead(trainer: Trainer, world: World) -> None:
    """Make rank 0's (not yet started) trainer drive the other ranks; call before ``trainer.start()``."""
    if not isinstance(trainer.source, AmbientSource):
        raise StartupError("data-parallel training needs the ambient protocol's training source")
    if len(trainer.source):
        raise DistributedError("lead() must run before rank 0's trainer takes in any release rows")
    trainer.source.partition = Partition(world.size, world.rank)
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


def follow(settings: ServerSettings, world: World, device: torch.device) -> tuple[TrainCore, AmbientSource]:
    """A rank > 0: replicate rank 0's model, take its part of the rows and train in lockstep until rank 0 says
    STOP; returns the trained core and the rows it held."""
    settings = settings.for_dataset()
    channel = Channel(world, device)
    op, args = channel.receive()
    if op != Op.READY:
        raise DistributedError(f"rank {world.rank}: expected READY from rank 0, got {op.name}")
    core = build_core(settings, device)
    replicate(core, world, channel)
    channel.agree(core)
    source = ambient_source(settings, None, device, null_label(core.model), Partition(world.size, world.rank))
    log.info("rank %d follows rank 0 from step %d", world.rank, core.step)
    while True:
        op, args = channel.receive()
        if op == Op.STEP:
            core.train_step(source.batch, source.loss)
        elif op == Op.ROWS:
            source.take(*channel.receive_rows(args, len(source)))
        elif op == Op.STOP:
            log.info("rank %d: rank 0 stopped training at step %d (it held %d of %d releases)",
                     world.rank, core.step, source.x_cut.shape[0], len(source))
            return core, source
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
