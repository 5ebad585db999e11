"""Release uploads through the client's protocol registry (``client/protocols/``; ambient is docs/design.md §2).

Kept as the entry point the lifecycle and tools call.
"""

from __future__ import annotations

from typing import Any

from collafuse.client.connection import ServerConnection
from collafuse.client.ledger import Ledger
from collafuse.client.protocols import client_protocol
from collafuse.client.protocols.ambient import CHUNK_LIMIT, ITEMS_PER_CALL, build_chunks
from collafuse.client.protocols.base import ReleaseReport
from collafuse.common.config import ClientSettings

__all__ = ["CHUNK_LIMIT", "ITEMS_PER_CALL", "ReleaseReport", "build_chunks", "release_images"]


def release_images(
    connection: ServerConnection, ledger: Ledger, *, protocol: str, settings: ClientSettings | None = None, **fields: Any
) -> ReleaseReport:
    """``ClientProtocol.contribute`` of the ``--protocol`` named ``protocol`` (configured by ``settings``)."""
    return client_protocol(protocol, settings).contribute(connection, ledger, **fields)
