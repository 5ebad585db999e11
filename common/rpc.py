"""gRPC infrastructure in one place: message limits, keepalive, retries, interceptors, auth, channels.

Servers and clients both take their options from here so the two ends agree
(keepalive pings a server accepts, message sizes) and later concerns (TLS,
interceptors) slot in at one spot.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
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
# A channel whose server went away retries the connection with its own backoff; cap it low so a
# restarted server is seen within seconds (gRPC's default cap is 120 s).
RECONNECT_BACKOFF_MS = (1_000, 5_000)
AUTH_METADATA_KEY = "x-collafuse-token"
# Trailing metadata of a RESOURCE_EXHAUSTED the server expects to clear (a full queue): milliseconds to wait.
RETRY_AFTER_KEY = "retry-after-ms"
# Status details travel in one HTTP/2 header; the default metadata limit is 8 KiB (percent-encoded).
MAX_DETAILS_CHARS = 1_000

Behavior = Callable[[Any, grpc.ServicerContext], Any]


def channel_options() -> list[tuple[str, Any]]:
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", KEEPALIVE_MS),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.initial_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[0]),
        ("grpc.min_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[0]),
        ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[1]),
    ]


def server_options(max_receive_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, Any]]:
    """``max_receive_bytes`` bounds every request message (bigger ones get RESOURCE_EXHAUSTED from gRPC)."""
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", max_receive_bytes),
        # Accept the clients' keepalive pings instead of answering GOAWAY (too_many_pings).
        ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_MS // 2),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_ping_strikes", 0),
        ("grpc.so_reuseport", 0),
    ]


# ---- retries ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter up to ``max_delay``, for at most ``wait_timeout`` seconds.

    The time bound is what matters to a client: a server restart takes minutes, so a call keeps
    retrying UNAVAILABLE until the server is back or ``wait_timeout`` has passed. ``attempts``
    optionally caps the number of tries as well (None: as many as the time allows).
    """

    wait_timeout: float = 300.0
    attempts: int | None = None
    initial_delay: float = 0.5
    max_delay: float = 30.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.attempts is not None and self.attempts < 1:
            raise ValueError("RetryPolicy.attempts must be at least 1 (or None for no cap)")
        if self.wait_timeout < 0 or self.initial_delay < 0 or self.max_delay < 0 or self.multiplier < 1:
            raise ValueError("RetryPolicy needs wait_timeout, initial_delay, max_delay >= 0 and multiplier >= 1")

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Full jitter: uniform in [0, min(max_delay, initial_delay * multiplier**attempt)]."""
        # min() before the power would overflow: attempt counts are unbounded under a time budget.
        exponent = min(attempt, 64)
        cap = min(self.max_delay, self.initial_delay * self.multiplier**exponent)
        return rng.uniform(0, cap)

    def retryable(self, code: grpc.StatusCode | None, idempotent: bool, busy_hint: float | None = None) -> bool:
        """UNAVAILABLE always (the server is down or restarting); RESOURCE_EXHAUSTED when the server sent a
        retry hint (it refused the call before doing anything); DEADLINE_EXCEEDED only where running twice is
        harmless. Everything else (UNAUTHENTICATED, PERMISSION_DENIED, INVALID_ARGUMENT, ...) stops at once."""
        if code == grpc.StatusCode.UNAVAILABLE:
            return True
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return busy_hint is not None
        return idempotent and code == grpc.StatusCode.DEADLINE_EXCEEDED

    def pause(self, attempt: int, rng: random.Random, busy_hint: float | None, remaining: float) -> float:
        """The wait before retry ``attempt + 1``: the backoff, at least the server's hint, within what is left.

        The hint is the server's word, so it is capped at ``max_delay``: a server that says "wait a day"
        gets retried after 30 s, and one that says "0 ms" again and again still meets the growing backoff.
        """
        pause = self.delay(attempt, rng)
        if busy_hint is not None:
            pause = max(pause, min(busy_hint, self.max_delay))
        return min(pause, remaining)


class ServerUnreachable(ConnectionError):
    """The server did not answer within the retry policy's budget."""


def _code(exc: grpc.RpcError) -> grpc.StatusCode | None:
    return exc.code() if hasattr(exc, "code") else None


def _details(exc: grpc.RpcError | None) -> str:
    return (exc.details() or "") if exc is not None and hasattr(exc, "details") else ""


def retry_after(exc: grpc.RpcError) -> float | None:
    """Seconds the server asked to wait (``retry-after-ms`` trailing metadata), or None when it sent no valid
    hint: a missing, non-numeric or negative value, or one beyond a day, is no hint."""
    try:
        metadata = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    except Exception:  # noqa: BLE001 -- a call object without metadata: no hint
        return None
    for key, value in metadata or ():
        if key == RETRY_AFTER_KEY:
            text = value.decode() if isinstance(value, bytes) else str(value)
            if text.isascii() and text.isdigit() and int(text) <= 86_400_000:
                return int(text) / 1000
            log.warning("ignoring a malformed %s hint from the server: %r", RETRY_AFTER_KEY, text[:40])
            return None
    return None


def call_with_retry(
    fn: Callable[[], T],
    policy: RetryPolicy,
    what: str,
    target: str,
    rng: random.Random | None = None,
    sleep: Callable[[float], None] = time.sleep,
    *,
    idempotent: bool = True,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """Call an RPC, retrying UNAVAILABLE (and DEADLINE_EXCEEDED when ``idempotent``) with backoff and jitter,
    and RESOURCE_EXHAUSTED that carries a ``retry-after-ms`` hint after at least the hinted wait.

    Other codes (INVALID_ARGUMENT, UNAUTHENTICATED, PERMISSION_DENIED, ...) propagate at once.
    Raises ServerUnreachable once ``policy.wait_timeout`` (or ``policy.attempts``) is spent.
    """
    rng = rng or random.Random()
    started = clock()
    last: grpc.RpcError | None = None
    attempt = 0
    while True:
        try:
            return fn()
        except grpc.RpcError as exc:
            hint = retry_after(exc) if _code(exc) == grpc.StatusCode.RESOURCE_EXHAUSTED else None
            if not policy.retryable(_code(exc), idempotent, hint):
                raise
            last = exc
        attempt += 1
        waited = clock() - started
        remaining = policy.wait_timeout - waited
        if (policy.attempts is not None and attempt >= policy.attempts) or remaining <= 0:
            break
        pause = policy.pause(attempt - 1, rng, hint, remaining)
        log.warning(
            "%s: %s at %s (%s: %s); retry %d in %.1fs, %.0fs waited of at most %.0fs (--wait-timeout)",
            what, "the server is busy" if hint is not None else "waiting for the server", target, _code(last),
            _details(last)[:200], attempt, pause, waited, policy.wait_timeout,
        )
        sleep(pause)
    if hint is not None:  # the last refusal was a busy server's, not a missing one's
        raise ServerUnreachable(
            f"{what}: the server at {target} stayed busy through {attempt} attempts over {clock() - started:.0f}s "
            f"({_details(last)[:200]}). Try again later, or raise --wait-timeout to wait longer."
        )
    raise ServerUnreachable(
        f"{what}: the server at {target} did not answer after {attempt} attempts over {clock() - started:.0f}s "
        f"({_details(last)[:200]}). Check that collafuse-server is running there and that --server HOST:PORT "
        "is right, or raise --wait-timeout to wait longer for a restarting server."
    )


# ---- server-side interceptors -------------------------------------------------------------------


def bounded_details(text: str, limit: int = MAX_DETAILS_CHARS) -> str:
    """Cut an error message to ``limit`` characters: an echoed oversized value must not overflow metadata."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


def rewrap_handler(
    handler: grpc.RpcMethodHandler,
    wrap: Callable[[Behavior], Behavior],
    request_deserializer: Callable[[bytes], Any] | None = None,
) -> grpc.RpcMethodHandler:
    """The same kind of handler with its behavior passed through ``wrap`` (and optionally another deserializer).

    ``wrap`` gets the inner behavior ``(request or request iterator, context) -> response or iterator``;
    ``handler.request_streaming`` / ``response_streaming`` tell it which it holds.
    """
    kwargs = {
        "request_deserializer": request_deserializer or handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(wrap(handler.unary_unary), **kwargs)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(wrap(handler.unary_stream), **kwargs)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(wrap(handler.stream_unary), **kwargs)
    return grpc.stream_stream_rpc_method_handler(wrap(handler.stream_stream), **kwargs)


@dataclass(frozen=True)
class Undecodable:
    """Stands in for a request message that does not parse, so the handler answers it (not gRPC's core)."""

    size: int
    error: str


def _tolerant(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def parse(raw: bytes) -> Any:
        try:
            return deserialize(raw)
        except Exception as exc:  # noqa: BLE001 -- any parse failure is the sender's problem
            return Undecodable(len(raw), str(exc))

    return parse


class _BoundedContext:
    """A servicer context whose abort/set_details cut the message to MAX_DETAILS_CHARS."""

    def __init__(self, context: grpc.ServicerContext) -> None:
        self._context = context

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self._context.abort(code, bounded_details(details))

    def set_details(self, details: str) -> None:
        self._context.set_details(bounded_details(details))


class RequestGuardInterceptor(grpc.ServerInterceptor):
    """Answers undecodable and over-limit request messages with INVALID_ARGUMENT; bounds error details.

    gRPC answers an undecodable *stream* message itself (INTERNAL, from its receive callback); the
    handler then sees the stream end, returns, and gRPC sends a second status for the same call
    unless the client has gone already. That batch never completes, so ``server.stop(grace)`` waits
    forever (seen with grpcio 1.85). Decoding tolerantly and aborting from inside the handler keeps
    one status per call. ``check(message)`` returns a problem to report, or None.
    """

    def __init__(self, check: Callable[[Any], str | None] | None = None) -> None:
        self._check = check

    def _admit(self, request: Any, context: Any, method: str, where: str) -> Any:
        problem: str | None
        if isinstance(request, Undecodable):
            problem = f"{where} ({request.size} bytes) cannot be decoded ({request.error}); send a well-formed request"
        else:
            problem = self._check(request) if self._check is not None else None
            problem = f"{where}: {problem}" if problem else None
        if problem:
            log.info("rejected %s: %s", method, bounded_details(problem, 300))
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        return request

    def intercept_service(self, continuation: Callable[[Any], Any], handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler  # no messages to parse (e.g. an auth denial)
        method = handler_call_details.method
        streaming = handler.request_streaming

        def wrap(inner: Behavior) -> Behavior:
            def behavior(request: Any, context: grpc.ServicerContext) -> Any:
                bounded = _BoundedContext(context)
                if streaming:
                    request = (self._admit(m, bounded, method, f"stream message {i}") for i, m in enumerate(request))
                else:
                    self._admit(request, bounded, method, "the request")
                return inner(request, bounded)  # type: ignore[arg-type]

            return behavior

        return rewrap_handler(handler, wrap, request_deserializer=_tolerant(handler.request_deserializer))


# ---- auth ---------------------------------------------------------------------------------------


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


# ---- channels -----------------------------------------------------------------------------------


def open_channel(
    target: str, token: str | None = None, credentials: grpc.ChannelCredentials | None = None
) -> grpc.Channel:
    """A channel with CollaFuse's options: TLS with ``credentials`` (common/tls.py), else insecure."""
    if credentials is not None:
        channel = grpc.secure_channel(target, credentials, options=channel_options())
    else:
        channel = grpc.insecure_channel(target, options=channel_options())
    if token:
        channel = grpc.intercept_channel(channel, _TokenClientInterceptor(token))
    return channel

