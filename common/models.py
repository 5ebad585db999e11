"""Model factory: diffusers ``UNet2DModel``, class-conditional with a reserved null class.

Label ``num_classes`` (the last embedding) means "no label": it is used for
classifier-free drop-out during training and for the unconditional branch of
guidance. Models take diffusers' 0-based timesteps, so a saved model is an
ordinary diffusers UNet usable in any DDPM/DDIM pipeline; ``as_denoiser``
adapts it to the paper's 1-based t.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import safetensors
import torch
from diffusers.models import UNet2DModel  # not `diffusers`: its TYPE_CHECKING imports bind a dummy

from collafuse.common.diffusion import Denoiser

PresetName = Literal["tiny", "small", "base", "paper"]

# Named sizes. The client's default is "tiny" (edge devices); the server's "small".
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"block_out_channels": (32, 64), "layers_per_block": 1, "attention": False, "norm_num_groups": 8},
    "small": {"block_out_channels": (32, 64), "layers_per_block": 1, "attention": True, "norm_num_groups": 8},
    "base": {"block_out_channels": (64, 128, 128), "layers_per_block": 2, "attention": True, "norm_num_groups": 32},
    # DDPM's CIFAR-10 size (35.8 M parameters at 64x64x3): the GPU server benchmark's model.
    "paper": {"block_out_channels": (128, 256, 256, 256), "layers_per_block": 2, "attention": True,
              "norm_num_groups": 32},
}


def build_unet(preset: str, image_shape: tuple[int, int, int], num_classes: int) -> UNet2DModel:
    """A fresh class-conditional UNet for images of shape (C, H, W) and ``num_classes`` labels."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}: choose one of {sorted(PRESETS)}")
    cfg = PRESETS[preset]
    channels, height, width = image_shape
    levels = len(cfg["block_out_channels"])
    if height != width:
        raise ValueError(f"images must be square, got {height}x{width}")
    if height % (2 ** (levels - 1)) != 0:
        raise ValueError(f"image side {height} must be divisible by {2 ** (levels - 1)} for preset {preset!r}")
    down = ["DownBlock2D"] * levels
    up = ["UpBlock2D"] * levels
    if cfg["attention"]:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    return UNet2DModel(
        sample_size=height,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=cfg["block_out_channels"],
        layers_per_block=cfg["layers_per_block"],
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        norm_num_groups=cfg["norm_num_groups"],
        num_class_embeds=num_classes + 1,
    )


def null_label(model: UNet2DModel) -> int:
    return int(model.config["num_class_embeds"]) - 1


def as_denoiser(model: UNet2DModel, guidance_scale: float = 1.0, forward: torch.nn.Module | None = None) -> Denoiser:
    """eps_hat(x_t, t, y) with the paper's 1-based t; guidance > 1 mixes in the null-label branch.

    ``forward`` (default ``model``) is what is called: a DistributedDataParallel wrapper of ``model``.
    """
    null = null_label(model)
    call = model if forward is None else forward

    def denoise(x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        timesteps = (t - 1).to(x.device)
        labels = labels.to(x.device)
        if guidance_scale == 1.0:
            return call(x, timesteps, class_labels=labels).sample
        both = call(
            torch.cat([x, x]), torch.cat([timesteps, timesteps]),
            class_labels=torch.cat([labels, torch.full_like(labels, null)]),
        ).sample
        cond, uncond = both.chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    return denoise


def drop_labels(labels: torch.Tensor, null: int, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Classifier-free drop-out: replace each label by the null label with probability p."""
    mask = torch.rand(labels.shape, generator=generator) < p
    return torch.where(mask.to(labels.device), torch.full_like(labels, null), labels)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


META_FILE = "collafuse.json"


def save_model(model: UNet2DModel, folder: Path, meta: dict[str, Any]) -> None:
    """``save_pretrained`` (safetensors + config.json) plus CollaFuse metadata (fingerprint, cut, step)."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        model.save_pretrained(folder, safe_serialization=True)
    except safetensors.SafetensorError as exc:
        # Its writer reports ENOSPC and EIO as SafetensorError, not OSError: callers that survive a full or failing
        # disk (the trainers' checkpoint saves) catch OSError.
        if "I/O error" not in str(exc):
            raise
        raise OSError(f"cannot write the weights under {folder}: {exc}") from exc
    (folder / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))


def load_model(folder: Path, device: str | torch.device = "cpu") -> tuple[UNet2DModel, dict[str, Any]]:
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no model in {folder}: expected config.json and weights from save_pretrained")
    # low_cpu_mem_usage needs `accelerate`; without it diffusers warns on every load.
    model = UNet2DModel.from_pretrained(folder, low_cpu_mem_usage=False).to(device)
    model.eval()
    meta_path = folder / META_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return model, meta
