"""Errors the client expects and reports as one plain line (the CLI exits 2 on them)."""

from __future__ import annotations

import grpc


class ClientError(RuntimeError):
    """Something the user can act on: a server refusal, a protocol surprise, a missing local model."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code

    @classmethod
    def from_rpc(cls, what: str, exc: grpc.RpcError) -> ClientError:
        """The server's own message, prefixed with the call it answered (e.g. 'server rejected Register: ...')."""
        code = exc.code() if hasattr(exc, "code") else None
        details = exc.details() if hasattr(exc, "details") else str(exc)
        name = code.name if code is not None else "UNKNOWN"
        return cls(f"server rejected {what} ({name}): {details or 'no details given'}", code)


class LedgerRefusal(ClientError):
    """The release ledger refuses an action that would disclose more than the user agreed to."""


class ServerFingerprintChanged(ClientError):
    """The server's image spec / schedule / classes differ from what this client joined with."""


class InconsistentServerReply(ClientError):
    """The server's reply contradicts itself (e.g. a fingerprint that is not the one of the setup it serves)."""


class AutoencoderMismatch(ClientError):
    """The server runs through another autoencoder than this client's (or one side has none)."""


# Said wherever a refusal might tempt a user to start over: a new ledger is a new first contact.
FRESH_WORKDIR_RISK = (
    "Starting over in a fresh --workdir forgets what was released: the same images would go out again with new "
    "noise, and a server that kept the first looks can average the noise away. Do that only with images and a "
    "server this client never used."
)
