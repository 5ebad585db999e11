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

Privacy (client/dp.py): the known leak (docs/design.md §3) is that g = 2(eps_hat - eps)/n gives the server eps,
hence x0. Every send of an image (its x_t and its clipped, noised gradient row) is one Gaussian mechanism on that
image, priced at the t it is sent at (``split_send_mu2``), and an image's sends compose by adding mu^2. Each image
has a cap, in units of one ambient release at the client's noise floor (``--split-max-image-exposure``, default 1:
a server that links an image's rows across steps learns no more than one release would tell it), and, with
``--dp-epsilon``, the mu of that epsilon; ``--split-max-sends-per-image`` caps the count. Batches are fixed-size
draws without replacement from the images that may still be sent, t ~ U(cut, T]; an image whose drawn t would
take it past its cap is retired for the rest of the run (the decision depends only on t and public settings, never
on pixels; a later run draws again within what is left of each cap). The client is done when no image may be sent. Without DP noise a send reveals its image exactly (mu is
infinite): nothing is sent unless the cap is lifted (``--split-max-image-exposure inf``). Each step is charged
in the ledger before it goes (client/privacy_ledger.py); epsilon is that of the most exposed image.
Near-duplicates (client/image_identity.py) are one image: only the first is sent.

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
from collafuse.client.dp import gaussian_mu, privatize, release_mu2, split_send_mu2
from collafuse.client.errors import ClientError
from collafuse.client.image_identity import ImageIdentity, find_copies
from collafuse.client.ledger import Ledger
from collafuse.client.noise_floor import release_floor
from collafuse.client.privacy_ledger import Exposure, PrivacyLedger, Send, ambient_mu2, finite_or_none
from collafuse.client.protocols.base import ClientProtocol, ContributionReport
from collafuse.common.autoencoder import data_bound
from collafuse.common.codec import TensorError, decode, encode
from collafuse.common.config import ClientSettings
from collafuse.common.diffusion import q_sample
from collafuse.common.schedule import Cut, ScheduleConfig
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
    steps: int = _default("split_steps")  # 0: until the server is done or no image may be sent any more
    dp_clip: float | None = _default("dp_clip")
    dp_noise_multiplier: float = _default("dp_noise_multiplier")
    dp_epsilon: float | None = _default("dp_epsilon")  # a per-image cap besides the exposure cap (None: none)
    dp_delta: float = _default("dp_delta")
    max_image_exposure: float = _default("split_max_image_exposure")  # in ambient releases at the floor
    max_sends_per_image: int = _default("split_max_sends_per_image")  # 0: no count limit
    value_bound: float = 1.0  # the data's range per element: 1 for pixels, LATENT_BOUND for latents (client/dp.py)

    def __post_init__(self) -> None:
        if self.dp_noise_multiplier > 0 and self.dp_clip is None:
            raise ClientError("--dp-noise-multiplier needs --dp-clip: the noise is in units of the clipping norm")
        if not self.max_image_exposure > 0:
            raise ClientError(f"--split-max-image-exposure must be > 0, got {self.max_image_exposure}")

    @property
    def dp(self) -> bool:
        return self.dp_clip is not None


@dataclass
class SplitReport(ContributionReport):
    """A split contribution: steps, losses and privacy."""

    steps: int = 0
    server_step: int = 0
    losses: list[list[float]] = field(default_factory=list)
    sample_rate: float = 0.0  # the first step's batch over the images that could be drawn
    noise_multiplier: float | None = None  # of the least noisy send possible (t = cut + 1), 1/mu (None: unbounded)
    dp_clip: float | None = None
    dp_noise_multiplier: float = 0.0
    epsilon: float | None = None  # of the most exposed image, at dp_delta, over this client's ledger (None: unbounded)
    epsilon_unbounded: bool = False
    dp_delta: float = 0.0
    dp_epsilon_budget: float | None = None
    max_image_exposure: float | None = None  # the most exposed image, in ambient releases at the floor
    image_exposure_cap: float | None = None  # the cap, in the same unit (None: no cap)
    images_sent: int = 0  # distinct images sent this run
    retired: int = 0  # images retired this run (a drawn t past the cap, or nothing left of it)
    copies: int = 0  # near-duplicates of another image: never sent
    stopped: str = ""  # why sending stopped: "server done", "steps", "privacy budget spent: ..."
    late: int = 0  # steps whose round closed before their backward came (nothing applied; privacy still spent)
    seconds: float = 0.0


@dataclass(frozen=True)
class PlannedStep:
    """One step's draw: which images (indices), at which t, what each send costs (mu^2), the share it drew."""

    index: torch.Tensor
    t: torch.Tensor
    mu2: list[float]
    sample_rate: float
    retired: list[int]  # images retired while drawing it (their drawn t did not fit their cap)


class SendPlanner:
    """Which images a step sends, and at which t; the per-image caps.

    A step draws min(batch, pool) images without replacement from the pool (images that may still be sent) and
    t ~ U{cut + 1, ..., T} for each. An image whose send at its drawn t would take its mu^2 past its cap is retired
    (sent no more) instead; a draw that retires every image it drew is drawn again. Everything here depends only
    on the secret generator and public settings, never on pixels, so the sends an image gets are a schedule fixed
    independently of the data (client/dp.py).
    """

    def __init__(
        self,
        pool: Sequence[int],
        spent: torch.Tensor,
        sends: torch.Tensor,
        cost: torch.Tensor,
        cap: float,
        max_sends: int,
        cut: int,
        batch_size: int,
        generator: torch.Generator,
    ) -> None:
        self.pool = list(pool)
        self.spent = spent.double().clone()  # mu^2 so far, per image (ambient releases included)
        self.sends = sends.long().clone()
        self.cost = cost.double()  # mu^2 of one send at t, indexed by t (entries <= cut unused)
        self.cap = cap
        self.max_sends = max_sends
        self.cut = cut
        self.T = len(cost) - 1
        self.batch_size = batch_size
        self.generator = generator
        self.retired: list[int] = []
        self._drop(self._exhausted(self.pool))

    def fits(self, i: int, t: int) -> bool:
        return math.isinf(self.cap) or float(self.spent[i] + self.cost[t]) <= self.cap

    def _exhausted(self, images: Sequence[int]) -> list[int]:
        """Images that can never be sent again: the count cap is reached, or not even t = T fits."""
        return [i for i in images if (self.max_sends and int(self.sends[i]) >= self.max_sends) or not self.fits(i, self.T)]

    def _drop(self, images: Sequence[int]) -> None:
        gone = set(images)
        if gone:
            self.pool = [i for i in self.pool if i not in gone]
            self.retired.extend(sorted(gone))

    def draw(self) -> PlannedStep | None:
        """The next step's images and t (nothing charged yet), or None when no image may be sent any more."""
        retired: list[int] = []
        while self.pool:
            size = len(self.pool)
            take = min(self.batch_size, size)
            pick = [self.pool[int(k)] for k in torch.randperm(size, generator=self.generator)[:take]]
            t = torch.randint(self.cut + 1, self.T + 1, (take,), generator=self.generator)
            keep = [k for k, (i, ti) in enumerate(zip(pick, t.tolist())) if self.fits(i, ti)]
            over = [pick[k] for k in range(take) if k not in keep]
            self._drop(over)
            retired.extend(over)
            if keep:
                index = torch.tensor([pick[k] for k in keep], dtype=torch.long)
                times = t[keep]
                return PlannedStep(index, times, [float(self.cost[int(v)]) for v in times], take / size, retired)
        return None

    def commit(self, step: PlannedStep) -> list[int]:
        """Charge a step that is being sent; returns the images it exhausted (retired from now on)."""
        for i, mu2 in zip(step.index.tolist(), step.mu2):
            self.spent[i] += mu2
            self.sends[i] += 1
        done = self._exhausted(step.index.tolist())
        self._drop(done)
        return done


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
            dp_delta=settings.dp_delta, max_image_exposure=settings.split_max_image_exposure,
            max_sends_per_image=settings.split_max_sends_per_image,
            value_bound=data_bound(settings.autoencoder is not None),
        ))

    def send_costs(self, schedule: ScheduleConfig, image_shape: Sequence[int]) -> torch.Tensor:
        """mu^2 of one send of one image at each t (index t; client/dp.py ``split_send_mu2``): x_t and gradient row."""
        d = math.prod(int(s) for s in image_shape)
        opts = self.options
        return torch.tensor([split_send_mu2(float(ab), d, opts.dp_clip, opts.dp_noise_multiplier,
                                            bound=opts.value_bound)
                             for ab in schedule.alphas_cumprod().tolist()], dtype=torch.float64)

    def image_cap(self, floor_alpha_bar: float, image_shape: Sequence[int]) -> float:
        """The most mu^2 one image may reach: the exposure cap (in releases at the floor) and --dp-epsilon's mu."""
        opts = self.options
        reference = release_mu2(floor_alpha_bar, math.prod(int(s) for s in image_shape), bound=opts.value_bound)
        cap = math.inf if math.isinf(opts.max_image_exposure) else opts.max_image_exposure * reference
        if opts.dp_epsilon is not None:
            cap = min(cap, gaussian_mu(opts.dp_epsilon, opts.dp_delta) ** 2)
        return cap

    def noise_multiplier(self, schedule: ScheduleConfig, cut: int, image_shape: Sequence[int]) -> float:
        """1/mu of the least noisy send a step may make (t = cut + 1), x_t and gradient together."""
        mu2 = float(self.send_costs(schedule, image_shape)[cut + 1])
        return 0.0 if math.isinf(mu2) else mu2**-0.5

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
        pixels: torch.Tensor | None = None,
    ) -> SplitReport:
        """Split steps until the server is done, --split-steps are sent, or no image may be sent any more."""
        opts = self.options
        T = schedule.num_train_timesteps
        report = SplitReport(images=len(images), cut=cut, dp_clip=opts.dp_clip,
                             dp_noise_multiplier=opts.dp_noise_multiplier, dp_delta=opts.dp_delta,
                             dp_epsilon_budget=opts.dp_epsilon)
        if Cut(cut, T).independent:
            log.info("cut %d = T: independent client model, the server owns no steps and nothing is sent", cut)
            report.stopped = "cut = T"
            return report
        if len(images) == 0:
            raise ClientError("no images to train the server's half on")
        floor = release_floor(ledger, schedule, cut, server, images)  # the noise floor per element, as for a release
        alphas_cumprod = schedule.alphas_cumprod()
        shape = tuple(images.shape[1:])
        d = math.prod(shape)
        cost = self.send_costs(schedule, shape)
        cap = self.image_cap(floor, shape)
        reference = release_mu2(floor, d, bound=self.options.value_bound)
        report.noise_multiplier = finite_or_none(self.noise_multiplier(schedule, cut, shape)) or None
        report.image_exposure_cap = finite_or_none(cap / reference) if 0 < reference < math.inf else None
        if Cut(cut, T).global_model:
            log.warning("!!! cut 0 is the GLOBAL-MODEL BASELINE: x_t at t = 1 is nearly the raw image. Not private. !!!")
        if not opts.dp:
            log.warning(
                "split protocol without --dp-clip: each step's gradient 2(eps_hat - eps)/n gives the server eps, hence "
                "x0 = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t) exactly (docs/design.md §3); epsilon is infinite"
            )
        privacy = PrivacyLedger(ledger.path)
        started = time.perf_counter()
        try:
            planner, ids = self._planner(ledger, privacy, images, paths, cut, cost, cap, report, pixels)
            self._steps(connection, privacy, planner, ids, images, labels, client_id=client_id, cut=cut,
                        floor=floor, alphas_cumprod=alphas_cumprod, server=server, report=report)
        finally:
            summary = privacy.summary(opts.dp_delta, reference)
            report.epsilon, report.epsilon_unbounded = summary["epsilon"], summary["epsilon_unbounded"]
            report.max_image_exposure = summary.get("max_image_exposure_releases")
            report.seconds = round(time.perf_counter() - started, 4)
            privacy.close()
        log.info("split: %d step(s) sent (%s); privacy spent: epsilon %s at delta %g (most exposed image: %s of one "
                 "release at the floor)", report.steps, report.stopped,
                 "inf" if report.epsilon_unbounded else f"{report.epsilon:.4g}", opts.dp_delta,
                 "n/a" if report.max_image_exposure is None else f"{report.max_image_exposure:.3g}")
        return report

    def _planner(
        self, ledger: Ledger, privacy: PrivacyLedger, images: torch.Tensor, paths: Sequence[str] | None, cut: int,
        cost: torch.Tensor, cap: float, report: SplitReport, pixels: torch.Tensor | None = None,
    ) -> tuple[SendPlanner, list[ImageIdentity]]:
        """The pool of images that may be sent, with what each has spent (split sends and ambient releases)."""
        seen = images if pixels is None else pixels  # identities and copies by the pixels (client/latent.py)
        ids = ledger.identify(seen, paths)
        copies = find_copies(ids, seen, {**ledger.released_hashes(), **privacy.sent_hashes()})
        report.copies = len(copies)
        for i, copy in sorted(copies.items()):
            log.warning("not sending %s: it is %s (sending both would let the server average their noise away)",
                        ids[i].name(), copy.describe())
        exposures = privacy.exposures()
        released = ambient_mu2(ledger, int(images[0].numel()), self.options.value_bound)
        spent = torch.tensor([exposures.get(x.key, _NONE).mu2 + released.get(x.key, 0.0) for x in ids],
                             dtype=torch.float64)
        sends = torch.tensor([exposures.get(x.key, _NONE).sends for x in ids], dtype=torch.long)
        pool = [i for i, x in enumerate(ids) if i not in copies]
        # Secret randomness: which image when and at which t, eps and the DP noise (see the module docstring).
        generator = torch.Generator().manual_seed(secrets.randbits(63))
        planner = SendPlanner(pool, spent, sends, cost, cap, self.options.max_sends_per_image, cut,
                              min(self.options.batch_size, len(images)), generator)
        return planner, ids

    def _steps(
        self, connection: ServerConnection, privacy: PrivacyLedger, planner: SendPlanner, ids: list[ImageIdentity],
        images: torch.Tensor, labels: Sequence[int], *, client_id: str, cut: int, floor: float,
        alphas_cumprod: torch.Tensor, server: str, report: SplitReport,
    ) -> None:
        opts = self.options
        labels_t = torch.as_tensor(list(labels), dtype=torch.long)
        generator = torch.Generator().manual_seed(secrets.randbits(63))  # eps
        dp_generator = torch.Generator().manual_seed(secrets.randbits(63))
        late = 0  # backwards in a row refused because their round had closed
        sent: set[int] = set()
        planned = draw_step(planner)
        while True:
            if opts.steps and report.steps >= opts.steps:
                report.stopped = "steps"
                break
            if planned is None:
                report.stopped = self._done_message(report.steps, planner, privacy)
                if report.steps == 0 and self._never_sendable(planner):
                    # Waiting for a server that this client will never train would only hang: say so and stop.
                    raise ClientError(report.stopped)
                log.warning("%s", report.stopped)
                break
            step, planned = planned, None
            idx, t = step.index, step.t
            x0 = images[idx].float().cpu()
            eps = torch.randn(x0.shape, generator=generator)
            batch = noise_batch(x0, t, labels_t[idx], eps, alphas_cumprod, cut)
            request = forward_request(client_id, batch, cut, floor, alphas_cumprod)
            # Sent counts as spent: charged before the first byte goes.
            seq, spent = privacy.record_step(
                server=server, protocol=self.name, sample_rate=step.sample_rate, delta=opts.dp_delta,
                sends=[Send(ids[i].key, int(ti), mu2, ids[i].phash) for i, ti, mu2 in zip(idx.tolist(), t.tolist(), step.mu2)],
            )
            planner.commit(step)
            if not report.sample_rate:
                report.sample_rate = step.sample_rate
            sent.update(idx.tolist())
            report.images_sent = len(sent)
            # A full round is RESOURCE_EXHAUSTED with a retry hint: the connection waits it out.
            reply = connection.split_forward(request)
            report.calls += 1
            report.payload_bytes += len(request.x_t.data)
            if reply.done:
                privacy.mark_acked([seq])
                report.stopped = "server done"
                break
            grad, loss = self._gradient(reply, batch, dp_generator)
            # The next step is drawn now, so that the last step of this run can say so: the server then does not
            # wait for this client in later rounds.
            if not (opts.steps and report.steps + 1 >= opts.steps):
                planned = draw_step(planner)
            last = bool(opts.steps and report.steps + 1 >= opts.steps) or planned is None
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
                if planned is None and not (opts.steps and report.steps + 1 >= opts.steps):
                    planned = draw_step(planner)
                continue
            late = 0
            privacy.mark_acked([seq])
            report.steps += 1
            report.sent += len(idx)
            report.server_step = int(ack.server_step)
            report.losses.append([report.steps, loss])
            if report.steps % LOG_EVERY == 0 or report.steps == 1:
                log.info("split step %d: loss %.4f, server step %d/%s (round %d: %d client(s), %d images), "
                         "epsilon %.4g at delta %g", report.steps, loss, ack.server_step, ack.max_steps or "inf",
                         ack.round, ack.round_clients, ack.round_images, spent, opts.dp_delta)
            if ack.done:
                report.stopped = "server done"
                break
        report.retired = len(planner.retired)

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

    @staticmethod
    def _never_sendable(planner: SendPlanner) -> bool:
        """Every send would cost infinite exposure (no DP noise) under a finite cap: nothing may ever go."""
        return bool(torch.isinf(planner.cost[planner.cut + 1:]).all()) and not math.isinf(planner.cap)

    def _done_message(self, steps: int, planner: SendPlanner, privacy: PrivacyLedger) -> str:
        opts = self.options
        spent = privacy.epsilon(opts.dp_delta)
        if self._never_sendable(planner):
            why = (" Nothing may be sent without DP noise: every split step's gradient gives the server its images "
                   "exactly (epsilon is infinite). Pass --dp-clip and --dp-noise-multiplier > 0, or "
                   "--split-max-image-exposure inf to send anyway (not private).")
        else:
            why = (" Each image is retired when a send would take it past its cap (--split-max-image-exposure "
                   f"{opts.max_image_exposure:g} ambient release(s) at your noise floor"
                   + (f", --dp-epsilon {opts.dp_epsilon:g} at delta {opts.dp_delta:g}" if opts.dp_epsilon is not None else "")
                   + (f", --split-max-sends-per-image {opts.max_sends_per_image}" if opts.max_sends_per_image else "")
                   + "). To send more: raise those, add noise (--dp-noise-multiplier), use a larger --cut, or train the "
                   "rest locally.")
        return (f"privacy budget spent: no image may be sent any more, stopping split training after {steps} step(s) "
                f"this run; epsilon {spent:.4g} at delta {opts.dp_delta:g} for the most exposed image.{why}")


_NONE = Exposure()


def draw_step(planner: SendPlanner) -> PlannedStep | None:
    """The next step's draw (a module function, so that a test may watch which images each step sends)."""
    return planner.draw()
