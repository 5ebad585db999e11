"""The one noise schedule both parties share, and the cut-point arithmetic.

Time is 1-based as in the paper: x_0 is data and x_t has
alpha_bar_t = ``alphas_cumprod[t - 1]`` in diffusers' 0-based indexing. We define
alpha_bar_0 = 1 so that a cut at 0 releases x_0 itself (the global-model baseline).
The server evaluates its model only at t > cut, the client only at t <= cut.

The schedule is declared once: ``ScheduleFields`` holds its knobs (the server's and
the simulation's settings inherit them), ``ScheduleConfig`` turns them into diffusers'
scheduler config, which is what travels on the wire (``to_wire``/``from_wire``) and
what both sides rebuild their schedulers from (``DDPMScheduler.from_config``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Literal, Self

import torch
from diffusers.schedulers.scheduling_ddim import DDIMScheduler  # not `diffusers`: see common/models.py
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from collafuse.common.settings import describe_validation_error

SchedulerKind = Literal["ddpm", "ddim"]
BetaSchedule = Literal["linear", "scaled_linear", "squaredcos_cap_v2"]


class ScheduleError(ValueError):
    """A schedule that cannot be used; the message says which value and why."""


class ScheduleFields(BaseModel):
    """The knobs of the forward process (T and the betas), declared once for every model that sets them."""

    num_train_timesteps: int = Field(1000, ge=2, le=10_000, description="T, the length of the diffusion chain")
    beta_start: float = Field(1e-4, gt=0, lt=1, description="first beta of the schedule")
    beta_end: float = Field(0.02, gt=0, lt=1, description="last beta of the schedule")
    beta_schedule: BetaSchedule = Field("linear", description="beta schedule")

    @model_validator(mode="after")
    def _usable(self) -> Self:
        # The NaN guard at start-up: every model with these knobs (server, sim) refuses an unusable schedule.
        check_alphas_cumprod(DDPMScheduler.from_config(self.diffusers_config()).alphas_cumprod)
        return self

    def diffusers_config(self) -> dict[str, Any]:
        """diffusers' DDPMScheduler config of these knobs, without its private ``_`` bookkeeping keys."""
        config = DDPMScheduler(
            num_train_timesteps=self.num_train_timesteps,
            beta_start=self.beta_start,
            beta_end=self.beta_end,
            beta_schedule=self.beta_schedule,
        ).config
        return {key: value for key, value in config.items() if not key.startswith("_")}

    def schedule(self) -> ScheduleConfig:
        """The validated schedule of these knobs."""
        return ScheduleConfig(**{name: getattr(self, name) for name in ScheduleFields.model_fields})


class ScheduleConfig(ScheduleFields):
    """The forward process both sides must agree on; validated so that every weight derived from it is finite."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def ddpm(self) -> DDPMScheduler:
        return DDPMScheduler.from_config(self.diffusers_config())

    def scheduler(self, kind: SchedulerKind, steps_offset: int = 0) -> DDPMScheduler | DDIMScheduler:
        """A fresh scheduler of the given kind over this schedule (both rebuilt from the same config), its
        inference grid shifted by ``steps_offset`` (common/sampling.py: the hand-off exactly at the cut)."""
        if kind == "ddpm":
            return DDPMScheduler.from_config(self.diffusers_config(), steps_offset=steps_offset)
        if kind == "ddim":
            return DDIMScheduler.from_config(self.diffusers_config(), steps_offset=steps_offset)
        raise ValueError(f"unknown scheduler {kind!r}: use 'ddpm' or 'ddim'")

    def alphas_cumprod(self) -> torch.Tensor:
        """alpha_bar indexed by the paper's 1-based t, with alpha_bar_0 = 1 (length T + 1, float64)."""
        inner = self.ddpm().alphas_cumprod.to(torch.float64)
        return torch.cat([torch.ones(1, dtype=torch.float64), inner])

    def config_json(self) -> str:
        """The canonical JSON of ``diffusers_config`` (sorted keys): the bytes that travel and get hashed."""
        return _canonical_json(self.diffusers_config())

    def config_digest(self) -> str:
        return _sha256(self.config_json())

    @classmethod
    def from_wire(cls, config_json: str, config_digest: str) -> ScheduleConfig:
        """The schedule a peer sent, checked: it must hash to its digest, rebuild with
        ``DDPMScheduler.from_config``, use only options this side supports, and give finite, strictly
        decreasing alphas_cumprod in (0, 1). Raises ScheduleError saying what is wrong."""
        if _sha256(config_json) != config_digest:
            raise ScheduleError("scheduler config does not match its digest (corrupted or altered in transit)")
        try:
            received = json.loads(config_json)
        except json.JSONDecodeError as exc:
            raise ScheduleError(f"scheduler config is not valid JSON: {exc}") from exc
        if not isinstance(received, dict):
            raise ScheduleError("scheduler config must be a JSON object of diffusers scheduler settings")
        try:
            rebuilt = DDPMScheduler.from_config(received)
        except Exception as exc:
            raise ScheduleError(f"scheduler config does not rebuild a DDPMScheduler: {exc}") from exc
        check_alphas_cumprod(rebuilt.alphas_cumprod)
        try:
            schedule = cls(**{name: rebuilt.config[name] for name in ScheduleFields.model_fields})
        except ValidationError as exc:
            raise ScheduleError(f"unusable schedule: {describe_validation_error(exc)}") from None
        expected = schedule.diffusers_config()
        differing = sorted(k for k in set(expected) | set(received) if expected.get(k, "<absent>") != received.get(k, "<absent>"))
        if differing:
            shown = {k: received.get(k, "<absent>") for k in differing}
            raise ScheduleError(
                f"scheduler config sets options this side does not support: {shown} "
                f"(supported: {_canonical_json({k: expected[k] for k in differing if k in expected})})"
            )
        return schedule


def check_alphas_cumprod(alphas_cumprod: torch.Tensor) -> None:
    """Every weight of docs/design.md §2 divides by sqrt(1 - alpha_bar) or by alpha_bar: in the dtype the schedule
    is held in (float32), alpha_bar must be finite, strictly decreasing and strictly inside (0, 1)."""
    ab = alphas_cumprod
    if ab.ndim != 1 or ab.numel() < 2:
        raise ScheduleError(f"alphas_cumprod must be a vector of at least 2 steps, got shape {tuple(ab.shape)}")
    if not bool(torch.isfinite(ab).all()):
        raise ScheduleError("alphas_cumprod holds NaN or infinite values")
    if float(ab[0]) >= 1.0:
        raise ScheduleError(
            f"alpha_bar_1 rounds to {float(ab[0])!r} in {ab.dtype}, which makes the ambient weight "
            "sqrt(1 - alpha_bar) zero and the loss NaN: raise beta_start (at least ~3e-8)"
        )
    if float(ab[-1]) <= 0.0:
        raise ScheduleError("alpha_bar_T is 0: the last steps carry no signal; lower beta_end")
    if not bool((ab[1:] < ab[:-1]).all()):
        first = int(torch.nonzero(ab[1:] >= ab[:-1])[0, 0]) + 2
        raise ScheduleError(
            f"alphas_cumprod is not strictly decreasing (alpha_bar_{first} >= alpha_bar_{first - 1}): "
            "every beta must be positive in float32"
        )


def _canonical_json(config: dict[str, Any]) -> str:
    return json.dumps(config, sort_keys=True, default=str)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class Cut:
    """A cut point zeta in [0, T], and its edge cases named once: 0 is the global model (the server runs every
    step, and a release is the raw image), T the independent client model (the server runs none)."""

    value: int
    num_train_timesteps: int

    def __post_init__(self) -> None:
        if not 0 <= self.value <= self.num_train_timesteps:
            raise ValueError(
                f"cut point {self.value} is outside [0, {self.num_train_timesteps}]: use 0 for the global model, "
                f"{self.num_train_timesteps} for independent client models, or a value in between"
            )

    @property
    def global_model(self) -> bool:
        """zeta = 0: the server owns every step (a baseline, never private)."""
        return self.value == 0

    @property
    def independent(self) -> bool:
        """zeta = T: the client owns every step; nothing goes to the server's training."""
        return self.value == self.num_train_timesteps

    @property
    def server_steps(self) -> bool:
        """The server owns some steps (t in (zeta, T])."""
        return not self.independent

    @property
    def client_steps(self) -> bool:
        """The client owns some steps (t in [1, zeta])."""
        return not self.global_model


def validate_cut(cut: int, num_train_timesteps: int) -> int:
    """``cut``, or ValueError when it is outside [0, T] (see ``Cut``)."""
    return Cut(cut, num_train_timesteps).value


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
