"""What a protocol is on the server: how it takes a client's payload, and what the trainer learns from.

A protocol (docs/design.md: §2 ambient, §3-§4 split) is one class here plus one module beside this one. The
servicer asks the registry for the client's protocol and hands the payload to it; the trainer asks it
for a ``TrainingSource`` (a batch source and a loss for ``common.train_loop.TrainCore``). The store
holds a protocol's rows in the tables its ``table`` declares. Nothing else names a protocol.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

import grpc
import torch
from prometheus_client.core import Metric

from collafuse.common.config import ServerSettings
from collafuse.common.diffusion import Denoiser
from collafuse.common.train_loop import StepResult, TrainCore
from collafuse.server.errors import RequestRefused, StartupError
from collafuse.server.store import ClientRecord, ReleaseStore, TableSpec
from collafuse.v1 import collafuse_pb2

B = TypeVar("B")

# (label, the classes the client registered) -> a problem to report, or None.
LabelCheck = Callable[[int, list[str] | None], str | None]


@dataclass(frozen=True)
class ReleaseOutcome:
    stored: int
    duplicates: int


class TrainingSource(ABC, Generic[B]):
    """The server's side of training for one protocol: what is there to learn from, batches, and the loss."""

    @abstractmethod
    def refresh(self) -> bool:
        """Take in what changed in the store since the last call; True when the training data changed."""

    @abstractmethod
    def __len__(self) -> int:
        """Training examples held (releases)."""

    @property
    @abstractmethod
    def client_ids(self) -> list[str]:
        """The clients whose data is in the training set, sorted."""

    @abstractmethod
    def batch(self, generator: torch.Generator) -> B:
        """One minibatch, every draw from ``generator``."""

    @abstractmethod
    def loss(self, net: Denoiser, batch: B, generator: torch.Generator) -> torch.Tensor:
        """The server's loss on ``batch`` (EDM's ``loss(net, images, labels)`` shape): the mean over its rows.
        For data-parallel training every random draw belongs in the batch, not in this call."""

    def describe(self) -> str:
        return f"{len(self)} releases from {len(self.client_ids)} clients"


class ServerProtocol(ABC):
    """One protocol's server side. ``wire`` is its value of the proto's ``Protocol`` enum."""

    name: ClassVar[str]
    wire: ClassVar[collafuse_pb2.Protocol]
    table: ClassVar[TableSpec | None] = None
    # Whether every rank of data-parallel training (server/distributed.py) can take this protocol's steps.
    data_parallel: ClassVar[bool] = True

    def __init__(self, settings: ServerSettings, store: ReleaseStore) -> None:
        self.settings = settings
        self.store = store

    # ---- the Release RPC ----------------------------------------------------------------------
    def validate_release(
        self, chunk: collafuse_pb2.ReleaseChunk, client: ClientRecord, where: str, label_error: LabelCheck
    ) -> list[object]:
        """Check one stream message; returns its items, ready for ``commit_release``. Raises RequestRefused."""
        raise RequestRefused(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"client {client.client_id!r} registered protocol {self.name!r}, which does not release images",
        )

    def commit_release(self, client: ClientRecord, items: Iterable[object]) -> ReleaseOutcome:
        """Store every item of a validated stream in one transaction, or none (RequestRefused). ``items`` is
        read once, in order (the stream's staging file)."""
        raise RequestRefused(grpc.StatusCode.FAILED_PRECONDITION, f"protocol {self.name!r} stores no releases")

    # ---- the split RPCs -------------------------------------------------------------------------
    def split_forward(
        self, request: collafuse_pb2.SplitForwardRequest, client: ClientRecord, label_error: LabelCheck
    ) -> collafuse_pb2.SplitForwardReply:
        """The first half of a split step (protocols that train by split learning answer it)."""
        raise self._not_split_learning(client)

    def split_backward(
        self, request: collafuse_pb2.SplitBackwardRequest, client: ClientRecord
    ) -> collafuse_pb2.SplitBackwardReply:
        """The second half of a split step."""
        raise self._not_split_learning(client)

    def _not_split_learning(self, client: ClientRecord) -> RequestRefused:
        return RequestRefused(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"client {client.client_id[:64]!r} registered protocol {self.name!r}: register with protocol split "
            "before sending split steps",
        )

    # ---- training -----------------------------------------------------------------------------
    def attach(self, core: TrainCore, max_steps: int, after_step: Callable[[StepResult], None]) -> None:
        """Called once by app.py with the trainer's core, for protocols that step it themselves (split)."""

    def forget_client(self, client_id: str) -> None:
        """Drop what this protocol keeps about a client in memory (Forget)."""

    def metrics(self) -> Iterator[Metric]:
        """This protocol's Prometheus metric families (server/observability.py)."""
        return iter(())

    def frozen(self) -> bool:
        """True while this protocol needs the server's weights to stay as they are (the trainer steps none).
        Called under the model lock: it must not block."""
        return False

    def training_source(self, device: torch.device, null_label: int) -> TrainingSource[Any] | None:
        """What the server's trainer learns from for this protocol (None: it trains nothing offline)."""
        return None

    @classmethod
    def replica_source(cls, settings: ServerSettings, device: torch.device, null_label: int) -> TrainingSource[Any]:
        """A data-parallel rank > 0's source (``server/distributed.py``): it holds no rows and computes
        ``training_source``'s loss on the shards of each minibatch that rank 0 sends."""
        raise StartupError(f"the {cls.name} protocol's training cannot be split over data-parallel ranks")
