"""The server's protocols, one module each, and the registry that maps the wire's Protocol enum to them.

Adding a protocol is a module here and one registry entry (ambient: docs/design.md §2; split: §3-§4).
"""

from __future__ import annotations

from collafuse.common.config import ServerSettings
from collafuse.server.protocols.ambient import AmbientProtocol
from collafuse.server.protocols.base import ServerProtocol, TrainingSource
from collafuse.server.protocols.split import SplitProtocol
from collafuse.server.store import ReleaseStore, TableSpec
from collafuse.v1 import collafuse_pb2

REGISTRY: dict[int, type[ServerProtocol]] = {p.wire: p for p in (AmbientProtocol, SplitProtocol)}
# The protocol whose data the server's trainer learns from.
TRAINING = collafuse_pb2.PROTOCOL_AMBIENT

__all__ = ["REGISTRY", "TRAINING", "ServerProtocol", "TrainingSource", "build_protocols", "store_tables"]


def store_tables() -> list[TableSpec]:
    """The tables every registered protocol keeps in the store."""
    return [p.table for p in REGISTRY.values() if p.table is not None]


def build_protocols(settings: ServerSettings, store: ReleaseStore, data_parallel: int = 1) -> dict[int, ServerProtocol]:
    """One instance of each registered protocol, keyed by its wire value. Under data-parallel training
    (``data_parallel`` > 1 ranks) only the protocols whose steps every rank can take are served."""
    return {wire: cls(settings, store) for wire, cls in REGISTRY.items()
            if data_parallel == 1 or cls.data_parallel}
