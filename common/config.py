"""What the server, the client and the simulation can be configured with (``common/settings.py`` reads them from
flags, ``COLLAFUSE_*`` env vars and config files).

Every field is declared once: groups shared by several programs (the training core's ``TrainOptions``,
``TrainingFields``, ``RuntimeFields``, ``TlsFields``, ``AmbientFields``, ``SplitFields``; the schedule's
``common.schedule.ScheduleFields``) are inherited by the settings that use them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal, Self

from pydantic import BaseModel, Field, PrivateAttr, field_validator, model_validator
from pydantic_settings import CliVariadicArg

from collafuse.common.schedule import BetaSchedule, ScheduleFields
from collafuse.common.settings import CollafuseSettings, build_settings

log = logging.getLogger(__name__)

Device = Literal["auto", "cpu", "cuda"]


class TrainOptions(BaseModel):
    """The knobs of the training core (common/train_loop.py), declared once: the server's, the client's and the
    simulation's settings include them, and ``from_settings`` hands every one of them to the core."""

    lr: float = Field(2e-3, gt=0, description="AdamW learning rate (after the warm-up)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    ema_decay: float = Field(0.995, ge=0, lt=1, description="EMA decay of the model used for sampling")
    warmup_steps: int = Field(0, ge=0, description="linear learning-rate warm-up steps (0: constant lr)")
    grad_clip: float = Field(0.0, ge=0, description="clip the gradient norm to this (0: no clipping)")
    mixed_precision: Literal["auto", "bf16", "off"] = Field(
        "auto", description="bf16 autocast in training: auto uses it on a GPU that supports bf16 (never on the "
        "CPU), off trains in float32")
    max_nonfinite_steps: int = Field(10, ge=1, description="stop training after this many NaN/Inf losses in a row")
    seed: int = Field(0, description="seed of the initial weights, of training and of sampling")

    @classmethod
    def from_settings(cls, settings: TrainOptions) -> TrainOptions:
        """The core's knobs out of a server's, client's or simulation's settings (which include them all)."""
        return cls.model_validate(settings.model_dump(include=set(cls.model_fields)))


class TrainingFields(TrainOptions):
    """Training settings the server, the client and the simulation share: the core's knobs and the batches."""

    batch_size: int = Field(64, ge=1, description="training minibatch")
    label_dropout: float = Field(0.1, ge=0, le=1, description="classifier-free label drop-out")


class RuntimeFields(BaseModel):
    """Process settings the server, the client and the simulation share."""

    threads: int = Field(0, ge=0, description="torch CPU threads (0: torch's default)")
    device: Device = Field("auto", description="auto takes the GPU when there is one")
    token: str | None = Field(None, description="shared token clients send and the server requires (unset: no auth)")
    log_level: str = Field("INFO", description="logging level")


class TlsFields(BaseModel):
    """Mutual TLS files of the server and the client (common/tls.py; collafuse-tls makes development ones)."""

    tls_cert: Path | None = Field(None, description="PEM certificate of this process (a client's names its client id)")
    tls_key: Path | None = Field(None, description="PEM private key of --tls-cert")
    tls_ca: Path | None = Field(None, description="PEM CA: the server requires client certificates it signed; "
                                "the client verifies the server with it")


class AutoencoderFields(BaseModel):
    """The shared frozen autoencoder of CollaFuse in latent space (common/autoencoder.py): the server's, the
    client's and the simulation's (which passes it to every process). Unset: pixel space."""

    autoencoder: Path | None = Field(None, description="diffusers autoencoder folder (AutoencoderKL, also Stable "
                                     "Diffusion's pipeline layout with a vae/ subfolder; AutoencoderTiny; VQModel), "
                                     "loaded offline and frozen: the denoisers and the wire work on its scaled "
                                     "latents, the client encodes its images and decodes its samples. Server and "
                                     "clients must use the same one (unset: pixel space)")


Protocol = Literal["ambient", "split"]
DIGIT_CLASSES = [str(i) for i in range(10)]
# How the ambient server weighs releases of different cuts (common/diffusion.py::ambient_pooled_weights).
AmbientWeighting = Literal["standard", "pooled"]
# How the ambient server draws t above a release's cut (common/diffusion.py::sample_server_times_c2).
AmbientTimesteps = Literal["uniform", "c2"]
# What the ambient server's loss regresses (common/diffusion.py::ambient_server_loss).
AmbientLoss = Literal["eps", "x0"]
# How a client's local training draws t in [1, cut] (common/diffusion.py::sample_client_times).
LocalTimesteps = Literal["uniform", "linear"]


class AmbientFields(BaseModel):
    """How the ambient server weighs releases of different cuts (the server's and the simulation's)."""

    ambient_weighting: AmbientWeighting = Field(
        "standard", description="ambient loss with clients at different cuts: standard (unweighted; learns a "
        "cut-skewed mix of the clients' posteriors) or pooled (per-release weights so that it learns the pooled "
        "E[eps | x_t]; more gradient variance). Equal cuts: identical")
    train_from_store: bool = Field(False, description="ambient training reads each minibatch's releases from the "
                                   "store (a bounded cache of --train-cache-rows) instead of holding every release "
                                   "in memory: memory stays flat as the store grows")
    train_cache_rows: int = Field(65_536, ge=0, description="with --train-from-store: releases kept in memory "
                                  "between batches (least recently used go first)")
    ambient_max_weight: float = Field(10.0, ge=1, description="with --ambient-weighting pooled or "
                                      "--ambient-loss x0: the largest per-release weight relative to the eps loss "
                                      "(the t just above a cut are capped at it)")
    ambient_timesteps: AmbientTimesteps = Field(
        "uniform", description="how the ambient server draws t above a release's cut: uniform, or c2 (in proportion "
        "to the loss's weight c(t)^2, importance-weighted back to the same objective: fewer draws wasted just above "
        "the cut, where c^2 is near 0)")
    ambient_loss: AmbientLoss = Field(
        "eps", description="the ambient server's loss: eps (|| c eps_hat - eps' ||^2) or x0 (Daras et al. 2024: the "
        "model's x0 estimate regressed onto the ambient x0 target, SNR-weighted and capped at --ambient-max-weight "
        "times the eps loss's weight; the same minimiser, more weight just above the cut). Not with pooled weighting")

    @model_validator(mode="after")
    def _x0_loss_weights_its_own_cuts(self) -> Self:
        if self.ambient_loss == "x0" and self.ambient_weighting == "pooled":
            raise ValueError("--ambient-loss x0 weighs each release by 1/c^2 relative to the eps loss and "
                             "--ambient-weighting pooled by (T - cut)/c^2, so together they would count 1/c^2 twice; "
                             "use x0 with standard weighting, or eps with pooled")
        return self


class ServerSettings(CollafuseSettings, ScheduleFields, TrainingFields, RuntimeFields, TlsFields, AmbientFields,
                     AutoencoderFields):
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
    share_model: bool = Field(False, description="answer FetchModel: give registered clients the shared model's EMA "
                              "weights to start their local models from (collafuse-client --init-from-server). The "
                              "weights are trained on every client's releases and serve every class and cut, "
                              "beyond what a client's Sample calls may reach")
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
    # Reliability (issue 16): the update guard of every training step, checkpoints to go back to, bounds.
    guard_refuse_norm: float = Field(1e6, ge=0, description="refuse a training update whose gradient L2 norm is "
                                     "above this (NaN/Inf norms are always refused; 0: no bound)")
    guard_spike_factor: float = Field(10.0, ge=0, description="scale a training update whose gradient norm exceeds "
                                      "this many times the running norm down to that bound (0: off)")
    guard_warmup_steps: int = Field(10, ge=0, description="updates that seed the running gradient norm before "
                                    "--guard-spike-factor applies")
    guard_undo: bool = Field(True, description="copy the weights and optimizer state before each update and put them "
                             "back if the update left NaN/Inf (one extra copy of the model and optimizer state)")
    keep_checkpoints: int = Field(3, ge=1, description="checkpoints kept: latest plus this minus one older ones "
                                  "under <store>/checkpoints-history (see collafuse-server checkpoints)")
    split_max_strikes: int = Field(10, ge=0, description="split protocol: split gradients refused in a row (NaN/Inf, "
                                   "over --split-max-grad-norm, malformed) after which a client is dropped for "
                                   "--split-strike-cooldown (0: never)")
    split_strike_cooldown: float = Field(600.0, ge=0, description="split protocol: seconds a dropped client's split "
                                         "steps are refused")
    split_clip_grad_norm: float = Field(0.0, ge=0, description="split protocol: scale each image's gradient row "
                                        "down to this L2 norm before it enters a round (0: off; rows above "
                                        "--split-max-grad-norm are refused either way)")
    split_relative_grad_clip: float = Field(10.0, ge=0, description="split protocol: scale an image's gradient row "
                                            "down to this many times the clients' median row norm (each client one "
                                            "vote, so no single client moves it; 0: off)")
    split_trust_window: int = Field(32, ge=0, description="split protocol: leave out a client's step when it and "
                                    "the client's applied steps among its last this many move the model against the "
                                    "server's own denoising objective on the round's x_t (0: off; every step enters)")
    split_trust_rows: int = Field(32, ge=1, description="split protocol: rows of a round's x_t the server re-noises "
                                  "for its own objective's gradient (--split-trust-window)")
    release_max_stream_bytes: int = Field(1 << 30, ge=1 << 20, description="most bytes one Release stream may carry "
                                          "(more: RESOURCE_EXHAUSTED, nothing stored; split the upload)")
    release_max_stream_chunks: int = Field(4096, ge=1, description="most messages one Release stream may carry")
    max_clients: int = Field(10_000, ge=1, description="most registered clients (a new id beyond it: "
                             "RESOURCE_EXHAUSTED); forgotten clients free their place")

    # With --autoencoder: the latent's (channels, height, width), set by ``with_served_shape`` (server/latent.py).
    _served_shape: tuple[int, int, int] | None = PrivateAttr(None)

    @property
    def pixel_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of the images (with --autoencoder: before encoding)."""
        return (self.channels, self.image_size, self.image_size)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of what is served, trained on and sent: the images', or with --autoencoder
        their latents'."""
        return self._served_shape if self._served_shape is not None else self.pixel_shape

    def with_served_shape(self, shape: tuple[int, int, int]) -> ServerSettings:
        """A copy serving ``shape`` (the autoencoder's latent of ``pixel_shape``)."""
        copy = self.model_copy()
        copy._served_shape = shape
        return copy

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
    dp_epsilon: float | None = Field(None, gt=0, description="split protocol: privacy budget per image (epsilon at "
                                     "--dp-delta, replace-one): an image whose next send would pass it is sent no "
                                     "more (unset: the exposure cap --split-max-image-exposure is the budget; epsilon "
                                     "is still reported)")
    dp_delta: float = Field(1e-5, gt=0, lt=1, description="delta at which epsilon is reported and budgeted")
    split_max_image_exposure: float = Field(1.0, gt=0, description="split protocol: most one image may be exposed, "
                                            "in ambient releases at the client's noise floor (its x_t and noised "
                                            "gradients over every send, as Gaussian mechanisms); an image whose next "
                                            "send would pass it is sent no more. inf: no cap (without DP noise a "
                                            "send reveals its image exactly)")
    split_max_sends_per_image: int = Field(0, ge=0, description="split protocol: most times one image is sent "
                                           "(0: no count limit; --split-max-image-exposure still applies)")


class ClientSettings(CollafuseSettings, TrainingFields, RuntimeFields, TlsFields, SplitFields, AutoencoderFields):
    data: Path | None = Field(None, description="folder of private images (one sub-folder per class)")
    server: str = Field("localhost:50051", description="HOST:PORT of collafuse-server")
    client_id: str | None = Field(None, description="stable id of this client (default: kept in the workdir)")
    workdir: Path = Field(Path("./collafuse-client"), description="ledger, local model, samples and metrics")
    cut: int = Field(200, ge=0, description="cut point zeta: 0 = global model, T = independent client model")
    handoff_margin: int = Field(0, ge=0, description="the local model also covers (cut, cut + margin], and sampling "
                                "hands off at cut + margin: the server's hand-off is noisier, nothing more is released, "
                                "and the client's sampling compute grows by margin / T (0: hand off at the cut)")
    # Issue 19: a scarce client's model trained uniformly loses the class of about one hand-off in nine; linear
    # draws keep more at the same steps and cost FID, so uniform stays the default (docs/benchmarks.md).
    local_timesteps: LocalTimesteps = Field("uniform", description="how local training draws t in [1, cut] "
                                            "(with --handoff-margin, [1, cut + margin]): uniform, or linear "
                                            "(P(t) proportional to t: more of the noisier steps, where the class "
                                            "of the hand-off is kept or lost; fewer of the last few)")
    protocol: Protocol = Field("ambient", description="training protocol: ambient (release x_cut once per image) "
                               "or split (split learning with gradient exchange; see --dp-clip)")
    image_size: int | None = Field(None, description="expected image side (default: the server's)")
    model_preset: str = Field("tiny", description="local UNet size: tiny, small or base")
    # Issue 19: a scarce client's model trained from scratch loses the class of about one hand-off in nine at the
    # study's budget; started from the shared model's weights it keeps more at the same steps (docs/benchmarks.md).
    init_from_server: bool = Field(False, description="start the local model from the shared model's weights "
                                   "(the server must run with --share-model): the client waits for the server's "
                                   "training first, and its local model takes the server's preset")
    train_steps: int = Field(1000, ge=0, description="local training steps on t in [1, cut]")
    samples_per_class: int = Field(4, ge=0, description="images generated per class of the client's data")
    inference_steps: int = Field(100, ge=0, description="sampling chain length (0: all T)")
    scheduler: Literal["ddpm", "ddim"] = Field("ddpm", description="sampling scheduler")
    # > 0: the wire reads 0 as "unset" (1.0).
    guidance_scale: float = Field(1.0, gt=0, description="classifier-free guidance of the client's half of the "
                                  "chain (cut ... 0), > 0 (1 = plain conditional: one model evaluation per step)")
    # The class is decided in the server's (high-noise) half, so guiding that half buys the accuracy at no client
    # compute: on the same trained models, ζ = 200, both regimes and seeds, accuracy +0.14 to +0.20 and FID within
    # 0.5 of plain sampling (docs/benchmarks.md). None (what cut_study.py passes, one scale for both halves):
    # follow guidance_scale.
    server_guidance_scale: float | None = Field(2.0, gt=0, description="classifier-free guidance the server applies "
                                                "to its half of the chain (T ... cut), > 0 (1 = plain conditional); "
                                                "the default 2 guides the shared model's half, where the class is "
                                                "decided, at two server evaluations per step and none more on the "
                                                "client")
    wait_for_server: bool = Field(True, description="before generating, wait until the server finished training")
    wait_timeout: float = Field(1800.0, ge=0, description="most seconds to wait for the server: its training, "
                                "or a restart (each call retries with backoff until then)")
    rpc_timeout: float = Field(60.0, gt=0, description="deadline of a single RPC in seconds")
    retries: int = Field(0, ge=0, description="most attempts per call for an unreachable server "
                         "(0: retry with backoff and jitter until --wait-timeout)")
    # The client's own noise floor (client/noise_floor.py): the server's schedule is checked against it.
    max_release_alpha_bar: float | None = Field(None, gt=0, le=1, description="most alpha_bar a release may have "
                                                "per native pixel (its noise floor), for this run; default: "
                                                "alpha_bar at --cut under the reference schedule")
    re_release_confirm: bool = Field(False, description="confirm releasing images again: at another noise level "
                                     "(independent noise) or after a forget; counted in the ledger")
    # The client's reference schedule (client/noise_floor.py): without --max-release-alpha-bar its noise floor is
    # alpha_bar at --cut under this schedule, whatever schedule a server sends (the standard DDPM one by default).
    reference_timesteps: int = Field(1000, ge=2, le=10_000, description="T of this client's reference schedule: "
                                     "its noise floor is alpha_bar at --cut under it (not the server's schedule)")
    reference_beta_start: float = Field(1e-4, gt=0, lt=1, description="first beta of the reference schedule")
    reference_beta_end: float = Field(0.02, gt=0, lt=1, description="last beta of the reference schedule")
    reference_beta_schedule: BetaSchedule = Field("linear", description="beta schedule of the reference schedule")

    @model_validator(mode="after")
    def _init_from_server_needs_a_trained_server(self) -> Self:
        if self.init_from_server and self.protocol != "ambient":
            raise ValueError("--init-from-server starts the local model from the shared model once the server's "
                             "training is done; the split protocol trains both at once: use --protocol ambient or "
                             "drop --init-from-server")
        if self.init_from_server and not self.wait_for_server:
            raise ValueError("--init-from-server needs the server's trained weights, so it waits for the server's "
                             "training: drop --no-wait-for-server or --init-from-server")
        return self

    def server_half_guidance(self) -> float:
        """The guidance scale the client asks the server to sample its half with."""
        return self.guidance_scale if self.server_guidance_scale is None else self.server_guidance_scale

    def handoff_cut(self, num_train_timesteps: int) -> int:
        """Where sampling hands off and the local model's steps end: the cut plus --handoff-margin, at most T (the
        global model, cut 0, has no local model to extend)."""
        return 0 if self.cut == 0 else min(num_train_timesteps, self.cut + self.handoff_margin)
