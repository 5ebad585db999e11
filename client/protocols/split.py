"""The split protocol on the client (docs/design.md §4): the server's half of the model is trained in rounds.

Per step: draw a batch of private x0, t ~ U(cut, T], eps; send x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps
with t and the labels; receive eps_hat; compute the loss against the private eps here; send g = dL/d(eps_hat)
(with --dp-clip: each image's row clipped to norm C and Gaussian noise sigma*C added first). x0, eps and the
loss never leave (the loss only without DP, as a number for the server's metrics). The server answers the
backward once its round (one step of every client, one optimizer step) is applied; the next forward then
belongs to the next round. ``--split-batch-size`` is this client's share of a round's batch. A backward that
came after its round closed is refused; the client draws a fresh batch and goes on (the spend is recorded).

The send guard: every image-derived tensor leaves through ``guard_outgoing``, which refuses anything that
is not a ``NoisedBatch`` made here by ``noise_batch`` (so it was noised), whose t are not all above the cut
and within the client's noise floor, or whose bytes changed after noising.

Privacy: the known leak (docs/design.md §3) is that g = 2(eps_hat - eps)/n gives the server eps, hence x0. Each
step is accounted as one Gaussian mechanism on every image of the batch, x_t and the gradient together
(client/dp.py ``combined_noise_multiplier``), with x_t taken at the least noisy level a step may send
(t = cut + 1), at sample rate batch / images: one batch per round, drawn here. Without DP noise the gradient is exact: epsilon is infinite
and the ledger says so. The spend is recorded before each step goes (client/privacy_ledger.py), and the
client stops when the next step would exceed --dp-epsilon.

Randomness (batches, t, eps, DP noise) comes from a secret seed: a server that knew it could regenerate
eps and subtract it from x_t.
"""

from __future__ import annotations

import hashlib
import logging
import math
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Self

import grpc
import torch

from collafuse.client.connection import ServerConnection
from collafuse.client.dp import (
    combined_noise_multiplier,
    gradient_noise_multiplier,
    privatize,
    release_noise_multiplier,
)
from collafuse.client.errors import ClientError
from collafuse.client.ledger import Ledger
from collafuse.client.noise_floor import check_schedule
from collafuse.client.privacy_ledger import PrivacyLedger, finite_or_none
from collafuse.client.protocols.base import ClientProtocol, ReleaseReport
from collafuse.common.codec import TensorError, decode, encode
from collafuse.common.config import ClientSettings
from collafuse.common.diffusion import q_sample
from collafuse.common.schedule import ScheduleConfig
from collafuse.v1 import collafuse_pb2

log = logging.getLogger(__name__)

LOG_EVERY = 50
# Backwards in a row whose round closed before they came: past this the server is not waiting for this client.
MAX_LATE_IN_ROW = 5


class UnsafeSend(ClientError):
    """The client refused to send a tensor: not noised here, t <= cut, below the noise floor, or altered."""


_MINT = object()  # only noise_batch() holds it: a NoisedBatch made elsewhere is refused by the guard


@dataclass(frozen=True)
class NoisedBatch:
    """x_t of private images, as ``noise_batch`` made it. ``x0`` and ``eps`` stay on the client."""

    x_t: torch.Tensor
    t: torch.Tensor
    labels: torch.Tensor
    x0: torch.Tensor = field(repr=False)
    eps: torch.Tensor = field(repr=False)
    digest: str
    mint: object = field(default=None, repr=False)


def _digest(x: torch.Tensor) -> str:
    return hashlib.sha256(x.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def noise_batch(
    x0: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, eps: torch.Tensor, alphas_cumprod: torch.Tensor, cut: int
) -> NoisedBatch:
    """x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps for t > cut (q_sample), sealed for ``guard_outgoing``."""
    if bool((t <= cut).any()):
        raise UnsafeSend(f"refusing to noise a batch for the server at t <= cut {cut}: those steps are the client's own")
    x_t = q_sample(x0.float(), t, eps.float(), alphas_cumprod).float().contiguous()
    return NoisedBatch(x_t, t.clone(), labels.clone(), x0, eps, _digest(x_t), _MINT)


def guard_outgoing(batch: object, cut: int, floor_alpha_bar: float, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The x_t that may leave, or UnsafeSend: the one gate every image-derived tensor of a split step passes.

    Refused: anything but a ``NoisedBatch`` from ``noise_batch`` (a raw image, a tensor noised elsewhere);
    any t <= cut; any t whose alpha_bar exceeds the client's noise floor; bytes changed after noising;
    an x_t that is not q_sample(x0, t, eps) of the batch's own x0 and eps.
    """
    if not isinstance(batch, NoisedBatch) or batch.mint is not _MINT:
        raise UnsafeSend(
            f"refusing to send a {type(batch).__name__}: only batches noised by noise_batch() (x_t with t above the "
            "cut) may leave this client"
        )
    t = batch.t
    if t.numel() == 0 or t.shape[0] != batch.x_t.shape[0]:
        raise UnsafeSend(f"refusing to send x_t of {batch.x_t.shape[0]} images with {t.numel()} timesteps")
    if bool((t <= cut).any()):
        low = int(t.min())
        raise UnsafeSend(f"refusing to send x_t at t = {low} <= cut {cut}: steps at or below the cut never leave")
    worst = float(alphas_cumprod[int(t.min())])
    if worst > floor_alpha_bar:
        raise UnsafeSend(
            f"refusing to send x_t at t = {int(t.min())}: alpha_bar {worst:.4g} is above this client's noise floor "
            f"{floor_alpha_bar:.4g} (less noise than it agreed to release)"
        )
    if _digest(batch.x_t) != batch.digest:
        raise UnsafeSend("refusing to send x_t: it changed after it was noised")
    expected = q_sample(batch.x0.float(), t, batch.eps.float(), alphas_cumprod).float()
    if not torch.equal(expected, batch.x_t):
        raise UnsafeSend("refusing to send x_t: it is not q_sample of its own image and noise")
    return batch.x_t


def forward_request(
    client_id: str, batch: NoisedBatch, cut: int, floor_alpha_bar: float, alphas_cumprod: torch.Tensor
) -> collafuse_pb2.SplitForwardRequest:
    """The SplitForward message; its x_t comes only through ``guard_outgoing``."""
    x_t = guard_outgoing(batch, cut, floor_alpha_bar, alphas_cumprod)
    return collafuse_pb2.SplitForwardRequest(
        client_id=client_id, x_t=encode(x_t), t=[int(v) for v in batch.t], labels=[int(v) for v in batch.labels]
    )


def loss_gradient(eps_hat: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Per-image rows d l_i / d eps_hat_i of l_i = mean((eps_hat_i - eps_i)^2), and the batch loss mean_i l_i.

    The rows divided by the batch size are dL/d(eps_hat) of L = mse(eps_hat, eps), the batch mean.
    """
    eps_hat = eps_hat.detach().clone().requires_grad_(True)
    per_image = (eps_hat - eps).pow(2).flatten(1).mean(1)
    (rows,) = torch.autograd.grad(per_image.sum(), eps_hat)
    return rows, float(per_image.detach().mean())


def _default(name: str) -> Any:
    return ClientSettings.model_fields[name].default


@dataclass(frozen=True)
class SplitOptions:
    """The client's split settings (their defaults are ClientSettings', declared once in common/config.py)."""

    batch_size: int = _default("batch_size")  # this client's share of a round
    steps: int = _default("split_steps")  # 0: until the server is done or the budget is spent
    dp_clip: float | None = _default("dp_clip")
    dp_noise_multiplier: float = _default("dp_noise_multiplier")
    dp_epsilon: float | None = _default("dp_epsilon")
    dp_delta: float = _default("dp_delta")

    def __post_init__(self) -> None:
        if self.dp_noise_multiplier > 0 and self.dp_clip is None:
            raise ClientError("--dp-noise-multiplier needs --dp-clip: the noise is in units of the clipping norm")

    @property
    def dp(self) -> bool:
        return self.dp_clip is not None


@dataclass
class SplitReport(ReleaseReport):
    """A split contribution: the fields of a release report plus steps, losses and privacy."""

    steps: int = 0
    server_step: int = 0
    losses: list[list[float]] = field(default_factory=list)
    sample_rate: float = 0.0
    noise_multiplier: float | None = None  # per step, x_t and gradient together (None: unbounded)
    dp_clip: float | None = None
    dp_noise_multiplier: float = 0.0
    epsilon: float | None = None  # spent at dp_delta over this client's ledger (None: unbounded)
    epsilon_unbounded: bool = False
    dp_delta: float = 0.0
    dp_epsilon_budget: float | None = None
    stopped: str = ""  # why sending stopped: "server done", "steps", "budget: ..."
    late: int = 0  # steps whose round closed before their backward came (nothing applied; privacy still spent)
    seconds: float = 0.0


class SplitClient(ClientProtocol):
    """Trains the server's model through split steps; the loss stays on the client."""

    name = "split"
    wire = collafuse_pb2.PROTOCOL_SPLIT

    def __init__(self, options: SplitOptions | None = None) -> None:
        self.options = options or SplitOptions()

    @classmethod
    def from_settings(cls, settings: ClientSettings | None) -> Self:
        if settings is None:
            return cls()
        return cls(SplitOptions(
            batch_size=settings.split_batch_size or settings.batch_size, steps=settings.split_steps, dp_clip=settings.dp_clip,
            dp_noise_multiplier=settings.dp_noise_multiplier, dp_epsilon=settings.dp_epsilon,
            dp_delta=settings.dp_delta,
        ))

    def noise_multiplier(self, schedule: ScheduleConfig, cut: int, image_shape: Sequence[int]) -> float:
        """The accountant's multiplier of one step for an image: x_t at t = cut + 1 and the gradient, combined."""
        alpha_bar = float(schedule.alphas_cumprod()[cut + 1])
        release = release_noise_multiplier(alpha_bar, math.prod(image_shape))
        gradient = gradient_noise_multiplier(self.options.dp_noise_multiplier) if self.options.dp else 0.0
        return combined_noise_multiplier(release, gradient)

    def contribute(
        self,
        connection: ServerConnection,
        ledger: Ledger,
        *,
        client_id: str,
        images: torch.Tensor,
        labels: Sequence[int],
        paths: Sequence[str] | None,
        cut: int,
        schedule: ScheduleConfig,
        server: str,
        resend: bool = False,
        re_release: bool = False,
    ) -> SplitReport:
        """Split steps until the server is done, --split-steps are sent, or the privacy budget is spent."""
        opts = self.options
        T = schedule.num_train_timesteps
        report = SplitReport(images=len(images), cut=cut, dp_clip=opts.dp_clip,
                             dp_noise_multiplier=opts.dp_noise_multiplier, dp_delta=opts.dp_delta,
                             dp_epsilon_budget=opts.dp_epsilon)
        if cut >= T:
            log.info("cut %d = T: independent client model, the server owns no steps and nothing is sent", cut)
            report.stopped = "cut = T"
            return report
        if len(images) == 0:
            raise ClientError("no images to train the server's half on")
        check_schedule(ledger, schedule, cut, server)  # the noise floor, as for a release
        pinned = ledger.pinned_schedule()
        floor = pinned.floor_alpha_bar if pinned is not None else float(schedule.alphas_cumprod()[cut])
        alphas_cumprod = schedule.alphas_cumprod()
        n = len(images)
        batch_size = min(opts.batch_size, n)
        sample_rate = batch_size / n
        multiplier = self.noise_multiplier(schedule, cut, images.shape[1:])
        report.sample_rate = sample_rate
        report.noise_multiplier = finite_or_none(multiplier) if multiplier > 0 else None
        if cut == 0:
            log.warning("!!! cut 0 is the GLOBAL-MODEL BASELINE: x_t at t = 1 is nearly the raw image. Not private. !!!")
        if not opts.dp:
            log.warning(
                "split protocol without --dp-clip: each step's gradient 2(eps_hat - eps)/n gives the server eps, hence "
                "x0 = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t) exactly (docs/design.md §3); epsilon is infinite"
            )
        privacy = PrivacyLedger(ledger.path)
        labels_t = torch.as_tensor(list(labels), dtype=torch.long)
        # Secret randomness: eps must not be reproducible by the server (see the module docstring).
        generator = torch.Generator().manual_seed(secrets.randbits(63))
        dp_generator = torch.Generator().manual_seed(secrets.randbits(63))
        started = time.perf_counter()
        late = 0  # backwards in a row refused because their round had closed
        try:
            while opts.steps == 0 or report.steps < opts.steps:
                if opts.dp_epsilon is not None:
                    after = privacy.total.epsilon_if(opts.dp_delta, multiplier, sample_rate)
                    if after > opts.dp_epsilon:
                        report.stopped = self._budget_message(report.steps, privacy, multiplier, sample_rate, after)
                        log.warning("%s", report.stopped)
                        break
                idx = torch.randperm(n, generator=generator)[:batch_size]
                t = torch.randint(cut + 1, T + 1, (batch_size,), generator=generator)
                x0 = images[idx].float().cpu()
                eps = torch.randn(x0.shape, generator=generator)
                batch = noise_batch(x0, t, labels_t[idx], eps, alphas_cumprod, cut)
                request = forward_request(client_id, batch, cut, floor, alphas_cumprod)
                # Sent counts as spent: charged before the first byte goes.
                seq, spent = privacy.record(server=server, protocol=self.name, images=batch_size,
                                            sample_rate=sample_rate, noise_multiplier=multiplier, delta=opts.dp_delta)
                # A full round is RESOURCE_EXHAUSTED with a retry hint: the connection waits it out.
                reply = connection.split_forward(request)
                report.calls += 1
                report.payload_bytes += len(request.x_t.data)
                if reply.done:
                    privacy.mark_acked([seq])
                    report.stopped = "server done"
                    break
                grad, loss = self._gradient(reply, batch, dp_generator)
                # The last step of this run tells the server not to wait for this client in later rounds.
                last = (opts.steps > 0 and report.steps + 1 >= opts.steps) or (
                    opts.dp_epsilon is not None
                    and privacy.total.epsilon_if(opts.dp_delta, multiplier, sample_rate) > opts.dp_epsilon
                )
                backward = collafuse_pb2.SplitBackwardRequest(client_id=client_id, step_id=reply.step_id,
                                                              grad=encode(grad), last=last)
                if not opts.dp:
                    backward.loss = loss  # with DP the loss stays here too
                report.calls += 1
                report.payload_bytes += len(backward.grad.data)
                try:
                    ack = connection.split_backward(backward)
                except ClientError as exc:
                    # The step's round closed before the gradient came: nothing was applied; draw the next batch.
                    if exc.code != grpc.StatusCode.FAILED_PRECONDITION or late >= MAX_LATE_IN_ROW:
                        raise
                    late += 1
                    report.late += 1
                    log.warning("split step refused (%s); running the next forward", exc)
                    continue
                late = 0
                privacy.mark_acked([seq])
                report.steps += 1
                report.sent += batch_size
                report.server_step = int(ack.server_step)
                report.losses.append([report.steps, loss])
                if report.steps % LOG_EVERY == 0 or report.steps == 1:
                    log.info("split step %d: loss %.4f, server step %d/%s (round %d: %d client(s), %d images), "
                             "epsilon %.4g at delta %g", report.steps, loss, ack.server_step, ack.max_steps or "inf",
                             ack.round, ack.round_clients, ack.round_images, spent, opts.dp_delta)
                if ack.done:
                    report.stopped = "server done"
                    break
            else:
                report.stopped = "steps"
        finally:
            summary = privacy.summary(opts.dp_delta)
            report.epsilon, report.epsilon_unbounded = summary["epsilon"], summary["epsilon_unbounded"]
            report.seconds = round(time.perf_counter() - started, 4)
            privacy.close()
        log.info("split: %d step(s) sent (%s); privacy spent: epsilon %s at delta %g", report.steps,
                 report.stopped, "inf" if report.epsilon_unbounded else f"{report.epsilon:.4g}", opts.dp_delta)
        return report

    def _gradient(
        self, reply: collafuse_pb2.SplitForwardReply, batch: NoisedBatch, dp_generator: torch.Generator
    ) -> tuple[torch.Tensor, float]:
        """dL/d(eps_hat) to send (rows clipped and noised with DP) and the batch loss (kept for metrics)."""
        try:
            eps_hat = decode(reply.eps_hat, what="eps_hat", dtypes=("float32",), shape=tuple(batch.x_t.shape))
        except TensorError as exc:
            raise ClientError(f"server sent a malformed SplitForward reply: {exc}") from exc
        if not reply.step_id:
            raise ClientError("server sent a SplitForward reply without a step id")
        rows, loss = loss_gradient(eps_hat, batch.eps)
        if self.options.dp_clip is not None:
            rows = privatize(rows, self.options.dp_clip, self.options.dp_noise_multiplier, dp_generator)
        return (rows / rows.shape[0]).float().contiguous(), loss

    def _budget_message(
        self, steps: int, privacy: PrivacyLedger, multiplier: float, sample_rate: float, after: float
    ) -> str:
        spent = privacy.total.epsilon(self.options.dp_delta)
        why = (
            " (every split step without DP noise reveals the images exactly: pass --dp-clip and "
            "--dp-noise-multiplier > 0)" if math.isinf(after) else ""
        )
        return (
            f"privacy budget spent: stopping split training after {steps} step(s) this run. This client has spent "
            f"epsilon {spent:.4g} of --dp-epsilon {self.options.dp_epsilon:g} (delta {self.options.dp_delta:g}); one "
            f"more step (noise multiplier {multiplier:.4g}, sample rate {sample_rate:.3g}) would bring it to "
            f"{after:.4g}{why}. To go on: raise --dp-epsilon, add noise (--dp-noise-multiplier), use a larger --cut "
            "(x_t itself costs privacy), or train the rest locally."
        )
