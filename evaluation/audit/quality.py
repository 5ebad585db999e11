"""How close a reconstruction is to the true x_0: PSNR and SSIM for images in [-1, 1] (data range 2).

SSIM is torchmetrics' (Wang et al. 2004: Gaussian window 11, sigma 1.5, K1 = 0.01, K2 = 0.03), which
reflect-pads the image and averages the index over every pixel, so 8x8 digits get a score too.
"""

from __future__ import annotations

import math

import torch

DATA_RANGE = 2.0  # images live in [-1, 1]
MAX_PSNR_DB = 300.0  # identical images: report a finite ceiling (JSON has no infinity)


def _pair(reconstruction: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if reconstruction.shape != target.shape or reconstruction.dim() != 4:
        raise ValueError(
            f"reconstruction {tuple(reconstruction.shape)} and target {tuple(target.shape)} must both be (N, C, H, W)"
        )
    return reconstruction.detach().to(torch.float64), target.detach().to(torch.float64).to(reconstruction.device)


def psnr(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB: 10 log10(range^2 / MSE), capped at MAX_PSNR_DB."""
    rec, ref = _pair(reconstruction, target)
    mse = (rec - ref).pow(2).flatten(1).mean(dim=1)
    out = 10.0 * torch.log10(DATA_RANGE**2 / mse.clamp_min(1e-300))
    return out.clamp(max=MAX_PSNR_DB)


def mean_psnr(reconstruction: torch.Tensor, target: torch.Tensor) -> float:
    """PSNR of the pooled MSE over all images (the usual single number for a set)."""
    rec, ref = _pair(reconstruction, target)
    mse = float((rec - ref).pow(2).mean())
    return MAX_PSNR_DB if mse <= 0 else min(MAX_PSNR_DB, 10.0 * math.log10(DATA_RANGE**2 / mse))


def ssim(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM: torchmetrics' (Gaussian window 11, sigma 1.5, reflect padding), data range 2."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    rec, ref = _pair(reconstruction, target)
    if min(rec.shape[-2:]) < 6:
        raise ValueError(f"images of side {min(rec.shape[-2:])} are too small for SSIM's reflect padding (need >= 6)")
    out = structural_similarity_index_measure(rec, ref, data_range=DATA_RANGE, reduction="none")
    assert isinstance(out, torch.Tensor)
    return out
