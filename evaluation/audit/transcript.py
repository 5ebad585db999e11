"""Read the server's transcript (``server/transcript.py``: one JSON line per request message it read).

Each line is ``{seq, time, method, request_type, peer, payload_b64}``; the payload is the serialised
request. Messages are parsed by their full type name from the protobuf pool (CollaFuse's and gRPC
health's types are registered on import). Every tensor anywhere in a message is found, so a tensor the
audit has no rule for (a future RPC, a field added by mistake) is reported instead of ignored.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2  # noqa: F401  (registers the health messages the transcript holds)

from collafuse.common.codec import TensorError, decode
from collafuse.v1 import collafuse_pb2, tensor_pb2

log = logging.getLogger(__name__)

# The only image-derived tensor the ambient protocol sends (DESIGN 2): Release's items[].x_cut.
RELEASE_FIELD = "items.x_cut"


class TranscriptError(ValueError):
    """The transcript file is missing or malformed."""


@dataclass
class TranscriptEntry:
    seq: int
    time: float
    method: str  # the RPC's short name, e.g. "Release"
    request_type: str
    peer: str
    payload: bytes
    message: Message | None  # None where the type is unknown (e.g. raw bytes of a denied call)


@dataclass
class ReleasePayload:
    """One x_cut a client released, as the server received it."""

    seq: int
    client_id: str
    cut: int
    image_key: str
    label: int
    x_cut: torch.Tensor  # (C, H, W)
    wire_bytes: bytes


def read_transcript(path: Path) -> list[TranscriptEntry]:
    if not Path(path).is_file():
        raise TranscriptError(
            f"no transcript at {path}: run the server with --transcript PATH (collafuse-sim --transcript) to record one"
        )
    entries: list[TranscriptEntry] = []
    pool = descriptor_pool.Default()
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
            payload = base64.b64decode(raw["payload_b64"], validate=True)
            request_type = str(raw["request_type"])
            entry = TranscriptEntry(
                int(raw["seq"]), float(raw["time"]), str(raw["method"]).rsplit("/", 1)[-1], request_type,
                str(raw.get("peer", "")), payload, None,
            )
        except (ValueError, KeyError, TypeError, binascii.Error) as exc:
            raise TranscriptError(f"{path}:{number}: not a transcript line ({exc})") from exc
        try:
            message = message_factory.GetMessageClass(pool.FindMessageTypeByName(request_type))()
            message.ParseFromString(payload)
            entry.message = message
        except (KeyError, DecodeError):
            log.debug("transcript line %d: cannot parse type %r", number, request_type)
        entries.append(entry)
    return entries


def tensors_of(message: Message, path: str = "") -> Iterator[tuple[str, tensor_pb2.Tensor]]:
    """Every Tensor in a message, with its field path (repeated fields share one name)."""
    for descriptor, value in message.ListFields():
        name = f"{path}.{descriptor.name}" if path else descriptor.name
        values = value if descriptor.is_repeated else [value]
        for v in values:
            if isinstance(v, tensor_pb2.Tensor):
                yield name, v
            elif isinstance(v, Message):
                yield from tensors_of(v, name)


def release_payloads(entries: list[TranscriptEntry]) -> list[ReleasePayload]:
    out: list[ReleasePayload] = []
    for entry in entries:
        if entry.method != "Release" or not isinstance(entry.message, collafuse_pb2.ReleaseChunk):
            continue
        chunk = entry.message
        for item in chunk.items:
            try:
                x_cut = decode(item.x_cut, what="x_cut", finite=False)
            except TensorError as exc:
                log.warning("transcript seq %d: undecodable x_cut of %s (%s)", entry.seq, item.image_key, exc)
                continue
            out.append(ReleasePayload(
                entry.seq, chunk.client_id, int(chunk.cut), item.image_key, int(item.label), x_cut, entry.payload
            ))
    return out


def unexpected_tensors(entries: list[TranscriptEntry]) -> list[dict[str, object]]:
    """Tensors outside Release.items.x_cut, and lines the audit could not parse."""
    out: list[dict[str, object]] = []
    for entry in entries:
        if entry.message is None:
            out.append({"seq": entry.seq, "method": entry.method, "field": None,
                        "detail": f"unparsed payload of type {entry.request_type!r} ({len(entry.payload)} bytes)"})
            continue
        for name, _ in tensors_of(entry.message):
            if not (entry.method == "Release" and name == RELEASE_FIELD):
                out.append({"seq": entry.seq, "method": entry.method, "field": name,
                            "detail": "a tensor no audit rule covers"})
    return out
