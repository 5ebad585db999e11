"""Errors the server raises: at start-up (the CLI turns them into one plain line and exit code 2) and
refusals of a request (the servicer turns them into a status code)."""

from __future__ import annotations

import grpc


class StartupError(RuntimeError):
    """The server cannot start with these settings; the message says what to do."""


class PortInUse(StartupError):
    """The requested port is taken by another process."""


class FingerprintMismatch(StartupError):
    """Stored state (releases or a checkpoint) was made for another schedule / image spec / class list."""


class StoreError(StartupError):
    """The release store on disk is unusable."""


class RequestRefused(Exception):
    """A request a handler refuses: the servicer answers it with ``code`` and ``message`` (DESIGN 3)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
