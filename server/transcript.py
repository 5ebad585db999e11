"""Traffic accounting and the privacy audit's transcript of every request message the server admits.

The interceptor wraps every method handler: unary requests are recorded when the
handler is called, client streams message by message as the handler reads them.
With a transcript path, each message becomes one JSON line
``{time, method, request_type, payload_b64, peer, seq}`` appended and fsynced
under a lock, so the record survives a crash and lines never interleave.

The transcript is an audit log, outside Forget: it is off unless ``--transcript`` is
given, it holds a copy of every payload clients sent (releases included), and it is
kept until the operator deletes the file: the server never rotates, trims or deletes
it, and Forget removes a client's releases from the store but not from the
transcript (an audit record the audited server could edit would prove nothing).
Requests denied by authentication never reach it (the auth interceptor runs first
and only counts them); undecodable or over-limit messages are rejected before it.

The server's own replies are not recorded, with one exception: ``SplitForward``'s eps_hat
(``RECORDED_REPLIES``, lines with ``"direction": "reply"``; request lines have no direction or
``"request"``). A curious server knows what it answered; the audit needs that eps_hat to run the
split protocol's gradient inversion on the recorded backward (eps = eps_hat - s g), and it cannot be
recomputed afterwards: the weights change every step and only the latest checkpoint is kept.

When the transcript cannot be written (a full disk), a line is never left half-written (the file is cut
back to where the line began), and only the calls the audit must see fail: ``MUST_RECORD`` (every call
that carries an image-derived payload, registers a cut or returns samples) is answered RESOURCE_EXHAUSTED
with a retry hint, before the handler runs for a unary call (nothing happened) and before the stream is
committed for a Release; Heartbeat, Status and Forget are served unrecorded (counted in ``unrecorded``
and logged), so liveness, monitoring and deletion keep working.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc

from collafuse.common.rpc import Behavior, rewrap_handler
from collafuse.server.errors import STORAGE_RETRY_S, abort

log = logging.getLogger(__name__)

FORGET_METHOD = "/collafuse.v1.CollaFuse/Forget"
# Replies recorded beside the requests (the audit's split gradient inversion needs the eps_hat the server sent).
RECORDED_REPLIES = frozenset({"/collafuse.v1.CollaFuse/SplitForward"})
# Calls that fail when the transcript cannot record them; the others are served unrecorded.
MUST_RECORD = frozenset(f"/collafuse.v1.CollaFuse/{m}" for m in (
    "Register", "Release", "Sample", "SplitForward", "SplitBackward"))


class TranscriptUnwritable(Exception):
    """The transcript file refused a line (``cause``: the OSError)."""

    def __init__(self, cause: OSError) -> None:
        super().__init__(str(cause))
        self.cause = cause


def _size(message: Any) -> int:
    return int(message.ByteSize()) if hasattr(message, "ByteSize") else 0


class TranscriptInterceptor(grpc.ServerInterceptor):
    """Counts bytes each way; records every admitted request message when ``path`` is set."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._seq = 0
        self.bytes_received = 0
        self.bytes_sent = 0
        self.unrecorded = 0  # messages of calls served without a transcript line (the file refused it)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Open for the server's lifetime (closed in close()): one unbuffered append descriptor, fsynced per line.
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            log.warning(
                "recording every request payload to %s (privacy audit transcript): it keeps released images "
                "after Forget, until you delete the file", self.path,
            )

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def traffic(self) -> tuple[int, int]:
        with self._lock:
            return self.bytes_received, self.bytes_sent

    # ---- accounting -----------------------------------------------------------------------
    def _received(self, method: str, message: Any, context: grpc.ServicerContext) -> None:
        size = _size(message)
        with self._lock:
            self.bytes_received += size
            self._record_or_refuse_locked(method, message, context, "request")

    def _record_or_refuse_locked(self, method: str, message: Any, context: grpc.ServicerContext, direction: str) -> None:
        """Record; when the file refuses, end a call the audit must see (RESOURCE_EXHAUSTED), else count it."""
        try:
            self._record_locked(method, message, context, direction)
        except TranscriptUnwritable as exc:
            self._seq -= 1
            if method in MUST_RECORD:
                log.error("transcript %s cannot be written (%s): refusing %s", self.path, exc.cause, method)
                abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                      f"the server cannot write its audit transcript {self.path} ({exc.cause}): its disk is full or "
                      f"failing, and this call is not served unrecorded; nothing of it was stored. Retry in "
                      f"{STORAGE_RETRY_S:.0f}s; the server's operator must free space on that disk",
                      STORAGE_RETRY_S)
            self.unrecorded += 1
            if self.unrecorded == 1 or self.unrecorded % 100 == 0:
                log.warning("transcript %s cannot be written (%s): %s served unrecorded (%d so far)",
                            self.path, exc.cause, method, self.unrecorded)

    def _record_locked(self, method: str, message: Any, context: grpc.ServicerContext, direction: str) -> None:
        if self._fd is None:
            return
        self._seq += 1
        line = {
            "seq": self._seq,
            "time": time.time(),
            "method": method,
            "direction": direction,
            "request_type": message.DESCRIPTOR.full_name,
            "peer": context.peer(),
            "payload_b64": base64.b64encode(message.SerializeToString()).decode("ascii"),
        }
        data = memoryview(json.dumps(line).encode() + b"\n")
        start = os.lseek(self._fd, 0, os.SEEK_END)
        try:
            while data:
                data = data[os.write(self._fd, data):]
            os.fsync(self._fd)
        except OSError as exc:
            try:  # never leave half a line: the next line must start a record
                os.ftruncate(self._fd, start)
            except OSError:
                pass
            raise TranscriptUnwritable(exc) from exc

    def _sent(self, message: Any, method: str = "", context: grpc.ServicerContext | None = None) -> None:
        size = _size(message)
        with self._lock:
            self.bytes_sent += size
            if method in RECORDED_REPLIES and context is not None:
                self._record_or_refuse_locked(method, message, context, "reply")

    def _stream_in(self, method: str, requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        for message in requests:
            self._received(method, message, context)
            yield message

    def _stream_out(self, responses: Iterator[Any]) -> Iterator[Any]:
        for message in responses:
            self._sent(message)
            yield message

    # ---- wrapping -------------------------------------------------------------------------
    def intercept_service(self, continuation: Callable[[Any], Any], handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method

        def wrap(inner: Behavior) -> Behavior:
            def behavior(request: Any, context: grpc.ServicerContext) -> Any:
                if handler.request_streaming:
                    request = self._stream_in(method, request, context)
                else:
                    self._received(method, request, context)
                response = inner(request, context)
                if handler.response_streaming:
                    return self._stream_out(response)
                self._sent(response, method, context)
                if method == FORGET_METHOD and self._fd is not None:
                    log.warning("client %s was forgotten, but the audit transcript %s still holds what it sent",
                                getattr(request, "client_id", "?"), self.path)
                return response

            return behavior

        return rewrap_handler(handler, wrap)
