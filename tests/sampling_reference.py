"""An independent reference for collaborative sampling (docs/design.md §5): ONE plain loop over the chain.

It shares no helper with ``collafuse.common.sampling`` (the code it checks): the
scheduler is built here from diffusers' own classes, the models are called as plain
``UNet2DModel``s with diffusers' 0-based timestep, the model is chosen inside the loop
(server when the paper's t = i + 1 > cut, client otherwise), and the per-image noise is
derived the documented way: image j's generator at 0-based timestep i is seeded with
the first 8 bytes (little-endian, top bit cleared) of SHA-256 of ``"seed:j:i"``, and
x_T uses i = -1.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from diffusers.models import UNet2DModel
from diffusers.schedulers.scheduling_ddim import DDIMScheduler
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler

# docs/design.md §1: linear betas 1e-4..0.02; num_train_timesteps is given per test.
LINEAR = {"beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear"}


def _generator(seed: int, image: int, timestep: int) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{image}:{timestep}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _eps(model: UNet2DModel, x: torch.Tensor, timestep: int, labels: torch.Tensor, guidance: float) -> torch.Tensor:
    t = torch.full((x.shape[0],), timestep, dtype=torch.long)
    with torch.no_grad():
        cond = model(x, t, class_labels=labels).sample
        if guidance == 1.0:
            return cond
        null = int(model.config["num_class_embeds"]) - 1  # the reserved "no label" index
        uncond = model(x, t, class_labels=torch.full_like(labels, null)).sample
    return uncond + guidance * (cond - uncond)


def reference_sample(
    server: UNet2DModel,
    client: UNet2DModel,
    *,
    num_train_timesteps: int,
    kind: str,
    num_inference_steps: int,
    cut: int,
    labels: list[int],
    seed: int,
    guidance: float,
    image_shape: tuple[int, int, int],
    client_guidance: float | None = None,
    **schedule: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_hat_cut, x_hat_0) of one chain; ``num_inference_steps`` 0 runs all T steps. ``guidance`` is the server's
    half's scale, ``client_guidance`` the client's (default: the same)."""
    steps = num_inference_steps or num_train_timesteps
    # The hand-off exactly at the cut (docs/design.md §5): diffusers' leading grid k * (T // N), shifted so
    # that the paper's t = cut (0-based cut - 1) is on it; no shift without a hand-off (cut 0 or T).
    offset = (cut - 1) % (num_train_timesteps // steps) if 0 < cut < num_train_timesteps else 0
    config = {**LINEAR, **schedule, "num_train_timesteps": num_train_timesteps, "steps_offset": offset}
    scheduler = DDPMScheduler(**config) if kind == "ddpm" else DDIMScheduler(**config)
    scheduler.set_timesteps(steps)
    n, y = len(labels), torch.tensor(labels, dtype=torch.long)
    x = torch.stack([torch.randn(image_shape, generator=_generator(seed, j, -1)) for j in range(n)])
    x = x * scheduler.init_noise_sigma
    x_cut = None
    for i in scheduler.timesteps.tolist():
        on_server = i + 1 > cut
        if not on_server and x_cut is None:
            x_cut = x.clone()  # the hand-off: the first client step starts from here
        scale = guidance if on_server or client_guidance is None else client_guidance
        eps = _eps(server if on_server else client, x, i, y, scale)
        if kind == "ddpm":
            out = scheduler.step(eps, i, x, generator=[_generator(seed, j, i) for j in range(n)])
        else:
            out = scheduler.step(eps, i, x, eta=0.0)
        x = out.prev_sample
    return (x.clone() if x_cut is None else x_cut), x


def relative_difference(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.float() - expected.float()).norm() / expected.float().norm())
