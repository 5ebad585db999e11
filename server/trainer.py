"""The background trainer of the shared server denoiser (DESIGN 1a, ambient protocol).

It trains on minibatches drawn uniformly from every client's stored releases,
each sample re-noised from its own client's cut, with classifier-free label
drop-out, AdamW and an EMA copy that sampling uses. Checkpoints are written
atomically into ``<store>/checkpoints/latest`` and training resumes from there.
"""

from __future__ import annotations

import copy
import logging
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers.models import UNet2DModel

from collafuse.common.config import ServerSettings
from collafuse.common.diffusion import ambient_server_loss
from collafuse.common.files import replace_folder, restore_folder, write_json_atomic
from collafuse.common.models import as_denoiser, build_unet, drop_labels, load_model, null_label, save_model
from collafuse.common.runtime import resolve_device
from collafuse.common.training import Ema, make_optimizer
from collafuse.server.errors import FingerprintMismatch, StartupError
from collafuse.server.store import ReleaseSet, ReleaseStore

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
LATEST = "latest"
PREVIOUS = "previous"
TRAINER_FILE = "trainer.pt"
METRICS_FILE = "metrics.json"


@dataclass(frozen=True)
class TrainerState:
    phase: str  # "waiting" | "training" | "done" | "idle"
    step: int
    max_steps: int
    last_loss: float | None
    releases: int
    clients_with_releases: int


class Trainer:
    """Owns the server model, its optimizer and EMA; runs in one background thread."""

    def __init__(
        self,
        settings: ServerSettings,
        store: ReleaseStore,
        fingerprint: str,
        *,
        device: torch.device | None = None,
        poll_interval: float = 0.5,
        log_every: int = 50,
    ) -> None:
        self.settings = settings
        self.store = store
        self.fingerprint = fingerprint
        self.image_shape = (settings.channels, settings.image_size, settings.image_size)
        self.classes = list(settings.classes)
        self.device = device if device is not None else resolve_device(settings.device)
        self.schedule = settings.schedule()
        self.max_steps = settings.max_steps
        self.checkpoint_dir = store.root / CHECKPOINTS
        self.metrics_path = store.root / METRICS_FILE
        self.poll_interval = poll_interval
        self.log_every = max(1, log_every)
        self.error: str | None = None

        self._alphas_cumprod = self.schedule.alphas_cumprod()
        # Guards the EMA weights and the fields state() reads; the training thread holds it briefly.
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._phase = "idle"
        self._step = 0
        self._last_loss: float | None = None
        self._losses: list[tuple[int, float]] = []
        self._wall_time = 0.0  # training seconds over all runs (resumed from the checkpoint)
        self._run_steps = 0
        self._run_time = 0.0
        self._checkpoint_step = -1
        self._generator = torch.Generator().manual_seed(settings.seed)
        self._data: ReleaseSet | None = None
        self._data_x: torch.Tensor | None = None
        self._data_version = -1
        self._snapshot: tuple[int, UNet2DModel] | None = None

        # Seeded initial weights: a fresh server with the same settings starts from the same model.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.seed)
            model = build_unet(settings.model_preset, self.image_shape, len(self.classes))
        self.model = model.to(self.device).train()
        self.ema = Ema(self.model, settings.ema_decay)
        self.optimizer = self._make_optimizer()
        self._null = null_label(self.model)
        self._resume()
        self._training_started = self._step > 0

    # ---- public ---------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="collafuse-trainer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 60.0) -> None:
        """Ask the loop to stop; it writes a checkpoint if it trained since the last one."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("the trainer did not stop within %.0fs", timeout)
        elif self._step > self._checkpoint_step and self._step > 0:
            self.save_checkpoint()

    def wait_done(self, timeout: float | None = None) -> bool:
        """Block until max_steps are reached (False on timeout)."""
        return self._done.wait(timeout)

    def state(self) -> TrainerState:
        counts = self.store.counts()
        with self._lock:
            return TrainerState(
                phase=self._phase,
                step=self._step,
                max_steps=self.max_steps,
                last_loss=self._last_loss,
                releases=sum(counts.values()),
                clients_with_releases=len(counts),
            )

    @property
    def loss_history(self) -> list[tuple[int, float]]:
        with self._lock:
            return list(self._losses)

    def ema_snapshot(self) -> tuple[int, UNet2DModel]:
        """(step, a frozen copy of the EMA model): consistent for a whole sampling request.

        Copies are cached per step and never mutated, so concurrent requests may share one.
        """
        with self._lock:
            if self._snapshot is None or self._snapshot[0] != self._step:
                frozen = copy.deepcopy(self.ema.model)
                frozen.eval()
                self._snapshot = (self._step, frozen)
            return self._snapshot

    # ---- loop -----------------------------------------------------------------------------
    def _finished(self) -> bool:
        return self.max_steps > 0 and self._step >= self.max_steps

    def _set_phase(self, phase: str) -> None:
        with self._lock:
            if phase != self._phase:
                log.info("trainer: %s -> %s (step %d)", self._phase, phase, self._step)
            self._phase = phase

    def _run(self) -> None:
        started = time.monotonic()
        try:
            while not self._stop.is_set():
                if self._finished():
                    if self._step > self._checkpoint_step:
                        self.save_checkpoint()
                    self._set_phase("done")
                    self._done.set()
                    return
                if not self._ready(started):
                    self._set_phase("waiting")
                    self._stop.wait(self.poll_interval)
                    continue
                self._set_phase("training")
                self._train_step()
                if self._step % self.settings.checkpoint_every == 0:
                    self.save_checkpoint()
        except Exception as exc:  # the server keeps serving; Status shows the trainer idle
            self.error = f"{type(exc).__name__}: {exc}"
            log.exception("the trainer stopped on an error at step %d", self._step)
        finally:
            if self._phase != "done":
                if self._stop.is_set() and self._step > self._checkpoint_step and self._step > 0:
                    self.save_checkpoint()
                self._set_phase("idle")

    def _ready(self, started: float) -> bool:
        """Reload releases when the store changed; decide whether there is enough to train on."""
        if self.store.version != self._data_version:
            data = self.store.load_all()
            self._data = data
            self._data_x = data.x_cut.to(self.device)
            self._data_version = data.version
            # The whole release set is held in memory (x_cut only); a store far larger than RAM would
            # need a streaming loader here.
            if len(data):
                log.info("trainer: %d releases from %d clients (cuts %s)", len(data), len(data.client_ids), sorted(set(data.cuts.tolist())))
        data = self._data
        if data is None or not len(data):
            return False
        if self._training_started:
            return True
        clients = len(data.client_ids)
        if clients >= self.settings.min_clients:
            self._training_started = True
        elif time.monotonic() - started >= self.settings.start_timeout:
            log.warning(
                "trainer: only %d of min_clients=%d clients released within %.0fs; training on what is there",
                clients, self.settings.min_clients, self.settings.start_timeout,
            )
            self._training_started = True
        return self._training_started

    def _train_step(self) -> None:
        """One AdamW step on a uniform minibatch over all releases (each with its own client's cut)."""
        assert self._data is not None and self._data_x is not None
        data, gen = self._data, self._generator
        tic = time.monotonic()
        # Replication across GPUs (DDP) would shard this minibatch; the rest of the loop stays.
        idx = torch.randint(len(data), (self.settings.batch_size,), generator=gen)
        x_cut = self._data_x[idx.to(self._data_x.device)]
        labels = drop_labels(data.labels[idx], self._null, self.settings.label_dropout, generator=gen)
        loss = ambient_server_loss(as_denoiser(self.model), x_cut, labels, data.cuts[idx], self._alphas_cumprod, generator=gen)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        value = float(loss.detach())
        elapsed = time.monotonic() - tic
        with self._lock:
            self.ema.update(self.model, self._step)
            self._step += 1
            self._last_loss = value
            self._losses.append((self._step, value))
        self._wall_time += elapsed
        self._run_time += elapsed
        self._run_steps += 1
        if self._step % self.log_every == 0 or self._step == 1:
            window = [v for _, v in self._losses[-self.log_every:]]
            log.info(
                "trainer: step %d/%s loss %.4f (mean of last %d: %.4f), %.1f steps/s, %d releases from %d clients",
                self._step, self.max_steps or "inf", value, len(window), sum(window) / len(window),
                self._run_steps / max(self._run_time, 1e-9), len(data), len(data.client_ids),
            )

    def _make_optimizer(self) -> torch.optim.Optimizer:
        return make_optimizer(self.model, self.settings.lr, self.settings.weight_decay)

    # ---- checkpoints ----------------------------------------------------------------------
    def _meta(self) -> dict[str, Any]:
        return {
            "step": self._step,
            "fingerprint": self.fingerprint,
            "preset": self.settings.model_preset,
            "image_shape": list(self.image_shape),
            "classes": self.classes,
            "schedule": self.schedule.model_dump(),
        }

    def save_checkpoint(self) -> Path:
        """Write model/, ema/ and trainer.pt into tmp-*, then swap it in as ``latest`` atomically.

        Call from the training thread or while it is not running (the weights must not move meanwhile).
        """
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.checkpoint_dir / f"tmp-{uuid.uuid4().hex}"
        meta = self._meta()
        save_model(self.model, tmp / "model", {**meta, "role": "server-model"})
        save_model(self.ema.model, tmp / "ema", {**meta, "role": "server-ema"})
        torch.save(
            {
                "step": self._step,
                "fingerprint": self.fingerprint,
                "optimizer": self.optimizer.state_dict(),
                "generator": self._generator.get_state(),
                "losses": [[s, v] for s, v in self._losses],
                "wall_time": self._wall_time,
            },
            tmp / TRAINER_FILE,
        )
        # At every instant either latest or previous is a complete checkpoint (_recover puts previous back).
        latest = self.checkpoint_dir / LATEST
        replace_folder(tmp, latest, self.checkpoint_dir / PREVIOUS, durable=True)
        self._checkpoint_step = self._step
        self._write_metrics()
        log.info("trainer: checkpoint at step %d -> %s", self._step, latest)
        return latest

    def _write_metrics(self) -> None:
        counts = self.store.counts()
        payload = {
            "step": self._step,
            "max_steps": self.max_steps,
            "losses": [[s, v] for s, v in self._losses],
            "wall_time_s": self._wall_time,
            "steps_per_s": self._run_steps / self._run_time if self._run_time > 0 else None,
            "releases": sum(counts.values()),
            "clients_with_releases": len(counts),
            "device": str(self.device),
            "fingerprint": self.fingerprint,
            "updated_at": time.time(),
        }
        write_json_atomic(self.metrics_path, payload, indent=None, sort_keys=False)

    def _recover(self) -> Path | None:
        """The checkpoint to resume from, repairing an interrupted swap; drops stale tmp-* folders."""
        if not self.checkpoint_dir.is_dir():
            return None
        for stale in self.checkpoint_dir.glob("tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        latest = self.checkpoint_dir / LATEST
        if restore_folder(latest, self.checkpoint_dir / PREVIOUS):
            log.warning("trainer: the last checkpoint swap was interrupted; resuming from the previous checkpoint")
        return latest if latest.exists() else None

    def _resume(self) -> None:
        latest = self._recover()
        if latest is None:
            return
        state_path = latest / TRAINER_FILE
        if not state_path.is_file():
            raise StartupError(f"the checkpoint {latest} is incomplete (no {TRAINER_FILE}): move it away to train from scratch")
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        if state.get("fingerprint") != self.fingerprint:
            raise FingerprintMismatch(
                f"the checkpoint {latest} was trained for another schedule, image spec or class list "
                f"(fingerprint {str(state.get('fingerprint'))[:12]}..., this server: {self.fingerprint[:12]}...): "
                f"start the server with the settings it was trained with, or use a fresh --store"
            )
        model, meta = load_model(latest / "model", self.device)
        if meta.get("preset") != self.settings.model_preset:
            raise StartupError(
                f"the checkpoint {latest} holds a {meta.get('preset')!r} model but --model-preset is "
                f"{self.settings.model_preset!r}: pass --model-preset {meta.get('preset')} or use a fresh --store"
            )
        ema_model, _ = load_model(latest / "ema", self.device)
        self.model = model.train()
        self.ema = Ema(ema_model, self.settings.ema_decay)
        self.optimizer = self._make_optimizer()
        self.optimizer.load_state_dict(state["optimizer"])
        self._generator.set_state(state["generator"])
        self._step = int(state["step"])
        self._checkpoint_step = self._step
        self._losses = [(int(s), float(v)) for s, v in state.get("losses", [])]
        self._last_loss = self._losses[-1][1] if self._losses else None
        self._wall_time = float(state.get("wall_time", 0.0))
        log.info("trainer: resumed from %s at step %d", latest, self._step)
