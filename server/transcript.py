"""Traffic accounting and the privacy audit's transcript of every request message the server reads.

The interceptor wraps every method handler: unary requests are recorded when the
handler is called, client streams message by message as the handler reads them.
With a transcript path, each message becomes one JSON line
``{time, method, request_type, payload_b64, peer, seq}`` appended and fsynced
under a lock, so the record survives a crash and lines never interleave.
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

log = logging.getLogger(__name__)


def _size(message: Any) -> int:
    if isinstance(message, bytes | bytearray):
        return len(message)
    return int(message.ByteSize()) if hasattr(message, "ByteSize") else 0


class TranscriptInterceptor(grpc.ServerInterceptor):
    """Counts bytes each way; records every request message when ``path`` is set."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._lock = threading.Lock()
        self._file = None
        self._seq = 0
        self.bytes_received = 0
        self.bytes_sent = 0
        self.messages_received = 0
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Open for the server's lifetime (closed in close()): one append handle, fsynced per line.
            self._file = open(self.path, "ab")  # noqa: SIM115
            log.info("recording every request payload to %s (privacy audit transcript)", self.path)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def traffic(self) -> tuple[int, int]:
        with self._lock:
            return self.bytes_received, self.bytes_sent

    # ---- accounting -----------------------------------------------------------------------
    def _received(self, method: str, message: Any, context: grpc.ServicerContext) -> None:
        size = _size(message)
        with self._lock:
            self.bytes_received += size
            self.messages_received += 1
            if self._file is None:
                return
            self._seq += 1
            if isinstance(message, bytes | bytearray):
                payload, kind = bytes(message), "bytes"  # a handler without a deserializer (e.g. auth denial)
            else:
                payload, kind = message.SerializeToString(), message.DESCRIPTOR.full_name
            line = {
                "seq": self._seq,
                "time": time.time(),
                "method": method,
                "request_type": kind,
                "peer": context.peer(),
                "payload_b64": base64.b64encode(payload).decode("ascii"),
            }
            self._file.write(json.dumps(line).encode() + b"\n")
            self._file.flush()
            os.fsync(self._file.fileno())

    def _sent(self, message: Any) -> None:
        size = _size(message)
        with self._lock:
            self.bytes_sent += size

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
        kwargs = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}

        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary

            def unary_unary(request: Any, context: grpc.ServicerContext) -> Any:
                self._received(method, request, context)
                response = inner_uu(request, context)
                self._sent(response)
                return response

            return grpc.unary_unary_rpc_method_handler(unary_unary, **kwargs)
        if handler.unary_stream is not None:
            inner_us = handler.unary_stream

            def unary_stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                self._received(method, request, context)
                return self._stream_out(inner_us(request, context))

            return grpc.unary_stream_rpc_method_handler(unary_stream, **kwargs)
        if handler.stream_unary is not None:
            inner_su = handler.stream_unary

            def stream_unary(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
                response = inner_su(self._stream_in(method, requests, context), context)
                self._sent(response)
                return response

            return grpc.stream_unary_rpc_method_handler(stream_unary, **kwargs)
        inner_ss = handler.stream_stream

        def stream_stream(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
            return self._stream_out(inner_ss(self._stream_in(method, requests, context), context))

        return grpc.stream_stream_rpc_method_handler(stream_stream, **kwargs)
