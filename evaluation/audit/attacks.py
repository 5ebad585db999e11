"""Reconstruction attacks a curious server can run on what it receives (docs/design.md §3, §7).

Pure functions of tensors and a denoiser (``Denoiser``: eps_hat(x_t, t, y) with the paper's 1-based t).
Each returns an estimate of x_0 clamped to the data range of the audit's space (evaluation/audit/space.py: [-1, 1]
in pixels); ``score`` turns it into PSNR/SSIM against the truth, in pixels (a latent estimate decoded first).

- ``tweedie``: one-step x_hat_0 = (x_t - sqrt(1 - ab_t) eps_hat) / sqrt(ab_t) with the server's model.
- ``chain``: the server's model runs the rest of the chain from x_t to 0 (DDIM or DDPM, diffusers
  schedulers through ``common.sampling.client_half`` -- what the client would do with a hand-off).
- ``linear``: x_t / sqrt(ab_t), no model (the floor any attacker gets).
- ``average_releases``: k releases believed to be one image; their mean has k times the SNR
  (+10 log10 k dB for the linear estimate); ``averaged_level`` gives the level to run Tweedie at.
- ``two_level``: the same noise at two levels gives two equations per pixel, solved exactly.
- ``invert_gradient``: split learning's dL/d(eps_hat) = (eps_hat - eps) / s with s the loss scale
  (n/2 for a mean MSE over n elements) gives eps, hence x_0; with DP (clipping C, noise sigma C) the
  attacker's linear-MMSE estimate of eps_hat - eps given the noisy gradient (never worse than Tweedie).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from collafuse.common.diffusion import Denoiser
from collafuse.common.sampling import client_half, make_chain
from collafuse.common.schedule import ScheduleConfig
from collafuse.evaluation.audit.space import Reconstruction, clamp_estimate, score

__all__ = ["Reconstruction", "score"]  # re-exported: where callers have always found them


def _level(alpha_bar: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    ab = torch.as_tensor(alpha_bar, dtype=torch.float64)
    if ab.dim() == 0:
        ab = ab.expand(like.shape[0])
    if bool((ab <= 0).any()) or bool((ab > 1).any()):
        raise ValueError("alpha_bar must lie in (0, 1] to invert a release")
    return ab.to(like.device).view(-1, *([1] * (like.dim() - 1)))


def linear(x_t: torch.Tensor, alpha_bar: float | torch.Tensor) -> torch.Tensor:
    """x_t / sqrt(ab): unbiased, no model."""
    return clamp_estimate((x_t.to(torch.float64) / _level(alpha_bar, x_t).sqrt()).float())


def x0_from_eps(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar: float | torch.Tensor) -> torch.Tensor:
    """x_0 = (x_t - sqrt(1 - ab) eps) / sqrt(ab), in float64 so exact inversions stay exact."""
    ab = _level(alpha_bar, x_t)
    return clamp_estimate((x_t.to(torch.float64) - (1 - ab).sqrt() * eps.to(torch.float64)) / ab.sqrt())


@torch.no_grad()
def tweedie(
    denoiser: Denoiser, x_t: torch.Tensor, t: int, labels: torch.Tensor, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """One-step x_hat_0 from the server's eps-prediction at 1-based t."""
    if t < 1:
        return clamp_estimate(x_t.float())  # t = 0: the payload is x_0 itself
    eps_hat = denoiser(x_t, torch.full((x_t.shape[0],), t, dtype=torch.long, device=x_t.device), labels)
    return x0_from_eps(x_t, eps_hat, float(alphas_cumprod[t])).float()


def chain(
    denoiser: Denoiser,
    schedule: ScheduleConfig,
    x_t: torch.Tensor,
    t: int,
    labels: torch.Tensor,
    kind: Literal["ddim", "ddpm"] = "ddim",
    num_inference_steps: int = 0,
    seed: int = 0,
) -> torch.Tensor:
    """Run the chain's steps with t' <= t from x_t to x_0 with the server's model (0 steps: all T, exact level)."""
    steps = make_chain(schedule, kind, num_inference_steps, t)
    return clamp_estimate(client_half(denoiser, steps, x_t, labels, seed, t).float())


def averaged_level(alpha_bar: float, k: int) -> float:
    """The mean of k independently noised releases at ab, rescaled to unit variance, sits at this ab."""
    return alpha_bar / (alpha_bar + (1 - alpha_bar) / k)


def average_releases(releases: torch.Tensor, alpha_bar: float) -> tuple[torch.Tensor, float]:
    """(k, N, ...) releases of the same N images -> (variance-preserving mean, its ab)."""
    k = releases.shape[0]
    mean = releases.to(torch.float64).mean(dim=0)
    scale = math.sqrt(alpha_bar + (1 - alpha_bar) / k)
    return (mean / scale).float(), averaged_level(alpha_bar, k)


def nearest_timestep(alpha_bar: float, alphas_cumprod: torch.Tensor) -> int:
    """The 1-based t whose ab_t is closest to ``alpha_bar`` (to run the model at a level it knows)."""
    return int(torch.argmin((alphas_cumprod[1:] - alpha_bar).abs())) + 1


def two_level(x_a: torch.Tensor, alpha_bar_a: float, x_b: torch.Tensor, alpha_bar_b: float) -> torch.Tensor:
    """x_a = a1 x0 + b1 eps and x_b = a2 x0 + b2 eps (same eps): x0 = (b2 x_a - b1 x_b) / (a1 b2 - a2 b1)."""
    a1, b1 = math.sqrt(alpha_bar_a), math.sqrt(1 - alpha_bar_a)
    a2, b2 = math.sqrt(alpha_bar_b), math.sqrt(1 - alpha_bar_b)
    det = a1 * b2 - a2 * b1
    if abs(det) < 1e-12:
        raise ValueError("the two releases are at the same level: nothing to solve")
    return clamp_estimate((b2 * x_a.to(torch.float64) - b1 * x_b.to(torch.float64)) / det)


def mse_loss_scale(batch_shape: torch.Size | tuple[int, ...]) -> float:
    """s with dL/d(eps_hat) = (eps_hat - eps) / s for the mean-reduced MSE over the whole batch: n / 2."""
    return math.prod(batch_shape) / 2.0


def invert_gradient(
    grad: torch.Tensor,
    eps_hat: torch.Tensor,
    x_t: torch.Tensor,
    alpha_bar: float | torch.Tensor,
    loss_scale: float,
    max_norm: float | None = None,
    noise_multiplier: float = 0.0,
) -> torch.Tensor:
    """x_0 from a returned gradient. The protocol is public: the server knows the loss scale, C and sigma.

    Without DP, eps = eps_hat - s g exactly. With DP the gradient row is f (eps_hat - eps)/s + sigma C z,
    f = min(1, C / |g|); the residual r = eps_hat - eps has E|r|^2 ~ d - |eps_hat|^2 (for an
    eps-predictor eps_hat = E[eps | x_t]), which fixes f, and r_hat = k g with the scalar linear-MMSE
    gain k (an isotropic Gaussian prior on r). Zero gain is Tweedie, so this never does worse than it.
    """
    g = grad.detach().to(torch.float64)
    e = eps_hat.detach().to(torch.float64)
    if max_norm is None and noise_multiplier == 0:
        return x0_from_eps(x_t, e - loss_scale * g, alpha_bar)
    if max_norm is None:
        raise ValueError("noisy gradients need the clipping norm C the client used")
    d = g[0].numel()
    flat_e = e.reshape(e.shape[0], -1)
    r2 = (d - flat_e.pow(2).sum(dim=1)).clamp_min(1e-3 * d)  # expected |eps_hat - eps|^2 per sample
    clip = torch.clamp(max_norm * loss_scale / r2.sqrt(), max=1.0)  # f, from the expected unclipped norm
    prior = r2 / d  # per-element variance of r
    gain_signal = clip / loss_scale  # g = gain_signal * r + noise
    noise_var = (noise_multiplier * max_norm) ** 2
    k = gain_signal * prior / (gain_signal**2 * prior + noise_var)
    r_hat = k.view(-1, *([1] * (g.dim() - 1))) * g
    return x0_from_eps(x_t, e - r_hat, alpha_bar)
