"""What a protocol is on the server: how it takes a client's payload, and what the trainer learns from.

A protocol (DESIGN 1a ambient, 1b split) is one class here plus one module beside this one. The
servicer asks the registry for the client's protocol and hands the payload to it; the trainer asks it
for a ``TrainingSource`` (a batch source and a loss for ``common.train_loop.TrainCore``). The store
holds a protocol's rows in the tables its ``table`` declares. Nothing else names a protocol.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

import grpc
import torch

from collafuse.common.config import ServerSettings
from collafuse.common.diffusion import Denoiser
from collafuse.server.errors import RequestRefused
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
        """The server's loss on ``batch`` (EDM's ``loss(net, images, labels)`` shape)."""

    def describe(self) -> str:
        return f"{len(self)} releases from {len(self.client_ids)} clients"


class ServerProtocol(ABC):
    """One protocol's server side. ``wire`` is its value of the proto's ``Protocol`` enum."""

    name: ClassVar[str]
    wire: ClassVar[collafuse_pb2.Protocol]
    table: ClassVar[TableSpec | None] = None

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

    def commit_release(self, client: ClientRecord, items: Sequence[object]) -> ReleaseOutcome:
        """Store every item of a validated stream in one transaction, or none (RequestRefused)."""
        raise RequestRefused(grpc.StatusCode.FAILED_PRECONDITION, f"protocol {self.name!r} stores no releases")

    # ---- training -----------------------------------------------------------------------------
    def training_source(self, device: torch.device, null_label: int) -> TrainingSource[Any] | None:
        """What the server's trainer learns from for this protocol (None: it trains nothing offline)."""
        return None
