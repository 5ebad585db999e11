"""Local training of the client's own small denoiser on its low-noise steps t in [1, cut].

Plain DDPM eps-prediction on the client's private x0 (``common.diffusion.client_loss``; t drawn uniformly or, with
``--local-timesteps linear``, in proportion to t) with classifier-free label drop-out, run by the training core
(``common.train_loop``) that the server uses too. Checkpoints have the server's format (``common.checkpoint``):
``<workdir>/checkpoints/latest`` holds ``model/``, ``ema/`` (the model used for sampling, an ordinary diffusers UNet)
and ``trainer.pt``, swapped in atomically, so an interrupted run resumes exactly where the last checkpoint left off
and an error never leaves a half-written model.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from collafuse.client.errors import ClientError
from collafuse.common import checkpoint
from collafuse.common.config import ClientSettings, TrainOptions
from collafuse.common.diffusion import Denoiser, client_loss
from collafuse.common.models import build_unet, count_parameters, drop_labels, null_label
from collafuse.common.schedule import Cut, ScheduleConfig
from collafuse.common.train_loop import StepResult, TrainCore, seeded

if TYPE_CHECKING:
    from collafuse.client.shared_model import InitialWeights

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
# Where a checkpoint made for another cut or server setup is kept when training starts afresh.
SET_ASIDE = "replaced"
CHECKPOINT_EVERY = 250


@dataclass
class TrainResult:
    trained: bool
    start_step: int = 0
    step: int = 0
    target_steps: int = 0
    losses: list[tuple[int, float]] = field(default_factory=list)
    seconds: float = 0.0
    parameters: int = 0
    resumed: bool = False
    model_dir: Path | None = None

    @property
    def steps_run(self) -> int:
        return self.step - self.start_step


def progress_disabled(show: bool | None) -> bool | None:
    """tqdm's ``disable``: None (the default) shows bars only on a terminal, so logs of sims stay clean."""
    if show is None:
        return None
    return not show


def checkpoint_root(workdir: Path) -> Path:
    return Path(workdir) / CHECKPOINTS


def model_dir(workdir: Path) -> Path:
    """The EMA model of the latest checkpoint: the model that samples."""
    return checkpoint.latest(checkpoint_root(workdir)) / checkpoint.EMA


def _compatible(meta: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    return [f"{k} {meta.get(k)!r} != {v!r}" for k, v in expected.items() if meta.get(k) != v]



@dataclass(frozen=True)
class _ClientBatch:
    x0: torch.Tensor
    labels: torch.Tensor


def _save(root: Path, core: TrainCore, meta: dict[str, Any]) -> None:
    """``checkpoint.save``; a full or failing disk is a ClientError that says what to do (the last checkpoint is intact)."""
    try:
        checkpoint.save(root, core, meta, durable=False)
    except checkpoint.CheckpointError:
        raise
    except (OSError, RuntimeError) as exc:  # torch's writer raises RuntimeError for ENOSPC and EIO
        saved = f"step {core.saved_step}" if core.saved_step >= 0 else "the start"
        raise ClientError(
            f"cannot save the local model at step {core.step} under {root} ({type(exc).__name__}: {exc}); is that disk "
            f"full? Free space there and run again: local training resumes from {saved}"
        ) from exc


def train_local(
    *,
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    image_shape: tuple[int, int, int],
    schedule: ScheduleConfig,
    cut: int,
    fingerprint: str,
    workdir: Path,
    settings: ClientSettings,
    device: torch.device | str = "cpu",
    show_progress: bool | None = None,
    checkpoint_every: int = CHECKPOINT_EVERY,
    init: InitialWeights | None = None,
) -> TrainResult:
    """Train (or resume training) the client's model up to ``settings.train_steps`` steps in total; a fresh model
    starts from ``init`` (the shared model's weights, ``--init-from-server``) when given, else from scratch."""
    if Cut(cut, schedule.num_train_timesteps).global_model:
        log.info("cut 0 (global model): the client owns no timesteps, so there is no local model to train")
        return TrainResult(trained=False)
    if images.shape[0] == 0:
        raise ValueError("no images to train on")
    root = checkpoint_root(workdir)
    device = torch.device(device)
    identity = {
        "fingerprint": fingerprint,
        "cut": cut,
        "preset": init.preset if init is not None else settings.model_preset,
        "image_shape": list(image_shape),
        "num_classes": num_classes,
        # A model started from other shared weights (or from scratch) is another model: not resumed.
        "init_sha256": init.sha256 if init is not None else None,
    }
    options = TrainOptions.from_settings(settings)
    core, resumed = _resume(root, identity, options, device), False
    if core is not None:
        resumed = True
        log.info("resuming local training at step %d from %s", core.step, checkpoint.latest(root))
    elif init is not None:
        core = TrainCore(init.model, options, device)
    else:
        core = TrainCore(
            seeded(settings.seed, lambda: build_unet(settings.model_preset, image_shape, num_classes)), options, device
        )
    meta = {**identity, "ema_decay": settings.ema_decay, "lr": settings.lr, "seed": settings.seed,
            "label_dropout": settings.label_dropout, "local_timesteps": settings.local_timesteps}
    start, target = core.step, settings.train_steps
    result = TrainResult(True, start, start, target, list(core.losses), 0.0, count_parameters(core.model), resumed,
                         model_dir(workdir))
    if start >= target:
        log.info("local model already trained for %d step(s) (target %d); nothing to do", start, target)
        if not resumed:
            _save(root, core, meta)
        return result

    images = images.to(device=device, dtype=torch.float32)
    labels = labels.to(device=device, dtype=torch.long)
    alphas_cumprod = schedule.alphas_cumprod()
    null = null_label(core.model)

    def batches(gen: torch.Generator) -> _ClientBatch:
        index = torch.randint(0, images.shape[0], (settings.batch_size,), generator=gen).to(device)
        return _ClientBatch(images[index], drop_labels(labels[index], null, settings.label_dropout, gen))

    def loss(net: Denoiser, batch: _ClientBatch, generator: torch.Generator) -> torch.Tensor:
        return client_loss(net, batch.x0, batch.labels, cut, alphas_cumprod, generator, settings.local_timesteps)

    log.info(
        "training the local %s model (%d parameters) on %d images, t in [1, %d] (%s), steps %d..%d, batch %d, device %s",
        identity["preset"], result.parameters, images.shape[0], cut, settings.local_timesteps, start, target,
        settings.batch_size, device,
    )
    started = time.perf_counter()
    log_every = max(1, (target - start) // 10)
    bar = tqdm(total=target, initial=start, desc="local training", unit="step", disable=progress_disabled(show_progress),
               leave=False)

    def on_step(step: StepResult) -> None:
        if step.loss is None:
            return
        bar.update(1)
        if step.step % 10 == 0:
            bar.set_postfix(loss=f"{step.loss:.4f}")
        if (step.step - start) % log_every == 0 or step.step == target:
            log.info("local step %d/%d loss %.4f", step.step, target, step.loss)

    try:
        core.run(batches, loss, until=target, checkpoint=lambda: _save(root, core, meta),
                 checkpoint_every=checkpoint_every, on_step=on_step)
    finally:
        bar.close()
        result.seconds = time.perf_counter() - started
        result.step = core.step
        if core.step > core.saved_step:
            # Also on Ctrl-C: keep what was trained so far (the swap is atomic).
            _save(root, core, meta)
    result.losses = list(core.losses)
    log.info("local training done: %d step(s) in %.1fs, model in %s", result.steps_run, result.seconds, result.model_dir)
    return result


def _resume(root: Path, identity: dict[str, Any], options: TrainOptions, device: torch.device) -> TrainCore | None:
    """The core of the latest checkpoint when it fits this run; one that does not is set aside, not overwritten."""
    try:
        saved = checkpoint.load(root, device)
    except checkpoint.CheckpointError as exc:
        log.warning("%s; training afresh", exc)
        checkpoint.set_aside(root, SET_ASIDE)
        return None
    if saved is None:
        return None
    problems = _compatible(saved.meta, identity)
    if problems:
        # Another cut or another server setup: keep the old model aside instead of overwriting it.
        kept = checkpoint.set_aside(root, SET_ASIDE)
        log.warning("the model in %s does not fit this run (%s); training afresh, old model kept in %s",
                    saved.folder, "; ".join(problems), kept)
        return None
    return checkpoint.resume_core(saved, options, device)
