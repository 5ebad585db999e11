"""The background trainer of the shared server denoiser: threading, store polling and phases around the
training core (``common.train_loop``), which does the steps, and ``common.checkpoint``, which saves them.

What it learns from comes from the protocol (``server/protocols``): for ambient (docs/design.md §2) minibatches
drawn uniformly from every client's stored releases, each re-noised from its own client's cut, with
classifier-free label drop-out. Checkpoints are written atomically into ``<store>/checkpoints/latest``
(the ``--keep-checkpoints`` newest are kept, ``common/checkpoint.py``) and training resumes from the newest
finite one bit-identically.

A failed save (a full disk) does not stop training: the trainer keeps the error for Status and
``metrics.json``, retries with exponential backoff (``SAVE_RETRY_S`` doubling up to ``SAVE_RETRY_MAX_S``),
and tries once more when it is stopped. Weights that are no longer finite are never saved: the trainer
puts the newest finite checkpoint back instead.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers.models import UNet2DModel

from collafuse.common import checkpoint
from collafuse.common.config import ServerSettings, TrainOptions
from collafuse.common.enums import Phase, phase_name
from collafuse.common.files import write_json_atomic
from collafuse.common.models import build_unet, null_label
from collafuse.common.runtime import resolve_device
from collafuse.common.train_loop import StepResult, TrainCore, UpdateGuard, seeded
from collafuse.server.errors import FingerprintMismatch, StartupError
from collafuse.server.protocols import TRAINING, ServerProtocol, TrainingSource, build_protocols
from collafuse.server.store import ReleaseStore
from collafuse.v1 import collafuse_pb2

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
METRICS_FILE = "metrics.json"
# How often a trainer held off by a split round looks again.
HELD_POLL_S = 0.01
# A failed checkpoint save is retried after this, doubling per failure up to the maximum.
SAVE_RETRY_S = 5.0
SAVE_RETRY_MAX_S = 300.0


def update_guard(settings: ServerSettings) -> UpdateGuard:
    """The training core's update guard from the server's ``--guard-*`` settings."""
    return UpdateGuard(refuse_norm=settings.guard_refuse_norm, spike_factor=settings.guard_spike_factor,
                       warmup_steps=settings.guard_warmup_steps, undo=settings.guard_undo)


@dataclass(frozen=True)
class TrainerState:
    phase: collafuse_pb2.Phase
    step: int
    max_steps: int
    last_loss: float | None
    releases: int
    clients_with_releases: int
    error: str | None = None
    skipped_steps: int = 0
    # Checkpoint saves that failed since the last one that worked, and the last failure (None: saves work).
    save_failures: int = 0
    save_error: str | None = None
    # Updates the guard scaled down (a gradient spike) or refused/undid (common/train_loop.py UpdateGuard).
    clipped_steps: int = 0
    refused_steps: int = 0
    saved_step: int = -1


class Trainer:
    """Owns the training core of the server model; runs it in one background thread."""

    def __init__(
        self,
        settings: ServerSettings,
        store: ReleaseStore,
        fingerprint: str,
        protocols: Mapping[int, ServerProtocol] | None = None,
        *,
        device: torch.device | None = None,
        poll_interval: float = 0.5,
        log_every: int = 50,
        source: TrainingSource[Any] | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.fingerprint = fingerprint
        self.image_shape = settings.image_shape
        self.classes = list(settings.classes)
        self.device = device if device is not None else resolve_device(settings.device)
        self.schedule = settings.schedule()
        self.max_steps = settings.max_steps
        self.checkpoint_dir = store.root / CHECKPOINTS
        self.metrics_path = store.root / METRICS_FILE
        self.poll_interval = poll_interval
        self.log_every = max(1, log_every)
        self.error: str | None = None
        self.options = TrainOptions.from_settings(settings)

        # Guards the EMA weights and the fields state() reads; the training thread holds it briefly.
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._phase: collafuse_pb2.Phase = Phase.PHASE_IDLE
        self._wall_time = 0.0  # training seconds over all runs (resumed from the checkpoint)
        self._run_steps = 0
        self._run_time = 0.0
        self._tic = time.monotonic()
        self._snapshot: tuple[int, UNet2DModel] | None = None
        self.guard = update_guard(settings)
        # Checkpoint saves: failures in a row, the last one's message, and when to try again.
        self.save_failures = 0
        self.save_error: str | None = None
        self._save_retry_at: float | None = None
        self.core = self._resume() or TrainCore(
            # Seeded initial weights: a fresh server with the same settings starts from the same model.
            seeded(settings.seed, lambda: build_unet(settings.model_preset, self.image_shape, len(self.classes))),
            self.options, self.device, lock=self._lock, guard=self.guard,
        )
        # The server's protocols (shared with the servicer): one gives the background trainer its data, and any
        # may hold the weights still for a while (a split round in progress).
        self.protocols = list((protocols or build_protocols(settings, store)).values())
        if source is None:
            trains = next(p for p in self.protocols if p.wire == TRAINING)
            source = trains.training_source(self.device, null_label(self.core.model))
        if source is None:
            raise StartupError("the server's protocol has no training source")
        self.source: TrainingSource[Any] = source
        self.core.frozen = self._frozen  # checked under the model lock before every ambient step
        self._training_started = self.core.step > 0
        # Runs when the training thread ends (data-parallel training releases the other ranks).
        self.on_exit: Callable[[], None] | None = None

    # ---- views of the core ----------------------------------------------------------------
    @property
    def model(self) -> UNet2DModel:
        return self.core.model

    @property
    def ema(self) -> Any:
        return self.core.ema

    # ---- public ---------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="collafuse-trainer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 60.0) -> None:
        """Ask the loop to stop; it writes a checkpoint if it trained since the last one (once more here when the
        loop's last save failed or the loop had ended on an error)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("the trainer did not stop within %.0fs", timeout)
                return
        if self._unsaved():
            self.save_checkpoint()

    def wait_done(self, timeout: float | None = None) -> bool:
        """Block until max_steps are reached (False on timeout)."""
        return self._done.wait(timeout)

    def state(self) -> TrainerState:
        counts = self.store.counts()
        with self._lock:
            losses = self.core.losses
            return TrainerState(
                phase=self._phase,
                step=self.core.step,
                max_steps=self.max_steps,
                last_loss=losses[-1][1] if losses else None,
                releases=sum(counts.values()),
                clients_with_releases=len(counts),
                error=self.error,
                skipped_steps=self.core.skipped_steps,
                save_failures=self.save_failures,
                save_error=self.save_error,
                clipped_steps=self.core.clipped_steps,
                refused_steps=self.core.refused_steps,
                saved_step=self.core.saved_step,
            )

    def ema_snapshot(self) -> tuple[int, UNet2DModel]:
        """(step, a frozen copy of the EMA model): consistent for a whole sampling request.

        Copies are cached per step and never mutated, so concurrent requests may share one.
        """
        with self._lock:
            step = self.core.step
            if self._snapshot is None or self._snapshot[0] != step:
                frozen = copy.deepcopy(self.core.ema.model)
                frozen.eval()
                self._snapshot = (step, frozen)
            return self._snapshot

    # ---- loop -----------------------------------------------------------------------------
    def _finished(self) -> bool:
        return self.max_steps > 0 and self.core.step >= self.max_steps

    def _unsaved(self) -> bool:
        return self.core.step > max(self.core.saved_step, 0)

    def _set_phase(self, phase: collafuse_pb2.Phase) -> None:
        with self._lock:
            if phase != self._phase:
                log.info("trainer: %s -> %s (step %d)", phase_name(self._phase), phase_name(phase), self.core.step)
            self._phase = phase

    def _run(self) -> None:
        started = time.monotonic()
        try:
            while not self._stop.is_set():
                if self._finished():
                    if self._unsaved() and self._save_due():
                        self.save_checkpoint()
                    self._set_phase(Phase.PHASE_DONE)
                    self._done.set()
                    if not self._unsaved():
                        return
                    self._stop.wait(self.poll_interval)  # the final save failed: retry on its schedule
                    continue
                self._retry_save()
                if self._held():
                    continue
                if not self._ready(started):
                    self._set_phase(Phase.PHASE_WAITING)
                    self._stop.wait(self.poll_interval)
                    continue
                self._set_phase(Phase.PHASE_TRAINING)
                # The core trains until max_steps, a stop, or new data (then the store is read again).
                version = self.store.version
                self._tic = time.monotonic()
                self.core.run(
                    self.source.batch, self.source.loss, until=self.max_steps,
                    keep_going=lambda v=version: (  # type: ignore[misc]
                        not self._stop.is_set() and self.store.version == v and not self._held()
                    ),
                    checkpoint=self._scheduled_save, checkpoint_every=self.settings.checkpoint_every,
                    on_step=self._after_step,
                )
        except Exception as exc:  # the server keeps serving; Status shows the trainer idle, with this error
            self.error = f"{type(exc).__name__}: {exc}"
            log.exception("the trainer stopped on an error at step %d", self.core.step)
        finally:
            if self._stop.is_set() and self._unsaved():
                self.save_checkpoint()
            if self._phase != Phase.PHASE_DONE:
                self._set_phase(Phase.PHASE_IDLE)
            if self.on_exit is not None:
                self.on_exit()

    def _frozen(self) -> bool:
        """A protocol holds the weights as they are (a split round is open): no ambient step now."""
        return any(p.frozen() for p in self.protocols)

    def _held(self) -> bool:
        """Wait a moment while the weights are frozen; True if they still are."""
        if self._frozen():
            self._stop.wait(HELD_POLL_S)
        return self._frozen()

    def after_external_step(self, result: StepResult) -> None:
        """A step a protocol applied itself (a split round): checkpointed on the trainer's schedule."""
        if result.refused:
            return
        if result.step % self.settings.checkpoint_every == 0 and result.step != self.core.saved_step:
            self._scheduled_save()
        else:
            self._retry_save()

    def _ready(self, started: float) -> bool:
        """Take in new releases; decide whether there is enough to train on."""
        if self.source.refresh() and len(self.source):
            log.info("trainer: %s", self.source.describe())
        if not len(self.source):
            return False
        if self._training_started:
            return True
        clients = len(self.source.client_ids)
        if clients >= self.settings.min_clients:
            self._training_started = True
        elif time.monotonic() - started >= self.settings.start_timeout:
            log.warning(
                "trainer: only %d of min_clients=%d clients released within %.0fs; training on what is there",
                clients, self.settings.min_clients, self.settings.start_timeout,
            )
            self._training_started = True
        return self._training_started

    def _after_step(self, result: StepResult) -> None:
        self._retry_save()
        now = time.monotonic()
        elapsed, self._tic = now - self._tic, now
        self._wall_time += elapsed
        self._run_time += elapsed
        self._run_steps += 1
        step = result.step
        if result.loss is not None and (step % self.log_every == 0 or step == 1):
            window = [v for _, v in self.core.losses[-self.log_every:]]
            log.info(
                "trainer: step %d/%s loss %.4f (mean of last %d: %.4f), %.1f steps/s, %s",
                step, self.max_steps or "inf", result.loss, len(window), sum(window) / len(window),
                self._run_steps / max(self._run_time, 1e-9), self.source.describe(),
            )

    # ---- checkpoints ----------------------------------------------------------------------
    def _meta(self) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint,
            "preset": self.settings.model_preset,
            "image_shape": list(self.image_shape),
            "classes": self.classes,
            "schedule": self.schedule.model_dump(),
        }

    def save_checkpoint(self) -> Path | None:
        """Swap a complete checkpoint in as ``<store>/checkpoints/latest`` (common.checkpoint's format).

        Never raises for the disk: a failed save is logged, counted, shown in Status and retried later
        (``_retry_save``); None then. Weights that are not finite are not saved: the newest finite checkpoint
        is put back in their place (``_restore_finite``)."""
        try:
            with self.core.model_lock:  # split steps (server/protocols/split.py) step the model from other threads
                latest = checkpoint.save(self.checkpoint_dir, self.core, self._meta(), {"wall_time": self._wall_time},
                                         keep=self.settings.keep_checkpoints)
        except checkpoint.NonFiniteCheckpoint as exc:
            log.error("trainer: %s", exc)
            self._restore_finite()
            return None
        except (OSError, RuntimeError) as exc:  # ENOSPC, EIO; torch's writer raises RuntimeError for them
            self._save_failed(exc)
            return None
        if self.save_failures:
            log.warning("trainer: checkpoint saved at step %d after %d failed attempt(s)", self.core.step,
                        self.save_failures)
        self.save_failures, self.save_error, self._save_retry_at = 0, None, None
        self._write_metrics()
        log.info("trainer: checkpoint at step %d -> %s", self.core.step, latest)
        return latest

    def _save_failed(self, exc: BaseException) -> None:
        self.save_failures += 1
        wait = min(SAVE_RETRY_MAX_S, SAVE_RETRY_S * 2 ** (self.save_failures - 1))
        self._save_retry_at = time.monotonic() + wait
        self.save_error = (f"checkpoint save at step {self.core.step} failed ({type(exc).__name__}: {exc}); is the "
                           f"disk of {self.checkpoint_dir} full? Training goes on; retrying in {wait:.0f}s")
        log.error("trainer: %s (failure %d in a row)", self.save_error, self.save_failures)
        self._write_metrics()

    def _scheduled_save(self) -> None:
        """The every-``checkpoint_every`` save, held back while a failed one backs off: a full disk is not written
        to until then, however often the schedule comes round (a big model's failed save writes gigabytes)."""
        if self._save_due():
            self.save_checkpoint()

    def _save_due(self) -> bool:
        return self._save_retry_at is None or time.monotonic() >= self._save_retry_at

    def _retry_save(self) -> None:
        """Retry a failed save once its backoff has passed."""
        if self._save_retry_at is not None and self._save_due() and self._unsaved():
            self.save_checkpoint()

    def _restore_finite(self) -> None:
        """The weights went non-finite despite the update guard: go back to the newest finite checkpoint
        (or keep training the current weights if there is none)."""
        try:
            saved = checkpoint.load(self.checkpoint_dir, self.device)
        except checkpoint.CheckpointError as exc:
            self.error = f"the weights are not finite and no checkpoint can replace them: {exc}"
            log.error("trainer: %s", self.error)
            return
        if saved is None:
            self.error = "the weights are not finite and there is no checkpoint to go back to"
            log.error("trainer: %s", self.error)
            return
        with self.core.model_lock:
            core = self.core
            core.model.load_state_dict(saved.model.state_dict())
            with self._lock:
                core.ema.model.load_state_dict(saved.ema.state_dict())
                self._snapshot = None  # cached per step: the step number goes back
            core.load_state_dict(saved.state)
        log.error("trainer: non-finite weights replaced by the checkpoint of step %d (%s)", core.step, saved.folder)

    def _write_metrics(self) -> None:
        try:
            self._write_metrics_file()
        except OSError as exc:
            log.warning("trainer: cannot write %s: %s", self.metrics_path, exc)

    def _write_metrics_file(self) -> None:
        counts = self.store.counts()
        payload = {
            "step": self.core.step,
            "max_steps": self.max_steps,
            "losses": [[s, v] for s, v in self.core.losses],
            "skipped_steps": self.core.skipped_steps,
            "clipped_steps": self.core.clipped_steps,
            "refused_steps": self.core.refused_steps,
            "save_failures": self.save_failures,
            "save_error": self.save_error,
            "saved_step": self.core.saved_step,
            "error": self.error,
            "wall_time_s": self._wall_time,
            "steps_per_s": self._run_steps / self._run_time if self._run_time > 0 else None,
            "releases": sum(counts.values()),
            "clients_with_releases": len(counts),
            "device": str(self.device),
            "fingerprint": self.fingerprint,
            "updated_at": time.time(),
        }
        write_json_atomic(self.metrics_path, payload, indent=None, sort_keys=False)

    def _resume(self) -> TrainCore | None:
        try:
            saved = checkpoint.load(self.checkpoint_dir, self.device)
        except checkpoint.CheckpointError as exc:
            raise StartupError(str(exc)) from None
        if saved is None:
            return None
        meta, folder = saved.meta, saved.folder
        if meta.get("fingerprint") != self.fingerprint:
            raise FingerprintMismatch(
                f"the checkpoint {folder} was trained for another schedule, image spec or class list "
                f"(fingerprint {str(meta.get('fingerprint'))[:12]}..., this server: {self.fingerprint[:12]}...): "
                f"start the server with the settings it was trained with, or use a fresh --store"
            )
        if meta.get("preset") != self.settings.model_preset:
            raise StartupError(
                f"the checkpoint {folder} holds a {meta.get('preset')!r} model but --model-preset is "
                f"{self.settings.model_preset!r}: pass --model-preset {meta.get('preset')} or use a fresh --store"
            )
        core = checkpoint.resume_core(saved, self.options, self.device, lock=self._lock, guard=self.guard)
        self._wall_time = float(saved.state.get("extra", saved.state).get("wall_time", 0.0))
        log.info("trainer: resumed from %s at step %d", folder, core.step)
        return core
