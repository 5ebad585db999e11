"""gRPC infrastructure in one place: message limits, keepalive, retries, auth, channels.

Servers and clients both take their options from here so the two ends agree
(keepalive pings a server accepts, message sizes) and later concerns (TLS,
interceptors) slot in at one spot.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

log = logging.getLogger(__name__)
T = TypeVar("T")

MiB = 1 << 20
# Large payloads are streamed in chunks well under this limit.
MAX_MESSAGE_BYTES = 64 * MiB
CHUNK_BYTES = 4 * MiB
# Idle connections are dropped by many load balancers at about 4 minutes; ping before.
KEEPALIVE_MS = 210_000
AUTH_METADATA_KEY = "x-collafuse-token"


def channel_options() -> list[tuple[str, Any]]:
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", KEEPALIVE_MS),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def server_options() -> list[tuple[str, Any]]:
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        # Accept the clients' keepalive pings instead of answering GOAWAY (too_many_pings).
        ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_MS // 2),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_ping_strikes", 0),
        ("grpc.so_reuseport", 0),
    ]


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter; retries only codes where a retry can help."""

    attempts: int = 6
    initial_delay: float = 0.5
    max_delay: float = 10.0
    multiplier: float = 2.0
    retry_codes: tuple[grpc.StatusCode, ...] = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)

    def delay(self, attempt: int, rng: random.Random) -> float:
        cap = min(self.max_delay, self.initial_delay * self.multiplier**attempt)
        return rng.uniform(0, cap)


class ServerUnreachable(ConnectionError):
    """The server did not answer after every retry."""


def call_with_retry(
    fn: Callable[[], T],
    policy: RetryPolicy,
    what: str,
    target: str,
    rng: random.Random | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call an idempotent RPC, retrying UNAVAILABLE / DEADLINE_EXCEEDED with backoff and jitter.

    Other codes (INVALID_ARGUMENT, UNAUTHENTICATED, ...) propagate at once: retrying cannot help.
    """
    rng = rng or random.Random()
    last: grpc.RpcError | None = None
    for attempt in range(policy.attempts):
        try:
            return fn()
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            if code not in policy.retry_codes:
                raise
            last = exc
            if attempt + 1 < policy.attempts:
                pause = policy.delay(attempt, rng)
                log.warning("%s to %s failed (%s); retry %d/%d in %.1fs", what, target, code, attempt + 1, policy.attempts - 1, pause)
                sleep(pause)
    detail = last.details() if last is not None and hasattr(last, "details") else ""
    raise ServerUnreachable(
        f"{what}: the server at {target} did not answer after {policy.attempts} attempts ({detail}). "
        "Check that collafuse-server is running there and that --server HOST:PORT is right."
    )


class _TokenClientInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds the shared token to every call's metadata."""

    def __init__(self, token: str) -> None:
        self._token = token

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = list(details.metadata or []) + [(AUTH_METADATA_KEY, self._token)]
        return details._replace(metadata=metadata)  # type: ignore[attr-defined]

    def intercept_unary_unary(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):  # type: ignore[no-untyped-def]
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):  # type: ignore[no-untyped-def]
        return continuation(self._details(client_call_details), request_iterator)


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Rejects calls without the shared token (health and reflection stay open for probes)."""

    OPEN_PREFIXES: Sequence[str] = ("/grpc.health.v1.", "/grpc.reflection.")

    def __init__(self, token: str) -> None:
        self._token = token

    def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        method = handler_call_details.method
        if any(method.startswith(p) for p in self.OPEN_PREFIXES):
            return continuation(handler_call_details)
        metadata = dict(handler_call_details.invocation_metadata or ())
        if metadata.get(AUTH_METADATA_KEY) == self._token:
            return continuation(handler_call_details)

        def deny(request_or_iterator: Any, context: grpc.ServicerContext) -> Any:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token: pass --token (COLLAFUSE_TOKEN) as the server's")

        handler = continuation(handler_call_details)
        if handler is None:
            return None
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(deny)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(deny)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(deny)
        return grpc.unary_unary_rpc_method_handler(deny)


def open_channel(target: str, token: str | None = None) -> grpc.Channel:
    """An insecure channel with CollaFuse's options (TLS slots in here)."""
    channel = grpc.insecure_channel(target, options=channel_options())
    if token:
        channel = grpc.intercept_channel(channel, _TokenClientInterceptor(token))
    return channel


def wait_for_ready(channel: grpc.Channel, target: str, timeout: float) -> None:
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout)
    except grpc.FutureTimeoutError as exc:
        raise ServerUnreachable(
            f"no server answered at {target} within {timeout:.0f}s. Start collafuse-server there, "
            "or pass the right --server HOST:PORT."
        ) from exc
