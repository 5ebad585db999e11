"""The client's protocols, one module each, and the registry from the ``--protocol`` name to them."""

from __future__ import annotations

from collafuse.client.protocols.ambient import AmbientClient
from collafuse.client.protocols.base import ClientProtocol, ContributionReport
from collafuse.client.protocols.split import SplitClient
from collafuse.common.config import ClientSettings
from collafuse.common.enums import protocol_names

REGISTRY: dict[str, type[ClientProtocol]] = {p.name: p for p in (AmbientClient, SplitClient)}

__all__ = ["REGISTRY", "ClientProtocol", "ContributionReport", "client_protocol"]


def client_protocol(name: str, settings: ClientSettings | None = None) -> ClientProtocol:
    """The protocol for a ``--protocol`` name, configured by ``settings``; a ValueError listing the choices otherwise."""
    cls = REGISTRY.get(name)
    if cls is None:
        known = sorted(REGISTRY)
        wire_only = sorted(set(protocol_names()) - set(REGISTRY))
        extra = f" (the wire also names {wire_only}, which this client does not implement)" if wire_only else ""
        raise ValueError(f"unknown protocol {name!r}: use one of {known}{extra}")
    return cls.from_settings(settings)
