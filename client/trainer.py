"""Local training of the client's own small denoiser on its low-noise steps t in [1, cut].

Plain DDPM eps-prediction on the client's private x0 (``common.diffusion.client_loss``),
classifier-free label drop-out, AdamW and an EMA copy that is the model used for
sampling. The model lives in ``<workdir>/model`` (``save_pretrained`` form, with the
EMA weights as the model proper, plus ``train_state.safetensors`` holding the raw
weights and optimizer moments) and is replaced atomically, so an interrupted run
resumes where the last checkpoint left off and an error never leaves a half-written model.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers.models import UNet2DModel
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from collafuse.common.config import ClientSettings
from collafuse.common.diffusion import client_loss
from collafuse.common.files import replace_folder, restore_folder
from collafuse.common.models import (
    as_denoiser,
    build_unet,
    count_parameters,
    drop_labels,
    load_model,
    null_label,
    save_model,
)
from collafuse.common.sampling import derive_seed
from collafuse.common.schedule import ScheduleConfig
from collafuse.common.training import Ema, make_optimizer

log = logging.getLogger(__name__)

MODEL_DIR = "model"
STATE_FILE = "train_state.safetensors"
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


def model_dir(workdir: Path) -> Path:
    return Path(workdir) / MODEL_DIR


def _recover(folder: Path) -> None:
    """Finish a replacement a crash interrupted (``model`` moved aside, ``model.tmp`` not yet in place)."""
    old = folder.with_name(folder.name + ".old")
    if restore_folder(folder, old):
        log.warning("restored %s from %s (an earlier save was interrupted)", folder, old)


def _save(folder: Path, ema: UNet2DModel, raw: UNet2DModel, opt: torch.optim.Optimizer, meta: dict[str, Any]) -> None:
    """Write to a sibling folder, then swap it in: ``folder`` always holds one complete model."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(ema, tmp, meta)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in raw.state_dict().items()}
    for index, state in opt.state_dict()["state"].items():
        for name, value in state.items():
            value = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"opt.{index}.{name}"] = value.detach().cpu().contiguous()
    save_file(tensors, str(tmp / STATE_FILE))
    replace_folder(tmp, folder, folder.with_name(folder.name + ".old"))


def _load_state(folder: Path, raw: UNet2DModel, opt: torch.optim.Optimizer) -> bool:
    path = folder / STATE_FILE
    if not path.is_file():
        return False
    tensors = load_file(str(path))
    raw.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
    return True


def _compatible(meta: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    return [f"{k} {meta.get(k)!r} != {v!r}" for k, v in expected.items() if meta.get(k) != v]


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
) -> TrainResult:
    """Train (or resume training) the client's model up to ``settings.train_steps`` steps in total."""
    if cut == 0:
        log.info("cut 0 (global model): the client owns no timesteps, so there is no local model to train")
        return TrainResult(trained=False)
    if images.shape[0] == 0:
        raise ValueError("no images to train on")
    folder = model_dir(workdir)
    _recover(folder)
    device = torch.device(device)
    identity = {
        "fingerprint": fingerprint,
        "cut": cut,
        "preset": settings.model_preset,
        "image_shape": list(image_shape),
        "num_classes": num_classes,
    }
    raw = build_unet(settings.model_preset, image_shape, num_classes).to(device)
    opt = make_optimizer(raw, settings.lr)
    ema: Ema[UNet2DModel] | None = None
    start, losses, resumed = 0, [], False
    if (folder / "config.json").is_file():
        saved, meta = load_model(folder, device)
        problems = _compatible(meta, identity)
        if not problems:
            ema, start = Ema(saved, settings.ema_decay), int(meta.get("step", 0))
            losses = [(int(s), float(v)) for s, v in meta.get("losses", [])]
            if not _load_state(folder, raw, opt):
                raw.load_state_dict(saved.state_dict())
            resumed = True
            log.info("resuming local training at step %d from %s", start, folder)
        else:
            # Another cut or another server setup: keep the old model aside instead of overwriting it.
            backup = folder.with_name(folder.name + ".prev")
            shutil.rmtree(backup, ignore_errors=True)
            shutil.copytree(folder, backup)
            log.warning("the model in %s does not fit this run (%s); training afresh, old model kept in %s",
                        folder, "; ".join(problems), backup)
    if ema is None:
        ema = Ema(raw, settings.ema_decay)

    target = settings.train_steps
    result = TrainResult(True, start, start, target, losses, 0.0, count_parameters(raw), resumed, folder)
    if start >= target:
        log.info("local model already trained for %d step(s) (target %d); nothing to do", start, target)
        if not (folder / "config.json").is_file():
            _save(folder, ema.model, raw, opt, {**identity, "step": start, "losses": losses})
        return result

    images = images.to(device=device, dtype=torch.float32)
    labels = labels.to(device=device, dtype=torch.long)
    alphas_cumprod = schedule.alphas_cumprod()
    null = null_label(raw)
    denoiser = as_denoiser(raw)
    log.info(
        "training the local %s model (%d parameters) on %d images, t in [1, %d], steps %d..%d, batch %d, device %s",
        settings.model_preset, result.parameters, images.shape[0], cut, start, target, settings.batch_size, device,
    )

    def checkpoint_meta(step: int) -> dict[str, Any]:
        return {**identity, "step": step, "losses": losses, "ema_decay": settings.ema_decay, "lr": settings.lr,
                "seed": settings.seed, "label_dropout": settings.label_dropout}

    started = time.perf_counter()
    log_every = max(1, (target - start) // 10)
    raw.train()
    bar = tqdm(total=target, initial=start, desc="local training", unit="step", disable=progress_disabled(show_progress),
               leave=False)
    try:
        for step in range(start, target):
            # A generator per step: a resumed run draws exactly what an uninterrupted one would.
            gen = torch.Generator().manual_seed(derive_seed(settings.seed, 0, step))
            index = torch.randint(0, images.shape[0], (settings.batch_size,), generator=gen).to(device)
            y = drop_labels(labels[index], null, settings.label_dropout, gen)
            loss = client_loss(denoiser, images[index], y, cut, alphas_cumprod, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            # EMA with the usual warm-up, so short runs are not dominated by the initial weights.
            ema.update(raw, step)
            value = float(loss.detach())
            losses.append((step + 1, value))
            bar.update(1)
            if (step + 1) % 10 == 0:
                bar.set_postfix(loss=f"{value:.4f}")
            if (step + 1 - start) % log_every == 0 or step + 1 == target:
                log.info("local step %d/%d loss %.4f", step + 1, target, value)
            if (step + 1) % checkpoint_every == 0 and step + 1 < target:
                _save(folder, ema.model, raw, opt, checkpoint_meta(step + 1))
            result.step = step + 1
    finally:
        bar.close()
        result.seconds = time.perf_counter() - started
        if result.step > start:
            # Also on Ctrl-C: keep what was trained so far (the swap is atomic).
            _save(folder, ema.model, raw, opt, checkpoint_meta(result.step))
    result.losses = losses
    log.info("local training done: %d step(s) in %.1fs, model in %s", result.steps_run, result.seconds, folder)
    return result
