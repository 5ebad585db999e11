"""Settings of the server and the client (flags, ``COLLAFUSE_*`` env vars, config files).

Shared fields are declared once: the schedule's in ``common.schedule.ScheduleFields``,
training and process fields in ``common.settings.TrainingFields`` / ``RuntimeFields``;
the simulation (``deploy/sim.py``) inherits the same ones.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator
from pydantic_settings import CliVariadicArg

from collafuse.common.schedule import ScheduleFields
from collafuse.common.settings import (
    CollafuseSettings,
    RuntimeFields,
    TlsFields,
    TrainingFields,
    build_settings,
)

log = logging.getLogger(__name__)

Protocol = Literal["ambient", "split"]
DIGIT_CLASSES = [str(i) for i in range(10)]
# How the ambient server weighs releases of different cuts (common/diffusion.py::ambient_pooled_weights).
AmbientWeighting = Literal["standard", "pooled"]


class AmbientFields(BaseModel):
    """How the ambient server weighs releases of different cuts (the server's and the simulation's)."""

    ambient_weighting: AmbientWeighting = Field(
        "standard", description="ambient loss with clients at different cuts: standard (unweighted; learns a "
        "cut-skewed mix of the clients' posteriors) or pooled (per-release weights so that it learns the pooled "
        "E[eps | x_t]; more gradient variance). Equal cuts: identical")
    ambient_max_weight: float = Field(10.0, ge=1, description="with --ambient-weighting pooled: the largest "
                                      "per-release weight (the t just above a cut are scaled down to it)")


class ServerSettings(CollafuseSettings, ScheduleFields, TrainingFields, RuntimeFields, TlsFields, AmbientFields):
    host: str = Field("0.0.0.0", description="address to listen on")
    port: int = Field(50051, ge=0, le=65535, description="port to listen on (0 picks a free one)")
    metrics_port: int = Field(0, ge=0, le=65535, description="HTTP port of the Prometheus /metrics endpoint "
                              "on --host (0: off); no authentication, so keep it off public networks")
    store: Path = Field(Path("./collafuse-server"), description="folder for releases, checkpoints and metrics")
    dataset: Path | None = Field(None, description="image folder the server is started for: its images give "
                                 "--image-size/--channels and its class folders --classes, where those are not given")
    image_size: int = Field(16, ge=4, le=1024, description="side of the square images served")
    channels: int = Field(1, description="1 (grey) or 3 (RGB)")
    classes: CliVariadicArg[list[str]] = Field(list(DIGIT_CLASSES), description="class names in label order")
    model_preset: str = Field("small", description="server UNet size: tiny, small, base or paper")
    max_steps: int = Field(2000, ge=0, description="training steps: an ambient step is one minibatch of releases, a "
                           "split step one round (one optimizer step over every active split client's batch); 0 "
                           "trains until stopped")
    checkpoint_every: int = Field(250, ge=1, description="steps between atomic checkpoints")
    min_clients: int = Field(1, ge=1, description="clients with releases before training starts")
    start_timeout: float = Field(120.0, ge=0, description="seconds to wait for min_clients before training on what is there")
    max_sample_images: int = Field(4096, ge=1, description="most images one Sample request may ask for")
    sample_workers: int = Field(1, ge=1, le=64, description="threads that run sampling model calls; cheap RPCs "
                                "never wait behind them")
    sample_queue_per_client: int = Field(4, ge=1, description="Sample calls one client may have queued or running "
                                         "(more: RESOURCE_EXHAUSTED with a retry hint)")
    sample_queue_total: int = Field(32, ge=1, description="Sample calls queued or running over all clients")
    sample_max_batch: int = Field(256, ge=1, description="most images in one sampling model call (requests of "
                                  "several clients are merged up to this)")
    sample_max_wait_ms: float = Field(5.0, ge=0, le=10_000, description="how long a sampling batch waits for "
                                      "other clients' requests to merge with")
    sample_cross_client: bool = Field(True, description="merge concurrent Sample requests of different clients "
                                      "into one model call (results are unchanged)")
    transcript: Path | None = Field(None, description="audit log (off unless set): append every admitted request "
                                    "payload here; outside Forget, kept until you delete the file")
    tokens: Path | None = Field(None, description="per-client tokens file ('<client-id> <hash>' lines, made with "
                                "collafuse-token); replaces the shared --token")
    operators: CliVariadicArg[list[str]] = Field([], description="client ids (token or certificate) that may see "
                                                 "every client in Status")
    # The split protocol's rounds (server/protocols/split_rounds.py): one optimizer step per round.
    split_max_round_clients: int = Field(32, ge=1, description="split protocol: most clients' steps in one round "
                                         "(more: RESOURCE_EXHAUSTED until it closes)")
    split_round_timeout: float = Field(30.0, gt=0, le=3600, description="split protocol: seconds a round waits for "
                                       "its clients' backwards before it steps without the missing ones")
    split_max_grad_norm: float = Field(1000.0, gt=0, description="split protocol: refuse a gradient whose row for "
                                       "one image has a larger L2 norm (NaN/Inf are always refused)")
    split_cross_client: bool = Field(True, description="merge concurrent SplitForward calls of different clients "
                                     "into one model call (results are unchanged)")
    split_max_batch: int = Field(256, ge=1, description="most images in one split model call (merged forwards; a "
                                 "round's backward runs in chunks of this)")
    split_max_wait_ms: float = Field(5.0, ge=0, le=10_000, description="how long a split forward waits for other "
                                     "clients' forwards to merge with (only while other clients are active)")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of the images served."""
        return (self.channels, self.image_size, self.image_size)

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

    def for_dataset(self) -> ServerSettings:
        """These settings with the image spec and classes of ``dataset`` filled in where not given."""
        if self.dataset is None:
            return self
        from collafuse.common.image_spec import infer_image_spec  # reads images: only when asked

        given = self.model_fields_set
        spec = infer_image_spec(self.dataset, [self.model_preset])
        updates: dict[str, object] = {}
        if "image_size" not in given:
            updates["image_size"] = spec.side
        if "channels" not in given:
            updates["channels"] = spec.channels
        if "classes" not in given and spec.classes:
            updates["classes"] = spec.classes
        if updates:
            log.info("serving --dataset %s with %s (%s)", self.dataset,
                     ", ".join(f"{k.replace('_', '-')} {v}" for k, v in updates.items()), spec.reason)
        return build_settings(ServerSettings, **{**self.model_dump(exclude_unset=True), **updates})


class SplitFields(BaseModel):
    """The split protocol's client options (client/protocols/split.py) and its differential privacy (client/dp.py):
    the client's and the simulation's (which passes them to every client)."""

    split_steps: int = Field(0, ge=0, description="split protocol: most split steps this client sends "
                             "(0: until the server finished training or the privacy budget is spent)")
    split_batch_size: int | None = Field(None, ge=1, description="split protocol: images per split step, this "
                                         "client's share of a round (the server's step averages every client's share; "
                                         "default: --batch-size)")
    dp_clip: float | None = Field(None, gt=0, description="split protocol: clip each image's dL/d(eps_hat) to this "
                                  "L2 norm before it leaves (unset: no clipping, no DP)")
    dp_noise_multiplier: float = Field(0.0, ge=0, description="split protocol: Gaussian noise std on the clipped "
                                       "gradients, in units of --dp-clip")
    dp_epsilon: float | None = Field(None, gt=0, description="privacy budget: stop sending before the privacy "
                                     "spent (epsilon at --dp-delta) would exceed it (unset: no limit, still reported)")
    dp_delta: float = Field(1e-5, gt=0, lt=1, description="delta at which epsilon is reported and budgeted")


class ClientSettings(CollafuseSettings, TrainingFields, RuntimeFields, TlsFields, SplitFields):
    data: Path | None = Field(None, description="folder of private images (one sub-folder per class)")
    server: str = Field("localhost:50051", description="HOST:PORT of collafuse-server")
    client_id: str | None = Field(None, description="stable id of this client (default: kept in the workdir)")
    workdir: Path = Field(Path("./collafuse-client"), description="ledger, local model, samples and metrics")
    cut: int = Field(200, ge=0, description="cut point zeta: 0 = global model, T = independent client model")
    protocol: Protocol = Field("ambient", description="training protocol: ambient (release x_cut once per image) "
                               "or split (split learning with gradient exchange; see --dp-clip)")
    image_size: int | None = Field(None, description="expected image side (default: the server's)")
    model_preset: str = Field("tiny", description="local UNet size: tiny, small or base")
    train_steps: int = Field(1000, ge=0, description="local training steps on t in [1, cut]")
    samples_per_class: int = Field(4, ge=0, description="images generated per class of the client's data")
    inference_steps: int = Field(100, ge=0, description="sampling chain length (0: all T)")
    scheduler: Literal["ddpm", "ddim"] = Field("ddpm", description="sampling scheduler")
    # > 0: both halves of the chain must use the same scale, and the wire reads 0 as "unset" (1.0).
    guidance_scale: float = Field(1.0, gt=0, description="classifier-free guidance, > 0 (1 = plain conditional)")
    wait_for_server: bool = Field(True, description="before generating, wait until the server finished training")
    wait_timeout: float = Field(1800.0, ge=0, description="most seconds to wait for the server: its training, "
                                "or a restart (each call retries with backoff until then)")
    rpc_timeout: float = Field(60.0, gt=0, description="deadline of a single RPC in seconds")
    retries: int = Field(0, ge=0, description="most attempts per call for an unreachable server "
                         "(0: retry with backoff and jitter until --wait-timeout)")
    # The client's own noise floor (client/noise_floor.py): the server's schedule is checked against it.
    max_release_alpha_bar: float | None = Field(None, gt=0, le=1, description="most alpha_bar a release may have "
                                                "(its noise floor; default: alpha_bar at --cut under the first "
                                                "schedule accepted, kept in the ledger)")
    re_release_confirm: bool = Field(False, description="confirm releasing images again: at another noise level "
                                     "(independent noise) or after a forget; counted in the ledger")
