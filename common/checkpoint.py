"""One checkpoint format for every trainer, written by one atomic swap and read by one resume.

A checkpoint is a folder ``<root>/latest`` holding

- ``model/`` the trained weights (diffusers ``save_pretrained``) and ``collafuse.json`` metadata;
- ``ema/``   the EMA weights, the model that samples (an ordinary diffusers UNet);
- ``trainer.pt`` the core's state: optimizer, lr schedule, generator, step, loss history, the update
  guard's running norm, and the caller's extra fields (e.g. the server's wall time).

It is written into ``<root>/tmp-*`` and swapped in with one rename; at every instant ``latest`` or
``previous`` is complete, and ``recover`` finishes a swap a crash interrupted. A failed write removes its
``tmp-*`` folder (``recover`` removes any left by a crash).

Going back: with ``keep`` > 1 the checkpoint a save replaces is not deleted but moved to
``<root>-history/step-<N>`` (the newest ``keep - 1`` are kept), so ``list_checkpoints`` shows ``keep`` of
them and ``rollback`` makes an older one ``latest`` again (what it replaces, and every newer one, go to
``<root>-discarded/<time>/``, never deleted). Only finite weights are written (``NonFiniteCheckpoint``),
and ``load`` resumes from the newest checkpoint whose weights and optimizer state are finite, moving any
newer non-finite one aside.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers.models import UNet2DModel

from collafuse.common.config import TrainOptions
from collafuse.common.files import fsync_dir, replace_folder, restore_folder
from collafuse.common.models import META_FILE, load_model, save_model
from collafuse.common.train_loop import Ema, TrainCore, UpdateGuard, all_finite

log = logging.getLogger(__name__)

LATEST = "latest"
PREVIOUS = "previous"
STATE_FILE = "trainer.pt"
MODEL = "model"
EMA = "ema"
HISTORY_SUFFIX = "-history"
DISCARDED_SUFFIX = "-discarded"
STEP_PREFIX = "step-"


class CheckpointError(RuntimeError):
    """A checkpoint on disk cannot be resumed from; the message says what to do."""


class NonFiniteCheckpoint(CheckpointError):
    """The weights or optimizer state to save hold NaN or Inf: nothing was written."""


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint read back: weights on ``device``, ``meta`` as saved, ``state`` for ``TrainCore``."""

    folder: Path
    model: UNet2DModel
    ema: UNet2DModel
    meta: dict[str, Any]
    state: dict[str, Any]


@dataclass(frozen=True)
class CheckpointInfo:
    """One checkpoint on disk, as ``list_checkpoints`` finds it (its weights are not read)."""

    folder: Path
    step: int
    latest: bool
    saved_at: float  # the folder's modification time


def latest(root: Path) -> Path:
    return Path(root) / LATEST


def history(root: Path) -> Path:
    """Where older checkpoints are kept: beside ``root``, so that ``root`` holds only ``latest``."""
    root = Path(root)
    return root.with_name(root.name + HISTORY_SUFFIX)


def discarded(root: Path) -> Path:
    root = Path(root)
    return root.with_name(root.name + DISCARDED_SUFFIX)


def saved_step(folder: Path) -> int | None:
    """The step a checkpoint folder was saved at (from its model's metadata), None when unreadable."""
    try:
        return int(json.loads((Path(folder) / MODEL / META_FILE).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save(root: Path, core: TrainCore, meta: dict[str, Any], extra: dict[str, Any] | None = None,
         *, durable: bool = True, keep: int = 1) -> Path:
    """Write ``core``'s model, EMA and state under ``root/tmp-*`` and swap it in as ``root/latest``.

    Call from the training thread or while it is not running (the weights must not move meanwhile).
    Raises ``NonFiniteCheckpoint`` (nothing written) when the weights, EMA or optimizer state hold NaN/Inf,
    and the OSError of a failed write after removing its ``tmp-*`` folder (``latest`` is untouched then).
    With ``keep`` > 1 the replaced checkpoint moves to ``history(root)``, which keeps the newest ``keep - 1``.
    """
    if not core.finite():
        raise NonFiniteCheckpoint(
            f"not saving step {core.step} to {root}: the weights, EMA or optimizer state hold NaN or Inf; the "
            "newest finite checkpoint stays in place"
        )
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"tmp-{uuid.uuid4().hex}"
    meta = {**meta, "step": core.step}
    try:
        save_model(core.model, tmp / MODEL, {**meta, "role": "model"})
        save_model(core.ema.model, tmp / EMA, {**meta, "role": "ema"})
        torch.save({**core.state_dict(), "meta": meta, "extra": extra or {}}, tmp / STATE_FILE)
        target = latest(root)
        if keep > 1:
            _swap_keeping(tmp, target, root / PREVIOUS, history(root), durable=durable)
            _prune(history(root), keep - 1)
        else:
            replace_folder(tmp, target, root / PREVIOUS, durable=durable)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    core.saved_step = core.step
    return target


def _swap_keeping(tmp: Path, folder: Path, aside: Path, kept: Path, *, durable: bool) -> None:
    """``replace_folder``, but the replaced folder moves to ``kept/step-<N>`` instead of being deleted."""

    def keep(replaced: Path) -> None:
        step = saved_step(replaced)
        if step is None:
            return  # not a checkpoint: replace_folder deletes it
        kept.mkdir(parents=True, exist_ok=True)
        dest = kept / f"{STEP_PREFIX}{step:09d}"
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(replaced, dest)
        if durable:
            fsync_dir(kept)

    replace_folder(tmp, folder, aside, durable=durable, dispose=keep)


def _history_entries(kept: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every kept checkpoint, newest step first."""
    if not kept.is_dir():
        return []
    entries = []
    for folder in kept.iterdir():
        if folder.is_dir() and folder.name.startswith(STEP_PREFIX) and folder.name[len(STEP_PREFIX):].isdigit():
            entries.append((int(folder.name[len(STEP_PREFIX):]), folder))
    return sorted(entries, reverse=True)


def _prune(kept: Path, count: int) -> None:
    for _, folder in _history_entries(kept)[max(0, count):]:
        shutil.rmtree(folder, ignore_errors=True)


def list_checkpoints(root: Path) -> list[CheckpointInfo]:
    """``latest`` (when there is one) and the kept ones, newest first."""
    root = Path(root)
    found = []
    target = latest(root)
    if target.is_dir():
        found.append(CheckpointInfo(target, saved_step(target) or 0, True, target.stat().st_mtime))
    for step, folder in _history_entries(history(root)):
        found.append(CheckpointInfo(folder, step, False, folder.stat().st_mtime))
    return found


def rollback(root: Path, step: int) -> Path:
    """Make the kept checkpoint of ``step`` the latest again; the current latest and every kept checkpoint newer
    than ``step`` move to ``discarded(root)/<time>/`` (nothing is deleted). Only while no trainer runs."""
    root = Path(root)
    chosen = next((folder for s, folder in _history_entries(history(root)) if s == step), None)
    if chosen is None:
        current = saved_step(latest(root))
        if current == step:
            return latest(root)
        kept = ", ".join(str(s) for s, _ in _history_entries(history(root))) or "none"
        raise CheckpointError(f"no kept checkpoint of step {step} under {history(root)} (kept steps: {kept})")
    bin_ = discarded(root) / time.strftime("%Y%m%dT%H%M%S")
    bin_.mkdir(parents=True, exist_ok=True)
    for s, folder in _history_entries(history(root)):
        if s > step:
            os.replace(folder, bin_ / folder.name)
    target = latest(root)
    if target.exists():
        os.replace(target, bin_ / f"latest-{STEP_PREFIX}{saved_step(target) or 0:09d}")
    # A crash here leaves no latest: recover() promotes the newest kept checkpoint, which is ``chosen``.
    os.replace(chosen, target)
    fsync_dir(root)
    log.warning("rolled %s back to step %d; what it replaced is in %s", root, step, bin_)
    return target


def recover(root: Path) -> Path | None:
    """The checkpoint to resume from, repairing an interrupted swap or rollback; drops stale tmp-* folders."""
    root = Path(root)
    if not root.is_dir():
        if not history(root).is_dir():
            return None
        root.mkdir(parents=True)
    for stale in root.glob("tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    target = latest(root)
    if restore_folder(target, root / PREVIOUS):
        log.warning("the last checkpoint swap in %s was interrupted; resuming from the previous checkpoint", root)
    if not target.exists():
        kept = _history_entries(history(root))
        if kept:
            os.replace(kept[0][1], target)
            log.warning("%s had no latest checkpoint (an interrupted rollback?): the kept one of step %d is latest",
                        root, kept[0][0])
    return target if target.exists() else None


def read(folder: Path, device: torch.device) -> Checkpoint:
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


def is_finite(saved: Checkpoint) -> bool:
    """Whether a checkpoint's weights, EMA weights and optimizer state hold no NaN or Inf."""
    tensors: list[torch.Tensor] = [*saved.model.parameters(), *saved.ema.parameters()]
    for per_param in (saved.state.get("optimizer") or {}).get("state", {}).values():
        tensors.extend(v for v in per_param.values() if isinstance(v, torch.Tensor))
    return all_finite(tensors)


def load(root: Path, device: torch.device, *, repair: bool = True) -> Checkpoint | None:
    """The newest finite checkpoint under ``root`` (None where there is none).

    A ``latest`` whose weights or optimizer state hold NaN/Inf is moved to ``discarded(root)`` and the newest
    finite kept checkpoint takes its place; CheckpointError when none is finite. ``repair=False`` reads only
    (a data-parallel replica beside the rank that repairs): it returns the newest finite one and moves nothing.
    """
    if not repair:
        return _newest_finite(Path(root), device)
    folder = recover(root)
    if folder is None:
        return None
    while True:
        saved = read(folder, device)
        if is_finite(saved):
            return saved
        step = saved_step(folder)
        bin_ = discarded(Path(root)) / time.strftime("%Y%m%dT%H%M%S")
        bin_.mkdir(parents=True, exist_ok=True)
        aside = bin_ / f"nonfinite-{STEP_PREFIX}{step or 0:09d}-{uuid.uuid4().hex[:6]}"
        os.replace(folder, aside)
        log.error("the checkpoint of step %s in %s holds NaN or Inf: moved to %s", step, root, aside)
        folder = recover(root)  # promotes the newest kept checkpoint, if any
        if folder is None:
            raise CheckpointError(
                f"no finite checkpoint under {root} (non-finite ones were moved to {discarded(Path(root))}): "
                "remove that folder's contents to train from scratch, or restore a checkpoint you trust"
            )


def _newest_finite(root: Path, device: torch.device) -> Checkpoint | None:
    candidates = [latest(root)] if latest(root).is_dir() else []
    if not candidates and (root / PREVIOUS).is_dir():
        candidates = [root / PREVIOUS]
    candidates += [folder for _, folder in _history_entries(history(root))]
    if not candidates:
        return None
    for folder in candidates:
        saved = read(folder, device)
        if is_finite(saved):
            return saved
    raise CheckpointError(f"no finite checkpoint under {root}: the server's rank 0 reports what to do")


def resume_core(checkpoint: Checkpoint, options: TrainOptions, device: torch.device,
                lock: threading.Lock | None = None, guard: UpdateGuard | None = None) -> TrainCore:
    """A ``TrainCore`` that continues ``checkpoint`` exactly where it stopped."""
    core = TrainCore(checkpoint.model, options, device, ema=Ema(checkpoint.ema, options.ema_decay), lock=lock,
                     guard=guard)
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
