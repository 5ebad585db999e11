"""Errors the server raises at start-up; the CLI turns them into one plain line and exit code 2."""

from __future__ import annotations


class StartupError(RuntimeError):
    """The server cannot start with these settings; the message says what to do."""


class PortInUse(StartupError):
    """The requested port is taken by another process."""


class FingerprintMismatch(StartupError):
    """Stored state (releases or a checkpoint) was made for another schedule / image spec / class list."""


class StoreError(StartupError):
    """The release store on disk is unusable."""
