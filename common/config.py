"""Settings of the server, the client and the simulation (flags, ``COLLAFUSE_*`` env vars, config files)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from collafuse.common.schedule import ScheduleConfig
from collafuse.common.settings import CollafuseSettings

Protocol = Literal["ambient"]
Device = Literal["auto", "cpu", "cuda"]
DIGIT_CLASSES = [str(i) for i in range(10)]


class ScheduleSettings(CollafuseSettings):
    """The schedule fields shared by every process that builds one."""

    num_train_timesteps: int = Field(1000, ge=2, le=10_000, description="T, the length of the diffusion chain")
    beta_start: float = Field(1e-4, gt=0, lt=1, description="first beta of the schedule")
    beta_end: float = Field(0.02, gt=0, lt=1, description="last beta of the schedule")
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = Field("linear", description="beta schedule")

    def schedule(self) -> ScheduleConfig:
        return ScheduleConfig(
            num_train_timesteps=self.num_train_timesteps,
            beta_start=self.beta_start,
            beta_end=self.beta_end,
            beta_schedule=self.beta_schedule,
        )


class ServerSettings(ScheduleSettings):
    host: str = Field("0.0.0.0", description="address to listen on")
    port: int = Field(50051, ge=0, le=65535, description="port to listen on (0 picks a free one)")
    store: Path = Field(Path("./collafuse-server"), description="folder for releases, checkpoints and metrics")
    device: Device = Field("auto", description="auto takes the GPU when there is one")
    image_size: int = Field(16, ge=4, le=1024, description="side of the square images served")
    channels: int = Field(1, description="1 (grey) or 3 (RGB)")
    classes: list[str] = Field(default_factory=lambda: list(DIGIT_CLASSES), description="class names in label order")
    model_preset: str = Field("small", description="server UNet size: tiny, small or base")
    batch_size: int = Field(64, ge=1, description="training minibatch")
    lr: float = Field(2e-3, gt=0, description="AdamW learning rate")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    ema_decay: float = Field(0.995, ge=0, lt=1, description="EMA decay of the sampling model")
    label_dropout: float = Field(0.1, ge=0, le=1, description="classifier-free label drop-out")
    max_steps: int = Field(2000, ge=0, description="training steps; 0 trains until stopped")
    checkpoint_every: int = Field(250, ge=1, description="steps between atomic checkpoints")
    min_clients: int = Field(1, ge=1, description="clients with releases before training starts")
    start_timeout: float = Field(120.0, ge=0, description="seconds to wait for min_clients before training on what is there")
    max_sample_images: int = Field(4096, ge=1, description="most images one Sample request may ask for")
    seed: int = Field(0, description="training RNG seed")
    token: str | None = Field(None, description="shared token clients must send (unset: no auth)")
    transcript: Path | None = Field(None, description="record every payload received here (privacy audit)")
    threads: int = Field(0, ge=0, description="torch CPU threads (0: torch's default)")
    log_level: str = Field("INFO", description="logging level")

    @field_validator("channels")
    @classmethod
    def _channels(cls, value: int) -> int:
        if value not in (1, 3):
            raise ValueError("channels must be 1 (grey) or 3 (RGB)")
        return value

    @field_validator("classes")
    @classmethod
    def _classes(cls, value: list[str]) -> list[str]:
        if not value or len(set(value)) != len(value):
            raise ValueError("classes must be a non-empty list of distinct names")
        return value


class ClientSettings(CollafuseSettings):
    data: Path | None = Field(None, description="folder of private images (one sub-folder per class)")
    server: str = Field("localhost:50051", description="HOST:PORT of collafuse-server")
    client_id: str | None = Field(None, description="stable id of this client (default: kept in the workdir)")
    workdir: Path = Field(Path("./collafuse-client"), description="ledger, local model, samples and metrics")
    cut: int = Field(200, ge=0, description="cut point zeta: 0 = global model, T = independent client model")
    protocol: Protocol = Field("ambient", description="training protocol")
    image_size: int | None = Field(None, description="expected image side (default: the server's)")
    model_preset: str = Field("tiny", description="local UNet size: tiny, small or base")
    train_steps: int = Field(1000, ge=0, description="local training steps on t in [1, cut]")
    batch_size: int = Field(64, ge=1, description="local training minibatch")
    lr: float = Field(2e-3, gt=0, description="AdamW learning rate")
    ema_decay: float = Field(0.995, ge=0, lt=1, description="EMA decay of the local model")
    label_dropout: float = Field(0.1, ge=0, le=1, description="classifier-free label drop-out")
    samples_per_class: int = Field(4, ge=0, description="images generated per class of the client's data")
    inference_steps: int = Field(100, ge=0, description="sampling chain length (0: all T)")
    scheduler: Literal["ddpm", "ddim"] = Field("ddpm", description="sampling scheduler")
    guidance_scale: float = Field(1.0, ge=0, description="classifier-free guidance (1 = plain conditional)")
    wait_for_server: bool = Field(True, description="before generating, wait until the server finished training")
    wait_timeout: float = Field(1800.0, ge=0, description="most seconds to wait for the server's training")
    rpc_timeout: float = Field(60.0, gt=0, description="deadline of a single RPC in seconds")
    retries: int = Field(6, ge=1, description="attempts for an unreachable server (backoff with jitter)")
    seed: int = Field(0, description="seed of local training and sampling")
    token: str | None = Field(None, description="shared token the server requires")
    threads: int = Field(0, ge=0, description="torch CPU threads (0: torch's default)")
    device: Device = Field("auto", description="auto takes the GPU when there is one")
    log_level: str = Field("INFO", description="logging level")
