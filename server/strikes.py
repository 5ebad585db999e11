"""Strikes: a split client that keeps sending refused steps is dropped for a while (issue 16).

A split gradient refused for what the client sent (NaN/Inf, a row over ``--split-max-grad-norm``, a wrong shape,
a step of another client: INVALID_ARGUMENT or PERMISSION_DENIED) is a strike; an applied step clears the count
(a malformed forward is refused before any model call and is not counted). After
``max_strikes`` strikes in a row the client is dropped: its split calls are refused with FAILED_PRECONDITION
for ``cooldown`` seconds, whatever it sends, so a broken or hostile client costs the server one cheap check
per call instead of a decode, a model call or a place in a round. Strikes live in memory (a restart clears
them) and are keyed by registered client ids, so they are bounded by ``--max-clients``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from collafuse.server.errors import RequestRefused

log = logging.getLogger(__name__)

# Refusals that are the sender's fault; late gradients (FAILED_PRECONDITION) and full rounds are not.
STRIKE_CODES = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED})


@dataclass
class _Record:
    strikes: int = 0
    dropped_until: float = 0.0  # wall time (time.time())
    last: str = ""


class StrikeBook:
    """Per-client strike counts; thread-safe. ``max_strikes`` 0 never drops anyone."""

    def __init__(self, max_strikes: int, cooldown: float, clock: Callable[[], float] = time.time) -> None:
        self.max_strikes = max_strikes
        self.cooldown = cooldown
        self._clock = clock
        self._lock = threading.Lock()
        self._records: dict[str, _Record] = {}
        self.dropped_total = 0

    def refusal(self, client_id: str) -> RequestRefused | None:
        """Why this client's split call is refused now (it is dropped), or None."""
        with self._lock:
            record = self._records.get(client_id)
            if record is None or record.dropped_until <= 0:
                return None
            left = record.dropped_until - self._clock()
            if left <= 0:  # served its time: a clean slate
                del self._records[client_id]
                return None
            return RequestRefused(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"client {client_id[:64]!r} was dropped from split training after {self.max_strikes} refused steps "
                f"in a row (last: {record.last}); its split steps are refused for another {left:.0f}s. Fix what "
                "the refusals said (send dL/d(eps_hat) of the mean loss over the batch, finite, each image's row "
                "within the server's --split-max-grad-norm), then send again after that",
            )

    def strike(self, client_id: str, refused: RequestRefused) -> None:
        """Count a refused step when it was the sender's fault; drop the client at ``max_strikes`` in a row."""
        if self.max_strikes <= 0 or refused.code not in STRIKE_CODES:
            return
        with self._lock:
            record = self._records.setdefault(client_id, _Record())
            record.strikes += 1
            record.last = refused.message[:200]
            if record.strikes >= self.max_strikes and record.dropped_until <= self._clock():
                record.dropped_until = self._clock() + self.cooldown
                self.dropped_total += 1
                log.warning("client %s dropped from split training for %.0fs after %d refused steps in a row (last: %s)",
                            client_id[:64], self.cooldown, record.strikes, record.last)

    def clear(self, client_id: str) -> None:
        """An accepted step: the count starts over (a drop in force stays)."""
        with self._lock:
            record = self._records.get(client_id)
            if record is not None and record.dropped_until <= 0:
                del self._records[client_id]
            elif record is not None:
                record.strikes = 0

    def status(self, client_id: str) -> tuple[int, float]:
        """(strikes in a row, wall time until which the client is dropped, 0 if not)."""
        with self._lock:
            record = self._records.get(client_id)
            if record is None:
                return 0, 0.0
            until = record.dropped_until if record.dropped_until > self._clock() else 0.0
            return record.strikes, until
