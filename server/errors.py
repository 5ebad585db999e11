"""Errors the server raises: at start-up (the CLI turns them into one plain line and exit code 2) and
refusals of a request (the servicer turns them into a status code)."""

from __future__ import annotations

import errno
import sqlite3
from pathlib import Path
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


# Seconds a caller is told to wait before retrying a call that failed on a full or failing disk.
STORAGE_RETRY_S = 30.0
# errno values that mean the disk, not the request: full, over quota, read-only, failing.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO})


class StorageFull(RequestRefused):
    """A write the server's disk refused (full, over quota, read-only, failing): RESOURCE_EXHAUSTED with a retry
    hint, and a message that names the disk. Nothing of the call that hit it was stored."""

    def __init__(self, where: Path | str, cause: BaseException, what: str = "nothing of this call was stored") -> None:
        super().__init__(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"the server cannot write to {where} ({type(cause).__name__}: {cause}): its disk is full or failing, "
            f"and {what}. Retry in {STORAGE_RETRY_S:.0f}s; the server's operator must free space on that disk",
            retry_after_s=STORAGE_RETRY_S,
        )
        self.cause = cause


def is_storage_error(exc: BaseException) -> bool:
    """Whether ``exc`` is the disk's fault (full, quota, read-only, I/O), not the request's or the code's."""
    if isinstance(exc, sqlite3.OperationalError):
        text = str(exc).lower()
        return any(s in text for s in ("disk is full", "database or disk is full", "disk i/o error", "readonly",
                                       "read-only", "unable to open database file"))
    if isinstance(exc, OSError):
        return exc.errno in STORAGE_ERRNOS
    if isinstance(exc, RuntimeError):  # torch's file writer reports ENOSPC as a RuntimeError
        text = str(exc).lower()
        return "no space left" in text or "file write failed" in text
    return False


def abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str,
          retry_after_s: float | None = None) -> NoReturn:
    """End the call with ``code``; a retry hint goes in the trailing metadata the client's RetryPolicy reads."""
    if retry_after_s is not None:
        context.set_trailing_metadata(((RETRY_AFTER_KEY, str(max(1, round(retry_after_s * 1000)))),))
    context.abort(code, message)
    raise AssertionError("unreachable: context.abort raises")  # for type checkers


def refuse(context: grpc.ServicerContext, refused: RequestRefused, suffix: str = "") -> NoReturn:
    abort(context, refused.code, refused.message + suffix, refused.retry_after_s)
