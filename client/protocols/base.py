"""What a protocol is on the client: what it sends the server, and with which guard (the ledger).

A protocol (docs/design.md: §2 ambient, §3-§4 split) is one class here plus one module beside this one; the
registry in ``__init__`` maps the CLI's ``--protocol`` name and the wire's Protocol enum to it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Self

import torch

from collafuse.client.connection import ServerConnection
from collafuse.client.ledger import Ledger
from collafuse.common.config import ClientSettings
from collafuse.common.schedule import ScheduleConfig
from collafuse.v1 import collafuse_pb2


@dataclass
class ContributionReport:
    """What one contribution sent (any protocol), as the client's metrics record it under "contribution"."""

    images: int = 0  # images the client holds
    sent: int = 0  # images sent (with split, counted once per step they rode in)
    calls: int = 0
    payload_bytes: int = 0
    cut: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class ClientProtocol(ABC):
    """One protocol's client side. ``wire`` is its value of the proto's ``Protocol`` enum."""

    name: ClassVar[str]
    wire: ClassVar[collafuse_pb2.Protocol]

    @classmethod
    def from_settings(cls, settings: ClientSettings | None) -> Self:
        """The protocol configured by the client's settings (None: its defaults)."""
        return cls()

    @abstractmethod
    def contribute(
        self,
        connection: ServerConnection,
        ledger: Ledger,
        *,
        client_id: str,
        images: torch.Tensor,
        labels: Sequence[int],
        paths: Sequence[str] | None,
        cut: int,
        schedule: ScheduleConfig,
        server: str,
        resend: bool = False,
        re_release: bool = False,
        pixels: torch.Tensor | None = None,
    ) -> ContributionReport:
        """Send what this protocol sends for the server's training, each send recorded in the ledger before it goes.

        ``images`` are the pixels as they would leave (the ledger keys them by those pixels, never by ``paths``,
        which only name images in messages); ``re_release`` is the user's --re-release-confirm. With --autoencoder
        ``images`` are the latents that leave and ``pixels`` the images they encode: images are keyed, and copies
        found, by their pixels (latents of near-duplicates are not near-duplicate pictures)."""
