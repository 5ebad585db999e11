"""Split learning in synchronous rounds (docs/design.md §4): the SplitFed scheme, with the loss on the client.

A **round** is one optimizer step of the server's model:

1. Every active client sends one forward (x_t, t, y). All forwards of a round run on one frozen copy of
   the weights (``WeightStash``), the model version the round opened at, and the server keeps each step's
   inputs.
2. Each client answers with g_i = dL_i/d(eps_hat) for its own mean loss L_i over its n_i images.
3. The round closes when every active client's backward is in, or at its deadline. The server then runs
   the vector-Jacobian product of the *concatenated* round batch (clients in id order, each g_i weighted by
   n_i / N) on the round's weights: the gradient of the mean loss over all N images of the round, computed
   at exactly the weights that produced every eps_hat of the round. One optimizer step applies it. The
   result does not depend on the order in which clients arrived or on how their forwards were merged
   (up to the float rounding of a different batch composition).
   With ``trust`` (``--split-trust-window``, on by default) each client's gradient is first checked against
   the server's own objective (server/gradient_trust.py): the VJP runs per client, a step that with the
   client's recent applied steps moves the model against that objective is left out (its backward is
   answered ``applied=False``), and the kept clients' gradients are summed with weights n_i / N_kept.
4. Every backward of the round is answered after that step, with the new model version; the client's next
   forward belongs to the next round.

Why rounds and not one optimizer step per backward: with K concurrent clients, per-client steps apply
gradients computed at weights up to K-1 versions old and, with class-partitioned clients, the model
collapses to a label-blind average (measured: true/wrong-label eps-MSE 0.12/0.12 at three clients
against 0.042/0.073 in process). A round applies no gradient to weights other than its own.

Who is **active**: the clients whose step was applied in the previous round (they are expected back), plus
every client that sent a forward in this one. A client that sends ``last`` on its backward is not expected
again; one that misses a deadline is dropped from the active set until its next forward. A backward that
arrives after its round closed is refused (FAILED_PRECONDITION: run the forward again) and counted.

Bounds: at most ``max_clients`` steps in a round (RESOURCE_EXHAUSTED with a hint: the round's deadline);
one step per client per round (a second forward while the first still lacks its backward is refused; one
whose backward is in waits for the round to close); gradient rows that are non-finite or whose norm exceeds
``max_grad_norm`` are refused before they enter a round. Memory: one weight copy per round plus the round's
inputs. No timer thread: whoever waits on a round (a backward, or the next forward) closes it at its deadline.

Label drop-out (classifier-free guidance) is the server's, as in ambient training, drawn per
(seed, round, client) so that arrival order cannot change it. The ambient background trainer holds off
while a round is open (``frozen``, checked under the model lock), and a round whose weights moved anyway is
not applied.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import torch
from diffusers.models import UNet2DModel

from collafuse.common.config import ServerSettings
from collafuse.common.models import drop_labels, null_label
from collafuse.common.train_loop import StepResult, TrainCore
from collafuse.server.errors import RequestRefused
from collafuse.server.gradient_trust import ContributionBook, bound_to_peers, projection, root_gradient
from collafuse.server.protocols.split_merge import ForwardMerger

log = logging.getLogger(__name__)

Code = grpc.StatusCode

# Completed and dropped step ids remembered, so that a retried backward is answered, not applied twice.
REMEMBERED_STEPS = 4096

# Observes (round number, the parameter gradients its step applied): tests and audits.
GradientObserver = Callable[[int, list[torch.Tensor]], None]


def _default(name: str) -> Any:
    return ServerSettings.model_fields[name].default


@dataclass(frozen=True)
class RoundLimits:
    """What one round may hold and how long it waits: the server's ``--split-*`` settings (their defaults)."""

    max_clients: int = _default("split_max_round_clients")
    timeout: float = _default("split_round_timeout")
    max_grad_norm: float = _default("split_max_grad_norm")
    max_batch: int = _default("split_max_batch")  # images per model call of a round's backward (VJP in chunks)

    @classmethod
    def from_settings(cls, settings: ServerSettings) -> RoundLimits:
        return cls(max_clients=settings.split_max_round_clients, timeout=settings.split_round_timeout,
                   max_grad_norm=settings.split_max_grad_norm, max_batch=settings.split_max_batch)


class WeightStash:
    """A frozen copy of the model's parameters at one version: the weights every step of a round runs on."""

    def __init__(self, model: UNet2DModel, version: int) -> None:
        self.model: UNet2DModel = copy.deepcopy(model)
        self.model.train(model.training)
        self.version = version

    def load(self, model: UNet2DModel, version: int) -> None:
        """Reuse this copy for another version."""
        with torch.no_grad():
            torch._foreach_copy_(list(self.model.parameters()), [p.detach() for p in model.parameters()])
            for mine, theirs in zip(self.model.buffers(), model.buffers()):
                mine.copy_(theirs)
        self.version = version

    def eps_hat(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """eps_hat(x_t, t, y) with the paper's 1-based t (diffusers counts from 0)."""
        return self.model(x_t, t - 1, class_labels=labels).sample

    def gradients(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, grad: torch.Tensor,
                  max_batch: int) -> list[torch.Tensor]:
        """d<eps_hat, g>/d(theta) at this copy's parameters over the whole batch, in chunks of ``max_batch``."""
        params = list(self.model.parameters())
        total = [torch.zeros_like(p) for p in params]
        with torch.enable_grad():
            for start in range(0, int(x_t.shape[0]), max(1, max_batch)):
                rows = slice(start, start + max_batch)
                eps_hat = self.eps_hat(x_t[rows], t[rows], labels[rows])
                grads = torch.autograd.grad(eps_hat, params, grad_outputs=grad[rows].to(eps_hat.dtype),
                                            allow_unused=True)
                for acc, g in zip(total, grads):
                    if g is not None:
                        acc.add_(g)
        return total


@dataclass
class PendingStep:
    """One client's forward in a round: its inputs (labels after drop-out), and its gradient once it came."""

    step_id: str
    client_id: str
    x_t: torch.Tensor
    t: torch.Tensor
    labels: torch.Tensor
    grad: torch.Tensor | None = None
    loss: float | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.x_t.shape)

    @property
    def images(self) -> int:
        return int(self.x_t.shape[0])


@dataclass(frozen=True)
class RoundOutcome:
    """What closing a round did: the step it applied (or why none), and who was in it."""

    number: int
    applied: bool
    step: int
    clients: int
    images: int
    reason: str = ""
    left_out: frozenset[str] = frozenset()  # step ids kept out of the applied step (server/gradient_trust.py)


@dataclass
class SplitRound:
    number: int
    stash: WeightStash
    opened: float
    deadline: float
    steps: dict[str, PendingStep] = field(default_factory=dict)
    leaving: set[str] = field(default_factory=set)
    outcome: RoundOutcome | None = None

    @property
    def version(self) -> int:
        return self.stash.version

    def step_of(self, client_id: str) -> PendingStep | None:
        return next((s for s in self.steps.values() if s.client_id == client_id), None)

    def complete(self, expected: set[str]) -> bool:
        """Every step's gradient is in, and every expected client has a step here (or left)."""
        members = {s.client_id for s in self.steps.values()}
        return all(s.grad is not None for s in self.steps.values()) and expected <= members


@dataclass(frozen=True)
class ForwardResult:
    step_id: str
    eps_hat: torch.Tensor
    version: int
    round: int
    expires_in: float


@dataclass(frozen=True)
class BackwardResult:
    step: int
    max_steps: int
    applied: bool
    duplicate: bool
    round: int = 0
    clients: int = 0
    images: int = 0

    @property
    def done(self) -> bool:
        return self.max_steps > 0 and self.step >= self.max_steps


class TrainingFinished(Exception):
    """The server reached max_steps: no more split steps (the reply says so; it is not an error)."""


@dataclass
class RoundCounters:
    """Prometheus counters (server/observability.py)."""

    rounds: int = 0  # rounds whose step was applied
    empty_rounds: int = 0  # rounds that closed with no gradient, or were not applied
    deadline_closes: int = 0  # rounds closed by their deadline rather than by the last backward
    late_gradients: int = 0  # backwards refused because their round had closed
    dropped_steps: int = 0  # forwards whose backward had not come when their round closed
    refused_gradients: int = 0  # non-finite or absurd gradients refused before entering a round


class SplitEngine:
    """Split rounds against one ``TrainCore`` (thread-safe; every RPC thread may call it)."""

    def __init__(
        self,
        core: TrainCore,
        *,
        max_steps: int,
        limits: RoundLimits = RoundLimits(),
        after_step: Callable[[StepResult], None] | None = None,
        label_dropout: float = 0.0,
        seed: int = 0,
        clock: Callable[[], float] = time.monotonic,
        merger: ForwardMerger | None = None,
        trust: ContributionBook | None = None,
        alphas_cumprod: torch.Tensor | None = None,
        trust_rows: int = 32,
    ) -> None:
        if trust is not None and trust.enabled and alphas_cumprod is None:
            raise ValueError("checking split steps against the server's own objective needs the schedule")
        self.core = core
        self.max_steps = max_steps
        self.limits = limits
        self.after_step = after_step
        self.label_dropout = label_dropout
        self.seed = seed
        self.null_label = null_label(core.model)
        # Concurrent forwards of one round share a model call (None: each forward runs alone).
        self.merger = merger
        # Each client's steps checked against the server's own objective (None: every step enters its round).
        self.trust = trust
        self.alphas_cumprod = alphas_cumprod
        self.trust_rows = trust_rows
        self.observer: GradientObserver | None = None
        self.counters = RoundCounters()
        self._clock = clock
        self._cv = threading.Condition()  # guards everything below; never held during a model call
        self._round: SplitRound | None = None
        self._closing = False  # a round's step is being computed and applied
        self._next_round = 1
        self._active: set[str] = set()  # clients expected in the next round
        self._answered: OrderedDict[str, tuple[str, BackwardResult]] = OrderedDict()
        self._dropped: OrderedDict[str, int] = OrderedDict()  # step id -> the round that closed without it
        self._spare: WeightStash | None = None  # the last round's weight copy, reused (copying beats building)

    # ---- views ----------------------------------------------------------------------------------
    def done(self) -> bool:
        return self.max_steps > 0 and self.core.step >= self.max_steps

    def frozen(self) -> bool:
        """A round is open and has not passed its deadline (or is being applied): the weights must not move
        until it closes. Read without the engine's lock (the ambient trainer asks while holding the model lock,
        and a round opens under that lock, so the answer is never stale). A round whose clients all vanished
        stops holding the weights at its deadline, even before anyone closes it."""
        round_ = self._round
        if self._closing:
            return True
        return round_ is not None and round_.outcome is None and self._clock() < round_.deadline

    @property
    def pending(self) -> int:
        """Steps of the open round still waiting for their backward."""
        with self._cv:
            return 0 if self._round is None else sum(s.grad is None for s in self._round.steps.values())

    @property
    def round_number(self) -> int:
        with self._cv:
            return self._round.number if self._round is not None else self._next_round

    # ---- forward --------------------------------------------------------------------------------
    def forward(self, client_id: str, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> ForwardResult:
        """eps_hat for a validated batch, as a step of the open round. TrainingFinished once max_steps is reached;
        RequestRefused when the round is full or this client's step in it still lacks its backward."""
        device = self.core.device
        with self._cv:
            round_ = self._join_locked(client_id)
            step = PendingStep(secrets.token_hex(16), client_id, x_t.to(device), t.to(device),
                               self._drop_labels(labels, round_.number, client_id).to(device))
            round_.steps[step.step_id] = step
            stash, number, expires_in = round_.stash, round_.number, max(0.0, round_.deadline - self._clock())
        try:
            if self.merger is not None:
                eps_hat = self.merger.eps_hat(client_id, stash, step.x_t, step.t, step.labels)
            else:
                with torch.no_grad():
                    eps_hat = stash.eps_hat(step.x_t, step.t, step.labels).float().cpu()
        except BaseException:
            with self._cv:
                if self._round is round_ and step.step_id in round_.steps and round_.outcome is None:
                    del round_.steps[step.step_id]
                    self._cv.notify_all()
            raise
        return ForwardResult(step.step_id, eps_hat, stash.version, number, expires_in)

    def _join_locked(self, client_id: str) -> SplitRound:
        """The open round this client's forward joins (opening one if none), after any wait it must do."""
        while True:
            if self.done():
                raise TrainingFinished()
            self._close_if_expired_locked()
            if self._closing:
                self._cv.wait(0.05)
                continue
            round_ = self._round
            if round_ is None:
                return self._open_locked()
            mine = round_.step_of(client_id)
            if mine is None:
                break
            if mine.grad is None:
                raise RequestRefused(
                    Code.RESOURCE_EXHAUSTED,
                    f"client {client_id[:64]!r} already has a step in split round {round_.number} that waits for its "
                    "backward: send that backward first (one step per client per round)",
                    retry_after_s=max(0.05, round_.deadline - self._clock()),
                )
            # Its gradient is in: this forward belongs to the next round, once this one is applied.
            self._cv.wait(max(0.01, min(0.25, round_.deadline - self._clock())))
        if len(round_.steps) >= self.limits.max_clients:
            raise RequestRefused(
                Code.RESOURCE_EXHAUSTED,
                f"split round {round_.number} already holds {len(round_.steps)} clients' steps (the server's "
                f"--split-max-round-clients): retry when it closes",
                retry_after_s=max(0.05, round_.deadline - self._clock()),
            )
        return round_

    def _open_locked(self) -> SplitRound:
        with self.core.model_lock:  # never a half-applied optimizer step; frozen() sees the round at once
            stash, self._spare = self._spare, None
            if stash is None:
                stash = WeightStash(self.core.model, self.core.step)
            else:
                stash.load(self.core.model, self.core.step)
            now = self._clock()
            round_ = SplitRound(self._next_round, stash, now, now + self.limits.timeout)
            self._next_round += 1
            self._round = round_
        return round_

    def _drop_labels(self, labels: torch.Tensor, number: int, client_id: str) -> torch.Tensor:
        if self.label_dropout <= 0:
            return labels
        return drop_labels(labels, self.null_label, self.label_dropout,
                           generator=_generator(f"{self.seed}:{number}:{client_id}"))

    # ---- backward -------------------------------------------------------------------------------
    def expected_shape(self, client_id: str, step_id: str) -> tuple[int, ...] | None:
        """The shape a backward's gradient must have (None: the step is not in the open round for this client)."""
        with self._cv:
            step = self._round.steps.get(step_id) if self._round is not None else None
            return step.shape if step is not None and step.client_id == client_id else None

    def backward(self, client_id: str, step_id: str, grad: torch.Tensor, loss: float | None = None,
                 last: bool = False) -> BackwardResult:
        """Add dL/d(eps_hat) of a step to its round; answer once the round's step is applied."""
        with self._cv:
            answered = self._answered.get(step_id)
            if answered is not None and answered[0] == client_id:
                return _as_duplicate(answered[1])
            round_ = self._round
            step = round_.steps.get(step_id) if round_ is not None else None
            if step is None or round_ is None:
                raise self._unknown_locked(step_id)
            if step.client_id != client_id:
                raise RequestRefused(Code.PERMISSION_DENIED, f"split step {step_id[:40]!r} belongs to another client")
            duplicate = step.grad is not None
            if self._closing and not duplicate:  # the round is being applied without this step
                self.counters.late_gradients += 1
                raise RequestRefused(
                    Code.FAILED_PRECONDITION,
                    f"split step {step_id[:40]!r} came after its round {round_.number} closed (deadline "
                    f"{self.limits.timeout:.0f}s): nothing was applied; run the forward again",
                )
            if not duplicate:
                step.grad, step.loss = self._checked(step, grad), loss
                if last:
                    round_.leaving.add(client_id)
                self._cv.notify_all()
            while round_.outcome is None:
                if not self._closing and (round_.complete(self._active) or self._clock() >= round_.deadline):
                    self._close_locked(round_)
                else:
                    self._cv.wait(max(0.01, min(0.25, round_.deadline - self._clock())))
            return self._answer_locked(step_id, client_id, duplicate)

    def _checked(self, step: PendingStep, grad: torch.Tensor) -> torch.Tensor:
        """The gradient, or RequestRefused: shape, finiteness and per-image norm are checked before it is summed."""
        if tuple(grad.shape) != step.shape:
            raise RequestRefused(
                Code.INVALID_ARGUMENT,
                f"the gradient has shape {list(grad.shape)} but the step's eps_hat has shape {list(step.shape)}: "
                "send dL/d(eps_hat), one row per image of the forward",
            )
        grad = grad.float()
        if not bool(torch.isfinite(grad).all()):
            self.counters.refused_gradients += 1
            raise RequestRefused(Code.INVALID_ARGUMENT, "the gradient holds NaN or Inf: nothing of it was applied")
        # The client sends the gradient of its batch mean: row i times n is image i's own dl_i/d(eps_hat_i).
        norms = grad.flatten(1).norm(dim=1) * step.images
        worst = float(norms.max())
        if worst > self.limits.max_grad_norm:
            self.counters.refused_gradients += 1
            raise RequestRefused(
                Code.INVALID_ARGUMENT,
                f"an image's gradient row has norm {worst:.4g}, above the server's --split-max-grad-norm "
                f"{self.limits.max_grad_norm:g}: send dL/d(eps_hat) of the mean loss over the batch (with DP, clip "
                "the rows first); nothing of it was applied",
            )
        return grad.to(self.core.device)

    def _unknown_locked(self, step_id: str) -> RequestRefused:
        closed = self._dropped.get(step_id)
        if closed is not None:
            self.counters.late_gradients += 1
            return RequestRefused(
                Code.FAILED_PRECONDITION,
                f"split step {step_id[:40]!r} came after its round {closed} closed (deadline "
                f"{self.limits.timeout:.0f}s): nothing was applied; run the forward again",
            )
        return RequestRefused(
            Code.FAILED_PRECONDITION,
            f"split step {step_id[:40]!r} is unknown (its round closed, or the server restarted): run the forward again",
        )

    def _answer_locked(self, step_id: str, client_id: str, duplicate: bool) -> BackwardResult:
        answered = self._answered.get(step_id)
        if answered is not None:
            return _as_duplicate(answered[1]) if duplicate else answered[1]
        raise self._unknown_locked(step_id)  # the round closed at its deadline without this step

    # ---- closing a round ------------------------------------------------------------------------
    def _close_if_expired_locked(self) -> None:
        round_ = self._round
        if round_ is not None and not self._closing and round_.outcome is None and self._clock() >= round_.deadline:
            self._close_locked(round_)

    def _close_locked(self, round_: SplitRound) -> None:
        """Apply the round's step (the lock is released for the model call); every waiter is answered."""
        self._closing = True
        in_ = sorted((s for s in round_.steps.values() if s.grad is not None), key=lambda s: (s.client_id, s.step_id))
        missing = [s for s in round_.steps.values() if s.grad is None]
        if missing or not round_.complete(self._active):
            self.counters.deadline_closes += 1
            gone = sorted((self._active - {s.client_id for s in in_}) | {s.client_id for s in missing})
            log.info("split round %d closed at its deadline (%.0fs) without %s", round_.number, self.limits.timeout,
                     ", ".join(c[:32] for c in gone) or "nobody")
        self._cv.release()
        try:
            outcome = self._apply(round_, in_)
        except BaseException as exc:
            outcome = RoundOutcome(round_.number, False, self.core.step, 0, 0, f"{type(exc).__name__}: {exc}")
            log.exception("split round %d could not be applied", round_.number)
        finally:
            self._cv.acquire()
        round_.outcome = outcome
        result = BackwardResult(outcome.step, self.max_steps, outcome.applied, False, outcome.number,
                                outcome.clients, outcome.images)
        for step in in_:
            answer = dataclasses.replace(result, applied=False) if step.step_id in outcome.left_out else result
            _remember(self._answered, step.step_id, (step.client_id, answer))
        for step in missing:
            _remember(self._dropped, step.step_id, round_.number)
        if not missing:  # every forward of the round has answered: no model call still reads its weights
            self._spare = round_.stash
        self.counters.dropped_steps += len(missing)
        if outcome.applied:
            self.counters.rounds += 1
            self._active = {s.client_id for s in in_} - round_.leaving
        else:
            self.counters.empty_rounds += 1
            self._active = set()
        self._round = None
        self._closing = False
        self._cv.notify_all()


    def _apply(self, round_: SplitRound, steps: Sequence[PendingStep]) -> RoundOutcome:
        """One optimizer step from the round's gradients, at the round's weights (called without the lock)."""
        images = sum(s.images for s in steps)
        if not steps:
            return RoundOutcome(round_.number, False, self.core.step, 0, 0, "no gradient arrived")
        if self.done():
            return RoundOutcome(round_.number, False, self.core.step, len(steps), images, "the server finished training")
        if self.trust is not None and self.trust.enabled:
            kept = self._admitted(round_, steps)
            if not kept:
                return RoundOutcome(round_.number, False, self.core.step, len(steps), images,
                                    "every step of the round worked against the server's own objective")
            left_out = frozenset(s.step_id for s in steps) - {s.step_id for s, _, _ in kept}
            steps, grads = [s for s, _, _ in kept], self._sum_kept(kept)
        else:
            # Each client's gradient is of its own batch mean: weighted by n_i / N the sum is the gradient of the
            # mean loss over every image of the round.
            grad = torch.cat([s.grad * (s.images / images) for s in steps if s.grad is not None])
            grads = round_.stash.gradients(torch.cat([s.x_t for s in steps]), torch.cat([s.t for s in steps]),
                                           torch.cat([s.labels for s in steps]), grad, self.limits.max_batch)
            kept, left_out = [], frozenset()
        images = sum(s.images for s in steps)
        if not all(bool(torch.isfinite(g).all()) for g in grads):
            return RoundOutcome(round_.number, False, self.core.step, len(steps), images,
                                "the round's parameter gradient is not finite")
        losses = [(s.loss, s.images) for s in steps if s.loss is not None]
        loss = sum(v * n for v, n in losses) / sum(n for _, n in losses) if losses else None
        with self.core.model_lock:
            if self.core.step != round_.version:  # the weights moved after the round opened (a resumed checkpoint)
                return RoundOutcome(round_.number, False, self.core.step, len(steps), images,
                                    f"the model moved from version {round_.version} to {self.core.step} during the round")
            if self.observer is not None:
                self.observer(round_.number, grads)
            applied = self.core.step_with_gradients(grads, loss)
        if applied.refused:  # the core's update guard kept nothing of it
            return RoundOutcome(round_.number, False, self.core.step, len(steps), images, applied.refused)
        for step, _, moved in kept:
            self.trust.record(step.client_id, moved)  # type: ignore[union-attr]
        if self.after_step is not None:
            self.after_step(applied)
        return RoundOutcome(round_.number, True, applied.step, len(steps), images, left_out=left_out)

    def _admitted(self, round_: SplitRound, steps: Sequence[PendingStep]) -> list[tuple[PendingStep, list[torch.Tensor], float]]:
        """The steps whose gradient may enter the round (server/gradient_trust.py), each with its parameter
        gradient (of the client's own mean loss) and how far it moves along the server's own objective."""
        assert self.trust is not None and self.alphas_cumprod is not None
        stash = round_.stash
        per_client = bound_to_peers([stash.gradients(s.x_t, s.t, s.labels, s.grad, self.limits.max_batch)  # type: ignore[arg-type]
                                     for s in steps])
        generator = _generator(f"{self.seed}:{round_.number}:root")
        root = root_gradient(stash.model, torch.cat([s.x_t for s in steps]), torch.cat([s.t for s in steps]),
                             torch.cat([s.labels for s in steps]), self.alphas_cumprod, self.trust_rows, generator)
        if root is None:  # every row at t = T: nothing to compare with
            return [(s, g, 0.0) for s, g in zip(steps, per_client, strict=True)]
        moved = [projection(g, root) for g in per_client]
        return [(s, g, p) for s, g, (p, cosine) in zip(steps, per_client, moved, strict=True)
                if self.trust.admits(s.client_id, p, cosine)]

    @staticmethod
    def _sum_kept(kept: Sequence[tuple[PendingStep, list[torch.Tensor], float]]) -> list[torch.Tensor]:
        """The gradient of the mean loss over the kept steps' images: each client's weighted by n_i / N."""
        total = sum(s.images for s, _, _ in kept)
        summed = [torch.zeros_like(g) for g in kept[0][1]]
        for step, grads, _ in kept:
            for acc, g in zip(summed, grads, strict=True):
                acc.add_(g, alpha=step.images / total)
        return summed


K = TypeVar("K")
V = TypeVar("V")


def _generator(key: str) -> torch.Generator:
    """A generator seeded by ``key``: draws that depend on (seed, round, ...) only, never on arrival order."""
    digest = hashlib.sha256(key.encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _remember(table: OrderedDict[K, V], key: K, value: V) -> None:
    table[key] = value
    while len(table) > REMEMBERED_STEPS:
        table.popitem(last=False)


def _as_duplicate(result: BackwardResult) -> BackwardResult:
    return BackwardResult(result.step, result.max_steps, result.applied, True, result.round, result.clients,
                          result.images)
