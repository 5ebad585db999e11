"""CLIP ViT-B/32 image embeddings from local weights, for the Fréchet CLIP Distance (FCD) of the paper.

No wheel ships CLIP weights and nothing is downloaded at run time, so the user points
at weights on disk; either way the model runs in ``transformers``' ``CLIPVisionModelWithProjection``:

- a Hugging Face CLIP folder (``config.json`` + ``model.safetensors``/``pytorch_model.bin``,
  e.g. a local copy of ``openai/clip-vit-base-patch32``), loaded with ``local_files_only=True``;
- an open_clip or OpenAI checkpoint file (``open_clip_pytorch_model.bin``/``.safetensors``,
  or OpenAI's ``ViT-B-32.pt``), whose image tower ``clip_checkpoint`` converts — open_clip
  itself is not needed (it imports torchvision, which must match torch exactly).

Features are the projected image embeddings (512-d for ViT-B/32), not L2-normalised, as in
the FCD reference implementation (``model.encode_image``). Preprocessing follows CLIP's:
0..255 pixels (rounded), grey to RGB, bicubic resize of the short side to 224 with
antialiasing, centre crop 224, normalisation by CLIP's channel mean and std.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from collafuse.evaluation.metrics.clip_checkpoint import Activation, load_open_clip_vision
from collafuse.evaluation.metrics.errors import MetricsError
from collafuse.evaluation.metrics.inception import to_rgb_pixels

log = logging.getLogger(__name__)

CLIP_SIZE = 224
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
WEIGHTS_ENV = "COLLAFUSE_CLIP_WEIGHTS"

HOW_TO_PASS = (
    "CLIP features need local ViT-B/32 weights and nothing is downloaded at run time: pass --clip-weights DIR, "
    "a Hugging Face CLIP folder with config.json and model.safetensors (e.g. a copy of openai/clip-vit-base-patch32), "
    "or --clip-weights FILE, an open_clip or OpenAI checkpoint such as open_clip_pytorch_model.bin or ViT-B-32.pt "
    f"(for open_clip's LAION-trained ViT-B-32 add --clip-activation gelu); or set {WEIGHTS_ENV}. "
    "Both need `pip install transformers` (or `pip install collafuse[clip]`)"
)


def _importable(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def clip_preprocess(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (N, 1|3, H, W) -> CLIP's normalised (N, 3, 224, 224) input."""
    pixels = to_rgb_pixels(images) / 255.0
    height, width = pixels.shape[-2:]
    scale = CLIP_SIZE / min(height, width)
    new_size = (max(CLIP_SIZE, round(height * scale)), max(CLIP_SIZE, round(width * scale)))
    if (height, width) != new_size:
        pixels = nn.functional.interpolate(pixels, size=new_size, mode="bicubic", align_corners=False, antialias=True)
    top = (new_size[0] - CLIP_SIZE) // 2
    left = (new_size[1] - CLIP_SIZE) // 2
    pixels = pixels[..., top : top + CLIP_SIZE, left : left + CLIP_SIZE].clamp(0.0, 1.0)
    mean = torch.tensor(CLIP_MEAN, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=pixels.device).view(1, 3, 1, 1)
    return (pixels - mean) / std


class ClipFeatures(nn.Module):
    """Images in [-1, 1] -> (N, d) CLIP image embeddings from local weights."""

    def __init__(self, weights: Path | str | None = None, device: str | torch.device = "cpu",
                 activation: Activation = "quick_gelu") -> None:
        super().__init__()
        chosen = weights if weights is not None else os.environ.get(WEIGHTS_ENV) or None
        if chosen is None:
            raise MetricsError(f"no CLIP weights were given. {HOW_TO_PASS}")
        path = Path(chosen).expanduser()
        if not path.exists():
            raise MetricsError(f"CLIP weights {path} do not exist. {HOW_TO_PASS}")
        if not _importable("transformers"):
            raise MetricsError(f"CLIP weights {path} need the transformers package: `pip install transformers`. {HOW_TO_PASS}")
        self.device = torch.device(device)
        model: Any  # transformers' CLIPVisionModelWithProjection
        if path.is_dir():
            self.source, model = "hf-folder", _load_folder(path)
        else:
            self.source, model = f"checkpoint,{activation}", load_open_clip_vision(path, activation)
        self.num_features = int(model.config.projection_dim)
        self.model = model.eval()
        self.to(self.device)
        stat = path.stat()
        # Cache key: the weights' identity (path, size, mtime) and how they are read.
        self.name = f"clip[{self.source},{path.resolve()},{stat.st_size},{stat.st_mtime_ns}]"
        log.info("CLIP features from %s (%s, %d-d)", path, self.source, self.num_features)

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = clip_preprocess(images.to(self.device))
        return self.model(pixel_values=pixels).image_embeds.float()


def _load_folder(path: Path) -> nn.Module:
    if not (path / "config.json").is_file():
        raise MetricsError(f"CLIP weights folder {path} has no config.json. {HOW_TO_PASS}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    try:
        config = json.loads((path / "config.json").read_text())
        extra: dict[str, Any] = {}
        if config.get("model_type") == "clip":
            # A whole CLIPModel (e.g. a copy of openai/clip-vit-base-patch32): its projection width lives
            # in the outer config, and the vision config alone would fall back to 512.
            vision = {**config.get("vision_config", {}), "projection_dim": config.get("projection_dim", 512)}
            extra["config"] = CLIPVisionConfig(**vision)
        model: nn.Module = CLIPVisionModelWithProjection.from_pretrained(str(path), local_files_only=True, **extra)
    except (OSError, ValueError, KeyError) as exc:
        raise MetricsError(f"cannot load CLIP weights from {path} with transformers: {exc}. {HOW_TO_PASS}") from exc
    return model
