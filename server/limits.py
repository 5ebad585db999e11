"""Bounds on every string and list a request may carry, and on a request's size, in one place.

The server keeps client ids, image keys and class names (store, Status replies), so one caller
with a 7 MB id or a million class names would make every later Status too large to send.
``check_request`` walks any request message (every RPC, every stream message, nested messages
too) and returns a problem for the first field over its limit; ``RequestGuardInterceptor``
(common/rpc.py) calls it before a handler sees the message and answers INVALID_ARGUMENT.
Problems state sizes, never the oversized value itself: it would not fit in the status metadata.
"""

from __future__ import annotations

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from collafuse.common.codec import MAX_DIMS
from collafuse.common.rpc import CHUNK_BYTES

# Characters per string field, by field name (any message); other strings get DEFAULT_MAX_CHARS.
MAX_ID_CHARS = 128
MAX_KEY_CHARS = 256
MAX_CLASS_NAME_CHARS = 128
STRING_LIMITS: dict[str, int] = {
    "client_id": MAX_ID_CHARS,
    "image_key": MAX_KEY_CHARS,
    "class_names": MAX_CLASS_NAME_CHARS,
    "expected_fingerprint": MAX_ID_CHARS,
    "scheduler": 16,
    "dtype": 16,
}
DEFAULT_MAX_CHARS = 256

# Entries per repeated field, by field name; other lists get DEFAULT_MAX_ENTRIES.
MAX_CLASSES = 1_024
MAX_LABELS = 65_536
# A release chunk is about CHUNK_BYTES // 4 of payload; 8x8 grey images are 256 bytes each.
MAX_CHUNK_ITEMS = 16_384
LIST_LIMITS: dict[str, int] = {
    "class_names": MAX_CLASSES,
    "labels": MAX_LABELS,
    "items": MAX_CHUNK_ITEMS,
    "shape": MAX_DIMS,
}
DEFAULT_MAX_ENTRIES = 1_024

# Room for a chunk plus slack, and for at least one float32 image of the served spec with headroom.
MIN_REQUEST_BYTES = 2 * CHUNK_BYTES


def max_request_bytes(image_shape: tuple[int, ...]) -> int:
    """The server's receive limit: no request message may be larger (gRPC answers RESOURCE_EXHAUSTED)."""
    elements = 1
    for side in image_shape:
        elements *= side
    return max(MIN_REQUEST_BYTES, 2 * 4 * elements + (1 << 16))


def check_request(message: object) -> str | None:
    """The first string or list of ``message`` (recursively) over its limit, as a sentence; else None."""
    if not isinstance(message, Message):
        return None
    return _check(message, type(message).__name__)


def _check(message: Message, path: str) -> str | None:
    for field, value in message.ListFields():
        where = f"{path}.{field.name}"
        repeated = field.is_repeated
        values = list(value) if repeated else [value]
        if repeated:
            limit = LIST_LIMITS.get(field.name, DEFAULT_MAX_ENTRIES)
            if len(values) > limit:
                return f"{where} has {len(values)} entries; at most {limit} are accepted"
        if field.type == FieldDescriptor.TYPE_STRING:
            limit = STRING_LIMITS.get(field.name, DEFAULT_MAX_CHARS)
            for i, text in enumerate(values):
                if len(text) > limit:
                    at = f"{where}[{i}]" if repeated else where
                    return f"{at} has {len(text)} characters; at most {limit} are accepted"
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            for i, child in enumerate(values):
                problem = _check(child, f"{where}[{i}]" if repeated else where)
                if problem:
                    return problem
    return None
