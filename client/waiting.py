"""Waiting for the server's training: poll Heartbeat until its trainer is done, saying what it waits for."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from tqdm.auto import tqdm

from collafuse.client.connection import ServerConnection
from collafuse.client.errors import ClientError
from collafuse.client.trainer import progress_disabled
from collafuse.common.enums import phase_name
from collafuse.v1 import collafuse_pb2

log = logging.getLogger(__name__)

POLL_SECONDS = 2.0
# Log the wait at most this often when no progress bar is shown.
WAIT_LOG_SECONDS = 15.0


def wait_for_training(
    connection: ServerConnection,
    client_id: str,
    timeout: float,
    *,
    poll_interval: float = POLL_SECONDS,
    show_progress: bool | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> collafuse_pb2.TrainerState:
    """The trainer state once its phase is 'done'; a ClientError with advice after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last_log = 0.0
    seen: set[str] = set()
    with tqdm(desc="server training", unit="step", disable=progress_disabled(show_progress), leave=False) as bar:
        while True:
            state = connection.heartbeat(client_id).trainer
            bar.total = state.max_steps or None
            bar.n = state.step
            phase = phase_name(state.phase)
            bar.set_postfix(phase=phase, loss=f"{state.last_loss:.4f}")
            if phase == "done":
                log.info("server training done at step %d (loss %.4f)", state.step, state.last_loss)
                return state
            if phase == "idle" and seen & {"waiting", "training"} and "idle" not in seen:
                # 'idle' after training means the trainer stopped (an error, or the server is
                # restarting); a restarted server resumes, so keep waiting but say so.
                log.warning("the server's trainer went idle at step %d (stopped or restarting; %s); still "
                            "waiting up to --wait-timeout", state.step, state.error or "see the server log")
            seen.add(phase)
            now = time.monotonic()
            if now >= deadline:
                raise ClientError(
                    f"the server's training did not finish within {timeout:.0f}s (phase {phase!r}, "
                    f"step {state.step}/{state.max_steps}, {state.releases} releases from "
                    f"{state.clients_with_releases} client(s)); raise --wait-timeout, or pass "
                    "--no-wait-for-server to sample from the server's current model"
                )
            if now - last_log >= WAIT_LOG_SECONDS:
                log.info("waiting for the server's training: phase %s, step %d/%d, loss %.4f",
                         phase, state.step, state.max_steps, state.last_loss)
                last_log = now
            sleep(min(poll_interval, max(0.0, deadline - now)))
