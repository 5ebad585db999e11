"""The one noise schedule both parties share, and the cut-point arithmetic.

Time is 1-based as in the paper: x_0 is data and x_t has
alpha_bar_t = ``alphas_cumprod[t - 1]`` in diffusers' 0-based indexing. We define
alpha_bar_0 = 1 so that a cut at 0 releases x_0 itself (the global-model baseline).
The server evaluates its model only at t > cut, the client only at t <= cut.
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal

import torch
from diffusers.schedulers.scheduling_ddim import DDIMScheduler  # not `diffusers`: see common/models.py
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from pydantic import BaseModel, ConfigDict, Field

SchedulerKind = Literal["ddpm", "ddim"]


class ScheduleConfig(BaseModel):
    """The forward process both sides must agree on (serialised into the fingerprint)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_train_timesteps: int = Field(1000, ge=2, le=10_000, description="T, the length of the chain.")
    beta_start: float = Field(1e-4, gt=0, lt=1)
    beta_end: float = Field(0.02, gt=0, lt=1)
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "linear"

    def ddpm(self) -> DDPMScheduler:
        return DDPMScheduler(
            num_train_timesteps=self.num_train_timesteps,
            beta_start=self.beta_start,
            beta_end=self.beta_end,
            beta_schedule=self.beta_schedule,
        )

    def scheduler(self, kind: SchedulerKind) -> DDPMScheduler | DDIMScheduler:
        """A fresh scheduler of the given kind over this schedule (same betas for both kinds)."""
        if kind == "ddpm":
            return self.ddpm()
        if kind == "ddim":
            return DDIMScheduler(
                num_train_timesteps=self.num_train_timesteps,
                beta_start=self.beta_start,
                beta_end=self.beta_end,
                beta_schedule=self.beta_schedule,
            )
        raise ValueError(f"unknown scheduler {kind!r}: use 'ddpm' or 'ddim'")

    def alphas_cumprod(self) -> torch.Tensor:
        """alpha_bar indexed by the paper's 1-based t, with alpha_bar_0 = 1 (length T + 1, float64)."""
        inner = self.ddpm().alphas_cumprod.to(torch.float64)
        return torch.cat([torch.ones(1, dtype=torch.float64), inner])

    def config_json(self) -> str:
        return json.dumps(dict(self.ddpm().config), sort_keys=True, default=str)


def validate_cut(cut: int, num_train_timesteps: int) -> int:
    """A cut point must lie in [0, T]; 0 is the global model, T the independent client model."""
    if not 0 <= cut <= num_train_timesteps:
        raise ValueError(
            f"cut point {cut} is outside [0, {num_train_timesteps}]: use 0 for the global model, "
            f"{num_train_timesteps} for independent client models, or a value in between"
        )
    return cut


def server_evaluates(timestep: int, cut: int) -> bool:
    """Whether the server owns a diffusers 0-based timestep (paper's t = timestep + 1 > cut)."""
    return timestep + 1 > cut


def fingerprint(schedule: ScheduleConfig, image_shape: tuple[int, int, int], class_names: list[str]) -> str:
    """SHA-256 over everything both sides must share for their models to compose."""
    payload = json.dumps(
        {"schedule": schedule.model_dump(), "image_shape": list(image_shape), "classes": list(class_names)},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()
