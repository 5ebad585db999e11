"""Read the server's transcript (``server/transcript.py``: one JSON line per request message it read).

Each line is ``{seq, time, method, direction, request_type, peer, payload_b64}``; the payload is the
serialised request (``direction`` "request", or absent in older transcripts) or, for ``SplitForward``
only, the server's serialised reply (``direction`` "reply": the eps_hat the server sent, which the split
gradient inversion needs). Messages are parsed by their full type name from the protobuf pool (CollaFuse's and gRPC
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

# The image-derived tensors each protocol sends (docs/design.md §7): ambient Release's items[].x_cut; split's
# x_t and dL/d(eps_hat); and the server's own SplitForward reply eps_hat (recorded beside the requests).
RELEASE_FIELD = "items.x_cut"
COVERED_TENSORS = {
    ("Release", "request", RELEASE_FIELD),
    ("SplitForward", "request", "x_t"),
    ("SplitBackward", "request", "grad"),
    ("SplitForward", "reply", "eps_hat"),
}


class TranscriptError(ValueError):
    """The transcript file is missing or malformed."""


@dataclass
class TranscriptEntry:
    seq: int
    time: float
    method: str  # the RPC's short name, e.g. "Release"
    request_type: str  # the recorded message's full type name (a reply's too)
    peer: str
    payload: bytes
    message: Message | None  # None where the type is unknown (e.g. raw bytes of a denied call)
    direction: str = "request"  # or "reply" (the server's own SplitForward answers)


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
                str(raw.get("peer", "")), payload, None, str(raw.get("direction", "request")),
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
        if entry.direction != "request" or not isinstance(entry.message, collafuse_pb2.ReleaseChunk):
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
    """Tensors no audit rule covers (``COVERED_TENSORS``), and lines the audit could not parse."""
    out: list[dict[str, object]] = []
    for entry in entries:
        if entry.message is None:
            out.append({"seq": entry.seq, "method": entry.method, "field": None,
                        "detail": f"unparsed payload of type {entry.request_type!r} ({len(entry.payload)} bytes)"})
            continue
        for name, _ in tensors_of(entry.message):
            if (entry.method, entry.direction, name) not in COVERED_TENSORS:
                out.append({"seq": entry.seq, "method": entry.method, "field": name,
                            "detail": "a tensor no audit rule covers"})
    return out


@dataclass
class SplitPayload:
    """One split step as the server saw it: the client's x_t, t, labels and gradient, and its own eps_hat."""

    forward_seq: int
    backward_seq: int
    client_id: str
    step_id: str
    x_t: torch.Tensor  # (N, C, H, W)
    t: torch.Tensor  # (N,) 1-based
    labels: torch.Tensor  # (N,) as the client sent them (before the server's label drop-out)
    eps_hat: torch.Tensor  # (N, C, H, W): the server's reply
    grad: torch.Tensor  # (N, C, H, W): dL/d(eps_hat) as received
    wire_bytes: bytes  # the forward and backward requests, serialised


def split_payloads(entries: list[TranscriptEntry]) -> tuple[list[SplitPayload], dict[str, int]]:
    """Complete split steps (forward request, the server's reply, backward request), and counts of the rest.

    A reply is paired with the oldest unanswered forward of the same peer (a client sends its next forward
    only after the reply: one channel per client process, calls in order); a backward with its reply by step
    id and client id. Forwards without a reply (refused) or backward (expired), and backwards of unknown
    steps, are counted, not audited.
    """
    waiting: dict[str, list[TranscriptEntry]] = {}
    by_step: dict[str, tuple[TranscriptEntry, TranscriptEntry]] = {}
    counts = {"forwards": 0, "unanswered_forwards": 0, "forwards_without_backward": 0, "orphan_backwards": 0,
              "undecodable": 0}
    out: list[SplitPayload] = []
    for entry in entries:
        message = entry.message
        if isinstance(message, collafuse_pb2.SplitForwardRequest) and entry.direction == "request":
            counts["forwards"] += 1
            waiting.setdefault(entry.peer, []).append(entry)
        elif isinstance(message, collafuse_pb2.SplitForwardReply) and entry.direction == "reply":
            queue = waiting.get(entry.peer)
            if queue:
                by_step[message.step_id] = (queue.pop(0), entry)
        elif isinstance(message, collafuse_pb2.SplitBackwardRequest) and entry.direction == "request":
            pair = by_step.pop(message.step_id, None)
            if pair is None or not isinstance(pair[0].message, collafuse_pb2.SplitForwardRequest):
                counts["orphan_backwards"] += 1
                continue
            forward, reply = pair
            request = pair[0].message
            if request.client_id != message.client_id:
                counts["orphan_backwards"] += 1
                continue
            assert isinstance(reply.message, collafuse_pb2.SplitForwardReply)
            try:
                x_t = decode(request.x_t, what="x_t", finite=False)
                eps_hat = decode(reply.message.eps_hat, what="eps_hat", finite=False, shape=tuple(x_t.shape))
                grad = decode(message.grad, what="grad", finite=False, shape=tuple(x_t.shape))
            except TensorError as exc:
                log.warning("transcript seq %d: undecodable split step (%s)", entry.seq, exc)
                counts["undecodable"] += 1
                continue
            out.append(SplitPayload(
                forward.seq, entry.seq, request.client_id, message.step_id, x_t,
                torch.tensor(list(request.t), dtype=torch.long), torch.tensor(list(request.labels), dtype=torch.long),
                eps_hat, grad, forward.payload + entry.payload,
            ))
    counts["unanswered_forwards"] = sum(len(q) for q in waiting.values())
    counts["forwards_without_backward"] = len(by_step)
    return out, counts
