"""The server half of collaborative sampling (docs/design.md §5): a bounded, fair queue and cross-client batching.

A request's chain is built once (``Sampler.plan``) and its images are cut into pieces of at
most ``max_batch``. ``Sampler.submit`` admits a request or refuses it (``QueueFull``, with a
retry hint) when its client already has ``per_client`` calls queued or running, or all clients
together ``total``. Admitted pieces wait in one queue per client; a fixed pool of ``workers``
threads takes them fairly by work, not by requests: each client is charged the image-steps
(images x server steps) of the pieces it was served, and the next batch is led by the waiting
client whose head piece would finish first in that account (fair queueing by virtual time: a
client that starts waiting is charged no less than the start of the piece served last, so no
credit is banked while idle). A 4-image request therefore waits about one model batch behind clients
that flood the queue with full batches, not one batch per flooding client, and the gRPC threads
never run a model.

Cross-client batching: a worker merges the head pieces of other clients' queues into its
batch when they share the batch key (scheduler kind, number of inference steps, guidance
scale) and the EMA snapshot, up to ``max_batch`` images, waiting at most ``max_wait_s`` for
more. The merged pieces share the chain's timesteps, so they run step-synchronised: one
model call per timestep, each piece leaving the batch at its own cut (the server's steps are
a prefix of the chain). Every image keeps its own labels and its own noise stream
(seed, image index, timestep), so a request's result does not depend on what it was batched
with: it equals ``common.sampling.server_half`` on the whole request (up to the model's
batch-size dependent rounding). Requests with other keys are not merged; they wait for their turn.

Consistency: a request's EMA snapshot is pinned when its first piece starts, and all its
pieces use it. Cancelling (the caller went away) or ``close`` (shutdown) completes the request
at once with ``SampleCancelled`` and frees its slot; a running batch drops it at the next step.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from diffusers.models import UNet2DModel

from collafuse.common.config import ServerSettings
from collafuse.common.models import as_denoiser
from collafuse.common.sampling import Chain, denoise_step, image_generators, initial_noise, make_chain
from collafuse.common.schedule import ScheduleConfig, SchedulerKind

log = logging.getLogger(__name__)

# (model step, frozen EMA model) -- Trainer.ema_snapshot.
ModelSource = Callable[[], tuple[int, UNet2DModel]]
# Retry hints stay in this range (seconds) whatever the running average says.
MIN_RETRY_S, MAX_RETRY_S = 0.05, 60.0


class SampleCancelled(Exception):
    """The caller went away or the server is shutting down."""


class QueueFull(Exception):
    """The sampling queue (the client's share or the whole) is full; retry after ``retry_after_s``."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


def _default(name: str) -> Any:
    return ServerSettings.model_fields[name].default


@dataclass(frozen=True)
class SamplingLimits:
    """How much sampling work the server admits and how it runs it (ServerSettings.sample_*)."""

    # Defaults are the server settings' (declared once, in common/config.py).
    workers: int = _default("sample_workers")
    per_client: int = _default("sample_queue_per_client")
    total: int = _default("sample_queue_total")
    max_batch: int = _default("sample_max_batch")
    max_wait_s: float = _default("sample_max_wait_ms") / 1000
    cross_client: bool = _default("sample_cross_client")

    @classmethod
    def from_settings(cls, settings: ServerSettings, **overrides: Any) -> SamplingLimits:
        limits = cls(
            workers=settings.sample_workers, per_client=settings.sample_queue_per_client,
            total=settings.sample_queue_total, max_batch=settings.sample_max_batch,
            max_wait_s=settings.sample_max_wait_ms / 1000, cross_client=settings.sample_cross_client,
        )
        return replace(limits, **overrides)


@dataclass(frozen=True)
class SampleJob:
    labels: Sequence[int]
    seed: int
    num_inference_steps: int
    kind: SchedulerKind
    guidance_scale: float
    cut: int


@dataclass(frozen=True)
class SamplePlan:
    """A job with its chain built once: the server's slice of it and the image pieces."""

    job: SampleJob
    chain: Chain
    steps: list[int]  # the server's 0-based timesteps (t > cut), in chain order: a prefix of the chain
    batches: list[list[int]]  # request image indices per piece

    @property
    def total_steps(self) -> int:
        """Denoiser calls over the whole request: progress runs from 0 to this."""
        return len(self.steps) * len(self.batches)

    @property
    def batch_key(self) -> tuple[str, int, float]:
        """Requests with equal keys share every timestep of their chains and may share a model call."""
        return (self.job.kind, len(self.chain.timesteps), self.job.guidance_scale)


@dataclass(frozen=True)
class HandOff:
    """The server's answer to one request: x_hat_cut for every image."""

    x_cut: torch.Tensor  # float32 [N, C, H, W] on the CPU
    server_steps: int  # model evaluations per image
    model_step: int  # training step of the EMA weights used


# What a ticket's events queue carries: (steps done, steps total), then the HandOff or the error.
SampleEventItem = tuple[int, int] | HandOff | BaseException


class SampleTicket:
    """An admitted request: its events (progress, then a HandOff or an error) and its cancellation."""

    def __init__(self, client_id: str, plan: SamplePlan, image_shape: tuple[int, int, int],
                 cancel: Callable[[SampleTicket], None]) -> None:
        self.client_id = client_id
        self.plan = plan
        self.events: queue.Queue[SampleEventItem] = queue.Queue()
        self.admitted_at = time.monotonic()
        self.model: tuple[int, UNet2DModel] | None = None  # pinned when its first piece starts
        self.done = False
        self._x_cut = torch.empty((len(plan.job.labels), *image_shape))
        self._pieces_left = len(plan.batches)
        self._steps_done = 0
        self._cancel = cancel

    def cancel(self) -> None:
        """Stop this request (no-op once it is finished); its slot is free when this returns."""
        self._cancel(self)


@dataclass
class _Piece:
    """Up to max_batch images of one request, with their state x_t while a worker runs them."""

    ticket: SampleTicket
    indices: list[int]
    x: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    labels: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))

    @property
    def steps(self) -> int:
        return len(self.ticket.plan.steps)


class Sampler:
    """Admits Sample requests into per-client queues and runs them on ``limits.workers`` threads."""

    def __init__(
        self,
        schedule: ScheduleConfig,
        image_shape: tuple[int, int, int],
        models: ModelSource,
        device: torch.device,
        limits: SamplingLimits | None = None,
    ) -> None:
        self.schedule = schedule
        self.image_shape = image_shape
        self.device = device
        self.limits = limits or SamplingLimits()
        self._models = models
        self._cond = threading.Condition()
        self._queues: dict[str, deque[_Piece]] = {}  # waiting pieces per client
        self._ring: deque[str] = deque()  # clients with waiting pieces, in the order they started waiting
        # Image-steps each client has been charged (fair queueing by work), and the virtual time: the charge at
        # which the piece served last started. Both start over when nobody waits or runs.
        self._charged: dict[str, int] = {}
        self._virtual = 0
        self._held: dict[str, int] = {}  # requests queued or running, per client
        self._live: set[SampleTicket] = set()
        self._closed = False
        self._workers: list[threading.Thread] = []
        self._mean_request_s = 1.0  # running mean of a request's time in the server, for retry hints
        self.model_calls = 0  # denoiser steps run, each over one (possibly merged) batch
        self.image_steps = 0  # images advanced by one step, over all model calls

    # ---- admission ------------------------------------------------------------------------
    def plan(self, job: SampleJob) -> SamplePlan:
        chain = make_chain(self.schedule, job.kind, job.num_inference_steps, job.cut)
        n, size = len(job.labels), max(1, self.limits.max_batch)
        batches = [list(range(s, min(n, s + size))) for s in range(0, n, size)]
        return SamplePlan(job, chain, chain.server_steps(job.cut), batches)

    def queue_depth(self) -> int:
        """Sample requests queued or running (exported as a metric)."""
        with self._cond:
            return len(self._live)

    def submit(self, client_id: str, plan: SamplePlan) -> SampleTicket:
        """Admit a request, or raise QueueFull (with a retry hint) or SampleCancelled (shutting down)."""
        with self._cond:
            if self._closed:
                raise SampleCancelled("the server is shutting down; retry once it is back")
            held, total = self._held.get(client_id, 0), len(self._live)
            if held >= self.limits.per_client:
                retry = self._retry_after(held)
                raise QueueFull(
                    f"client {client_id[:64]!r} already has {held} Sample calls queued or running (at most "
                    f"{self.limits.per_client} per client): wait for one to finish; retry in about {retry:.1f}s",
                    retry,
                )
            if total >= self.limits.total:
                retry = self._retry_after(total)
                raise QueueFull(
                    f"the sampling queue is full ({total} Sample calls queued or running, at most "
                    f"{self.limits.total}): retry in about {retry:.1f}s", retry,
                )
            ticket = SampleTicket(client_id, plan, self.image_shape, self._cancel)
            self._held[client_id] = held + 1
            self._live.add(ticket)
            pieces = self._queues.setdefault(client_id, deque())
            pieces.extend(_Piece(ticket, indices) for indices in plan.batches)
            if client_id not in self._ring:
                self._join_ring(client_id)
            self._start_workers()
            self._cond.notify_all()
        ticket.events.put((0, plan.total_steps))
        return ticket

    def close(self) -> None:
        """Shutdown: refuse new requests, cancel every admitted one; workers stop after their current step."""
        with self._cond:
            self._closed = True
            for ticket in list(self._live):
                self._finish(ticket, SampleCancelled("the server is shutting down; retry once it is back"))
            self._cond.notify_all()

    def join(self, timeout: float) -> bool:
        """After ``close``: wait up to ``timeout`` seconds for the workers to end their current step (True if
        they did). A worker still inside a torch call when the interpreter exits aborts the process (SIGABRT)."""
        deadline = time.monotonic() + timeout
        for worker in list(self._workers):
            worker.join(max(0.0, deadline - time.monotonic()))
        return not any(worker.is_alive() for worker in self._workers)

    def _retry_after(self, ahead: int) -> float:
        # Little's law: with ``ahead`` requests in the server for the mean time each, one leaves every mean/ahead.
        estimate = self._mean_request_s / max(1, ahead)
        return min(MAX_RETRY_S, max(MIN_RETRY_S, estimate))

    def _cancel(self, ticket: SampleTicket) -> None:
        with self._cond:
            self._finish(ticket, SampleCancelled("sampling cancelled"))

    def _finish(self, ticket: SampleTicket, outcome: HandOff | BaseException) -> None:
        """Complete a request once (caller holds the lock): free its slot and drop its waiting pieces."""
        if ticket.done:
            return
        ticket.done = True
        self._live.discard(ticket)
        held = self._held.pop(ticket.client_id) - 1
        if held:
            self._held[ticket.client_id] = held
        waiting = self._queues.get(ticket.client_id)
        if waiting is not None:
            kept = deque(p for p in waiting if p.ticket is not ticket)
            if kept:
                self._queues[ticket.client_id] = kept
            else:
                del self._queues[ticket.client_id]
                self._ring.remove(ticket.client_id)
        if ticket.client_id not in self._held and ticket.client_id not in self._ring:
            self._charged.pop(ticket.client_id, None)  # it rejoins at the virtual time
        if isinstance(outcome, HandOff):
            took = time.monotonic() - ticket.admitted_at
            self._mean_request_s = 0.8 * self._mean_request_s + 0.2 * took
        ticket.events.put(outcome)
        self._cond.notify_all()

    # ---- scheduling -----------------------------------------------------------------------
    def _start_workers(self) -> None:
        while len(self._workers) < self.limits.workers:
            worker = threading.Thread(target=self._work, name=f"collafuse-sampler-{len(self._workers)}", daemon=True)
            self._workers.append(worker)
            worker.start()

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._run(batch)
            except Exception as exc:  # noqa: BLE001 -- the requests of the batch fail, the worker lives on
                log.error("sampling batch failed: %r", exc)
                with self._cond:
                    for piece in batch:
                        self._finish(piece.ticket, exc)

    def _join_ring(self, client_id: str) -> None:
        """A client starts waiting: charged no less than the virtual time (no credit banked while idle)."""
        if not self._ring and not self._live - {t for t in self._live if t.client_id == client_id}:
            self._charged, self._virtual = {}, 0
        self._charged[client_id] = max(self._charged.get(client_id, 0), self._virtual)
        self._ring.append(client_id)

    @staticmethod
    def _work_of(piece: _Piece) -> int:
        return len(piece.indices) * max(1, piece.steps)

    def _next_client(self) -> str:
        """The waiting client whose head piece would finish first if served by work (ties: longest waiting)."""
        return min(self._ring, key=lambda c: self._charged.get(c, 0) + self._work_of(self._queues[c][0]))

    def _take(self, client_id: str) -> _Piece:
        """Pop a client's head piece and charge its work; the client goes to the back of the ring."""
        waiting = self._queues[client_id]
        piece = waiting.popleft()
        start = self._charged.get(client_id, 0)
        self._virtual = max(self._virtual, start)
        self._charged[client_id] = start + self._work_of(piece)
        self._ring.remove(client_id)
        if waiting:
            self._ring.append(client_id)
        else:
            del self._queues[client_id]
        return piece

    def _pin(self, ticket: SampleTicket, model: tuple[int, UNet2DModel] | None = None) -> tuple[int, UNet2DModel]:
        if ticket.model is None:
            ticket.model = model if model is not None else self._models()
        return ticket.model

    def _next_batch(self) -> list[_Piece] | None:
        """The next client's head piece, with mergeable head pieces of other clients; None once closed."""
        with self._cond:
            while not self._closed and not self._ring:
                self._cond.wait()
            if self._closed:
                return None
            leader = self._take(self._next_client())
            batch = [leader]
            model = self._pin(leader.ticket)
            if not self.limits.cross_client:
                return batch
            deadline = time.monotonic() + self.limits.max_wait_s
            while True:
                self._merge(batch, model)
                left = deadline - time.monotonic()
                if sum(len(p.indices) for p in batch) >= self.limits.max_batch or left <= 0 or self._closed:
                    return batch
                self._cond.wait(left)

    def _merge(self, batch: list[_Piece], model: tuple[int, UNet2DModel]) -> None:
        """Add other clients' head pieces that share the batch key and snapshot, one per client per pass."""
        key, size = batch[0].ticket.plan.batch_key, sum(len(p.indices) for p in batch)
        added = True
        while added:
            added = False
            for client_id in list(self._ring):
                head = self._queues[client_id][0]
                pinned = head.ticket.model
                if (head.ticket.plan.batch_key != key or (pinned is not None and pinned[0] != model[0])
                        or size + len(head.indices) > self.limits.max_batch):
                    continue
                batch.append(self._take(client_id))
                self._pin(head.ticket, model)
                size += len(head.indices)
                added = True

    # ---- running --------------------------------------------------------------------------
    def _run(self, batch: list[_Piece]) -> None:
        """Step-synchronised: one model call per timestep for every piece still short of its cut."""
        lead = batch[0].ticket
        assert lead.model is not None
        model_step, model = lead.model
        denoiser = as_denoiser(model, lead.plan.job.guidance_scale)
        chain = lead.plan.chain
        for piece in batch:
            job = piece.ticket.plan.job
            piece.x = initial_noise(job.seed, piece.indices, self.image_shape).to(self.device)
            piece.x = piece.x * chain.scheduler.init_noise_sigma
            piece.labels = torch.tensor([job.labels[i] for i in piece.indices], dtype=torch.long, device=self.device)
        active, k = batch, 0
        while True:
            with self._cond:
                running = []
                for piece in active:
                    if piece.ticket.done or self._closed:
                        continue  # cancelled, failed or shutting down: its ticket is already answered
                    if k >= piece.steps:
                        self._piece_done(piece, model_step)
                    else:
                        running.append(piece)
                active = running
            if not active:
                return
            ts = chain.timesteps[k]
            generators = [g for p in active for g in image_generators(p.ticket.plan.job.seed, p.indices, ts)]
            x = denoise_step(denoiser, chain.scheduler, torch.cat([p.x for p in active]),
                             torch.cat([p.labels for p in active]), ts, generators)
            for piece, part in zip(active, x.split([len(p.indices) for p in active]), strict=True):
                piece.x = part
            k += 1
            with self._cond:
                self.model_calls += 1
                self.image_steps += x.shape[0]
                for piece in active:
                    self._step_done(piece.ticket)

    def _step_done(self, ticket: SampleTicket) -> None:
        if not ticket.done:
            ticket._steps_done += 1
            ticket.events.put((ticket._steps_done, ticket.plan.total_steps))

    def _piece_done(self, piece: _Piece, model_step: int) -> None:
        ticket = piece.ticket
        ticket._x_cut[piece.indices] = piece.x.detach().to("cpu", torch.float32)
        ticket._pieces_left -= 1
        if ticket._pieces_left == 0:
            job, steps = ticket.plan.job, len(ticket.plan.steps)
            log.info(
                "sampled %d images for %s to cut %d with the EMA of step %d: %d server evaluations each (%s, %d steps)",
                len(job.labels), ticket.client_id[:64], job.cut, model_step, steps, job.kind, job.num_inference_steps,
            )
            self._finish(ticket, HandOff(x_cut=ticket._x_cut, server_steps=steps, model_step=model_step))
