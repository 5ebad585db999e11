"""The wire's Protocol and Phase enums and their short names ("ambient", "done") for flags, logs and files."""

from __future__ import annotations

from collafuse.v1 import collafuse_pb2

Protocol = collafuse_pb2.Protocol
Phase = collafuse_pb2.Phase


def _short(full: str, prefix: str) -> str:
    return full.removeprefix(prefix).lower()


def protocol_names() -> list[str]:
    """Every protocol the wire knows, by short name ("ambient", ...)."""
    return [_short(n, "PROTOCOL_") for n in Protocol.DESCRIPTOR.values_by_name if n != "PROTOCOL_UNSPECIFIED"]


def protocol_value(name: str) -> collafuse_pb2.Protocol:
    """``"ambient"`` -> ``PROTOCOL_AMBIENT``; a ValueError that lists the known names otherwise."""
    full = f"PROTOCOL_{name.strip().upper()}"
    if full == "PROTOCOL_UNSPECIFIED" or full not in Protocol.DESCRIPTOR.values_by_name:
        raise ValueError(f"unknown protocol {name!r}: use one of {protocol_names()}")
    return Protocol.Value(full)


def protocol_name(value: int) -> str:
    """``PROTOCOL_AMBIENT`` -> ``"ambient"`` (``"unspecified"`` / ``"unknown-<n>"`` for others)."""
    return _short(Protocol.Name(value), "PROTOCOL_") if value in Protocol.DESCRIPTOR.values_by_number else f"unknown-{value}"


def phase_name(value: int) -> str:
    """``PHASE_DONE`` -> ``"done"``."""
    return _short(Phase.Name(value), "PHASE_") if value in Phase.DESCRIPTOR.values_by_number else f"unknown-{value}"
