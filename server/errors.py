"""Errors the server raises: at start-up (the CLI turns them into one plain line and exit code 2) and
refusals of a request (the servicer turns them into a status code)."""

from __future__ import annotations

from typing import NoReturn

import grpc

from collafuse.common.rpc import RETRY_AFTER_KEY


class StartupError(RuntimeError):
    """The server cannot start with these settings; the message says what to do."""


class PortInUse(StartupError):
    """The requested port is taken by another process."""


class FingerprintMismatch(StartupError):
    """Stored state (releases or a checkpoint) was made for another schedule / image spec / class list."""


class StoreError(StartupError):
    """The release store on disk is unusable."""


class RequestRefused(Exception):
    """A request a handler refuses: the servicer answers it with ``code`` and ``message`` (docs/design.md §8)."""

    def __init__(self, code: grpc.StatusCode, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        # RESOURCE_EXHAUSTED that clears by itself: sent as ``retry-after-ms``, and clients retry after it.
        self.retry_after_s = retry_after_s


def abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str,
          retry_after_s: float | None = None) -> NoReturn:
    """End the call with ``code``; a retry hint goes in the trailing metadata the client's RetryPolicy reads."""
    if retry_after_s is not None:
        context.set_trailing_metadata(((RETRY_AFTER_KEY, str(max(1, round(retry_after_s * 1000)))),))
    context.abort(code, message)
    raise AssertionError("unreachable: context.abort raises")  # for type checkers


def refuse(context: grpc.ServicerContext, refused: RequestRefused, suffix: str = "") -> NoReturn:
    abort(context, refused.code, refused.message + suffix, refused.retry_after_s)
