"""One checkpoint format for every trainer, written by one atomic swap and read by one resume.

A checkpoint is a folder ``<root>/latest`` holding

- ``model/`` the trained weights (diffusers ``save_pretrained``) and ``collafuse.json`` metadata;
- ``ema/``   the EMA weights, the model that samples (an ordinary diffusers UNet);
- ``trainer.pt`` the core's state: optimizer, lr schedule, generator, step, loss history, and the
  caller's extra fields (e.g. the server's wall time).

It is written into ``<root>/tmp-*`` and swapped in with ``common.files.replace_folder``; at every instant
``latest`` or ``previous`` is complete, and ``recover`` finishes a swap a crash interrupted.
"""

from __future__ import annotations

import logging
import shutil
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers.models import UNet2DModel

from collafuse.common.files import replace_folder, restore_folder
from collafuse.common.models import load_model, save_model
from collafuse.common.settings import TrainOptions
from collafuse.common.train_loop import Ema, TrainCore

log = logging.getLogger(__name__)

LATEST = "latest"
PREVIOUS = "previous"
STATE_FILE = "trainer.pt"
MODEL = "model"
EMA = "ema"


class CheckpointError(RuntimeError):
    """A checkpoint on disk cannot be resumed from; the message says what to do."""


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint read back: weights on ``device``, ``meta`` as saved, ``state`` for ``TrainCore``."""

    folder: Path
    model: UNet2DModel
    ema: UNet2DModel
    meta: dict[str, Any]
    state: dict[str, Any]


def latest(root: Path) -> Path:
    return Path(root) / LATEST


def save(root: Path, core: TrainCore, meta: dict[str, Any], extra: dict[str, Any] | None = None,
         *, durable: bool = True) -> Path:
    """Write ``core``'s model, EMA and state under ``root/tmp-*`` and swap it in as ``root/latest``.

    Call from the training thread or while it is not running (the weights must not move meanwhile).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"tmp-{uuid.uuid4().hex}"
    meta = {**meta, "step": core.step}
    save_model(core.model, tmp / MODEL, {**meta, "role": "model"})
    save_model(core.ema.model, tmp / EMA, {**meta, "role": "ema"})
    torch.save({**core.state_dict(), "meta": meta, "extra": extra or {}}, tmp / STATE_FILE)
    target = latest(root)
    replace_folder(tmp, target, root / PREVIOUS, durable=durable)
    core.saved_step = core.step
    return target


def recover(root: Path) -> Path | None:
    """The checkpoint to resume from, repairing an interrupted swap; drops stale tmp-* folders."""
    root = Path(root)
    if not root.is_dir():
        return None
    for stale in root.glob("tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    target = latest(root)
    if restore_folder(target, root / PREVIOUS):
        log.warning("the last checkpoint swap in %s was interrupted; resuming from the previous checkpoint", root)
    return target if target.exists() else None


def load(root: Path, device: torch.device) -> Checkpoint | None:
    """The latest checkpoint under ``root`` (None where there is none)."""
    folder = recover(root)
    if folder is None:
        return None
    state_path = folder / STATE_FILE
    if not state_path.is_file():
        raise CheckpointError(
            f"the checkpoint {folder} is incomplete (no {STATE_FILE}): move it away to train from scratch"
        )
    state = torch.load(state_path, map_location="cpu", weights_only=True)
    model, model_meta = load_model(folder / MODEL, device)
    ema, _ = load_model(folder / EMA, device)
    # Checkpoints written before this module kept their metadata only beside the weights.
    return Checkpoint(folder, model, ema, dict(state.get("meta", model_meta)), state)


def resume_core(checkpoint: Checkpoint, options: TrainOptions, device: torch.device,
                lock: threading.Lock | None = None) -> TrainCore:
    """A ``TrainCore`` that continues ``checkpoint`` exactly where it stopped."""
    core = TrainCore(checkpoint.model, options, device, ema=Ema(checkpoint.ema, options.ema_decay), lock=lock)
    core.load_state_dict(checkpoint.state)
    return core


def set_aside(root: Path, name: str) -> Path | None:
    """Move ``root/latest`` to ``root/<name>`` (replacing an older one there) so a fresh run keeps it."""
    source = latest(root)
    if not source.exists():
        return None
    target = Path(root) / name
    shutil.rmtree(target, ignore_errors=True)
    source.rename(target)
    return target
