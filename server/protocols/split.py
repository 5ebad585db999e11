"""The split protocol on the server (DESIGN 1b): split learning with the loss kept on the client.

One split step is two unary calls:

1. ``SplitForward``: the client sends x_t (every t > its registered cut), t and labels; the server
   answers eps_hat = eps_s(x_t, t, y) and keeps the step's inputs under a fresh step id.
2. ``SplitBackward``: the client sends g = dL/d(eps_hat) for its own loss L (against its private eps);
   the server back-propagates g into its parameters, steps its optimizer and acknowledges.

Decisions, and why:

- **One optimizer step per backward, no accumulation across clients.** Clients run asynchronously and
  may vanish; waiting to accumulate a window of clients would stall everyone on the slowest, and the
  background trainer's ambient steps already come one batch at a time. Each step is one client's batch.
- **Exact gradients under concurrency: weight stashing** (PipeDream's scheme). A forward runs on a frozen
  copy of the parameters of the model version it saw (``WeightStash``); its backward recomputes the
  forward on that same copy and back-propagates g there, so the gradient is exactly the autograd gradient
  of the client's loss at the parameters that produced the eps_hat it was computed from, however many
  other steps happened in between. The gradient is then applied to the current parameters (a delayed
  gradient, as in asynchronous SGD; with one client the delay is zero and the step is plain SGD on the
  client's loss). Nothing is locked between the two halves, so a client that vanishes blocks nobody.
- **Recompute instead of keeping the graph**: a pending step holds only its inputs (x_t, t, y), not its
  activations, so memory per pending step is one batch of inputs; copies of the weights are shared by all
  pending steps of one version and dropped with the last of them.
- **Bounds**: at most ``max_pending`` steps in all and ``per_client`` per client; a step older than
  ``ttl`` seconds is dropped (swept on every call, so a vanished client's steps go without any timer
  thread). A full table is RESOURCE_EXHAUSTED. Memory is at most max_pending x (a batch of inputs + one
  copy of the weights), plus two spare copies kept for reuse.
- **Sharing the model with the background trainer**: every optimizer step (the trainer's ambient steps and
  split steps) runs under ``TrainCore.model_lock``; a weight copy is taken under it too, so it never sees
  a half-applied step. Split steps count as training steps of the one core: step counter, lr schedule,
  EMA, losses, checkpoints and max_steps are shared with ambient training.
- **Cross-client batching** (``split_merge.py``): concurrent forwards of different clients on the same model
  version share one model call (``--split-max-batch``, ``--split-max-wait-ms``); a backward recomputes on the
  client's own rows.
- **Idempotent backward**: the ids of recently completed steps are kept (bounded), so a retried backward
  whose ack was lost is acknowledged again, not applied twice (a retry that arrives while the first attempt
  is still being applied waits for it).

Label drop-out (classifier-free guidance) is the server's, as in ambient training: the server's --label-dropout
replaces labels by the null label at forward time, and the pending step keeps the labels it used.
"""

from __future__ import annotations

import logging
import math
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc
import torch
from diffusers.models import UNet2DModel

from collafuse.common.codec import TensorError, decode, encode
from collafuse.common.config import ServerSettings
from collafuse.common.models import drop_labels, null_label
from collafuse.common.train_loop import StepResult, TrainCore
from collafuse.server.errors import RequestRefused
from collafuse.server.protocols.base import LabelCheck, ServerProtocol
from collafuse.server.protocols.split_merge import ForwardMerger
from collafuse.server.store import ClientRecord, ReleaseStore
from collafuse.v1 import collafuse_pb2

log = logging.getLogger(__name__)

Code = grpc.StatusCode

# x_t = sqrt(ab) x0 + sqrt(1 - ab) eps with x0 in [-1, 1]: |x| beyond this is not a noised image.
MAX_ABS_INPUT = 50.0
# Images per split step; the request guard (server/limits.py) caps the lists at the same size.
MAX_SPLIT_BATCH = 1024
# Completed step ids remembered per server, so that a retried backward is acknowledged, not applied twice.
COMPLETED_KEPT = 4096
# A full pending table is hinted back (retry-after-ms) this soon: a step's backward typically takes milliseconds.
BUSY_RETRY_S = 0.5

# Observes (step id, the parameter gradients a backward applied): tests and audits.
GradientObserver = Callable[[str, list[torch.Tensor]], None]


@dataclass(frozen=True)
class SplitLimits:
    max_pending: int = 32
    per_client: int = 4
    ttl: float = 120.0

    @classmethod
    def from_settings(cls, settings: ServerSettings) -> SplitLimits:
        return cls(settings.split_max_pending, settings.split_pending_per_client, settings.split_step_ttl)


class WeightStash:
    """A frozen copy of the model's parameters at one version, shared by the pending steps that saw it."""

    def __init__(self, model: UNet2DModel, version: int) -> None:
        self.model: UNet2DModel = _clone_module(model)
        self.version = version
        self.refs = 0

    def load(self, model: UNet2DModel, version: int) -> None:
        """Reuse this copy for another version (copying weights is cheaper than building a module)."""
        with torch.no_grad():
            torch._foreach_copy_(list(self.model.parameters()), [p.detach() for p in model.parameters()])
            for mine, theirs in zip(self.model.buffers(), model.buffers()):
                mine.copy_(theirs)
        self.version = version
        self.refs = 0

    def eps_hat(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """eps_hat(x_t, t, y) with the paper's 1-based t (diffusers counts from 0)."""
        return self.model(x_t, t - 1, class_labels=labels).sample

    def gradients(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, grad: torch.Tensor) -> list[torch.Tensor]:
        """d<eps_hat, g>/d(theta) at this copy's parameters: the chain rule's server half, for every parameter."""
        with torch.enable_grad():
            eps_hat = self.eps_hat(x_t, t, labels)
            params = list(self.model.parameters())
            grads = torch.autograd.grad(eps_hat, params, grad_outputs=grad.to(eps_hat.dtype), allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def _clone_module(model: UNet2DModel) -> UNet2DModel:
    import copy

    clone = copy.deepcopy(model)
    clone.train(model.training)
    return clone


@dataclass
class PendingStep:
    step_id: str
    client_id: str
    x_t: torch.Tensor
    t: torch.Tensor
    labels: torch.Tensor
    stash: WeightStash
    created: float

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.x_t.shape)


@dataclass(frozen=True)
class ForwardResult:
    step_id: str
    eps_hat: torch.Tensor
    version: int
    expires_in: float


@dataclass(frozen=True)
class BackwardResult:
    step: int
    max_steps: int
    applied: bool
    duplicate: bool

    @property
    def done(self) -> bool:
        return self.max_steps > 0 and self.step >= self.max_steps


class SplitEngine:
    """Pending split steps and their two halves against one ``TrainCore`` (thread-safe)."""

    def __init__(
        self,
        core: TrainCore,
        *,
        max_steps: int,
        limits: SplitLimits = SplitLimits(),
        after_step: Callable[[StepResult], None] | None = None,
        label_dropout: float = 0.0,
        seed: int = 0,
        clock: Callable[[], float] = time.monotonic,
        merger: ForwardMerger | None = None,
    ) -> None:
        self.core = core
        # Concurrent forwards of different clients on one model version share a model call (None: never).
        self.merger = merger
        self.label_dropout = label_dropout
        self.null_label = null_label(core.model)
        self._generator = torch.Generator().manual_seed(seed)  # label drop-out draws (under _lock)
        self.max_steps = max_steps
        self.limits = limits
        self.after_step = after_step
        self.observer: GradientObserver | None = None
        self._clock = clock
        self._lock = threading.Lock()  # the pending table and the stashes; never held while computing
        self._pending: dict[str, PendingStep] = {}
        self._stashes: dict[int, WeightStash] = {}
        self._spare: list[WeightStash] = []
        self._completed: OrderedDict[str, tuple[str, BackwardResult]] = OrderedDict()
        self._running: dict[str, threading.Event] = {}  # taken steps whose backward is being applied
        self.expired = 0

    # ---- bookkeeping ----------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    @property
    def stashes(self) -> int:
        with self._lock:
            return len(self._stashes)

    def done(self) -> bool:
        return self.max_steps > 0 and self.core.step >= self.max_steps

    def sweep(self) -> int:
        """Drop steps older than the ttl; returns how many."""
        with self._lock:
            return self._sweep_locked()

    def _expires_in(self, created: float, now: float) -> float:
        """Seconds until a step created at ``created`` expires (a little after, so the sweep has dropped it)."""
        return max(0.05, created + self.limits.ttl - now + 0.05)

    def _sweep_locked(self) -> int:
        now = self._clock()
        old = [s for s in self._pending.values() if now - s.created > self.limits.ttl]
        for step in old:
            self._drop_locked(step)
        if old:
            self.expired += len(old)
            log.info("split: %d pending step(s) expired after %.0fs without a backward", len(old), self.limits.ttl)
        return len(old)

    def _drop_locked(self, step: PendingStep) -> None:
        del self._pending[step.step_id]
        self._release_locked(step.stash)

    def _release_locked(self, stash: WeightStash) -> None:
        # A copy is recycled only when no pending step and no computation in flight uses it.
        stash.refs -= 1
        if stash.refs == 0:
            del self._stashes[stash.version]
            if len(self._spare) < 2:
                self._spare.append(stash)

    def _release(self, stash: WeightStash) -> None:
        with self._lock:
            self._release_locked(stash)

    def _stash_for_current(self) -> WeightStash:
        """The weights as they are now, shared with other steps of the same version (caller holds _lock)."""
        with self.core.model_lock:  # never a half-applied optimizer step
            version = self.core.step
            stash = self._stashes.get(version)
            if stash is None:
                if self._spare:
                    stash = self._spare.pop()
                    stash.load(self.core.model, version)
                else:
                    stash = WeightStash(self.core.model, version)
                self._stashes[version] = stash
        return stash

    # ---- the two halves -------------------------------------------------------------------------
    def forward(self, client_id: str, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> ForwardResult:
        """eps_hat for a validated batch; the step is kept for its backward. RequestRefused when full or done."""
        if self.done():
            raise RequestRefused(
                Code.FAILED_PRECONDITION,
                f"the server finished training ({self.core.step} of max_steps {self.max_steps} steps): stop sending "
                "split steps; sampling is open",
            )
        device = self.core.device
        with self._lock:
            self._sweep_locked()
            now = self._clock()
            if len(self._pending) >= self.limits.max_pending:
                # Any client's backward frees a slot; the oldest step's expiry frees one at the latest.
                oldest = min(s.created for s in self._pending.values())
                raise RequestRefused(
                    Code.RESOURCE_EXHAUSTED,
                    f"the server holds {len(self._pending)} pending split steps (its limit): send the backward of "
                    f"your open steps, or retry in a few seconds (steps expire after {self.limits.ttl:.0f}s)",
                    retry_after_s=min(BUSY_RETRY_S, self._expires_in(oldest, now)),
                )
            mine = [s.created for s in self._pending.values() if s.client_id == client_id]
            if len(mine) >= self.limits.per_client:
                raise RequestRefused(
                    Code.RESOURCE_EXHAUSTED,
                    f"client {client_id[:64]!r} has {len(mine)} split steps waiting for their backward (at most "
                    f"{self.limits.per_client}): send those first; unanswered ones expire after {self.limits.ttl:.0f}s",
                    retry_after_s=self._expires_in(min(mine), now),  # only this client's own steps free its slots
                )
            stash = self._stash_for_current()
            stash.refs += 2  # one for the pending step, one for the eps_hat computation below
            if self.label_dropout > 0:  # classifier-free drop-out, as the ambient trainer does it
                labels = drop_labels(labels, self.null_label, self.label_dropout, generator=self._generator)
            step = PendingStep(
                secrets.token_hex(16), client_id, x_t.to(device), t.to(device), labels.to(device), stash, self._clock()
            )
            self._pending[step.step_id] = step
        try:
            if self.merger is not None:
                eps_hat = self.merger.eps_hat(client_id, stash, step.x_t, step.t, step.labels)
            else:
                with torch.no_grad():
                    eps_hat = stash.eps_hat(step.x_t, step.t, step.labels).float().cpu()
        except BaseException:
            with self._lock:
                if step.step_id in self._pending:
                    self._drop_locked(step)
            raise
        finally:
            self._release(stash)
        return ForwardResult(step.step_id, eps_hat, stash.version, self.limits.ttl)

    def _take(self, client_id: str, step_id: str, shape: Sequence[int] | None) -> PendingStep | BackwardResult:
        with self._lock:
            self._sweep_locked()
            running = self._running.get(step_id)
        if running is not None:  # a retry while the first attempt is still being applied: wait for its result
            running.wait(self.limits.ttl)
        with self._lock:
            completed = self._completed.get(step_id)
            if completed is not None and completed[0] == client_id:
                return BackwardResult(completed[1].step, completed[1].max_steps, completed[1].applied, True)
            step = self._pending.get(step_id)
            if step is None:
                raise RequestRefused(
                    Code.FAILED_PRECONDITION,
                    f"split step {step_id[:40]!r} is unknown or expired (steps are kept {self.limits.ttl:.0f}s): "
                    "run its forward again",
                )
            if step.client_id != client_id:
                raise RequestRefused(Code.PERMISSION_DENIED, f"split step {step_id[:40]!r} belongs to another client")
            if shape is not None and tuple(shape) != step.shape:
                raise RequestRefused(
                    Code.INVALID_ARGUMENT,
                    f"the gradient has shape {list(shape)} but the step's eps_hat has shape {list(step.shape)}: send "
                    "dL/d(eps_hat), one row per image of the forward",
                )
            # Taken: a concurrent duplicate cannot apply it twice. Its weight copy stays referenced until the
            # gradient is computed (backward releases it), so no forward can recycle it meanwhile.
            del self._pending[step_id]
            self._running[step_id] = threading.Event()
            return step

    def expected_shape(self, client_id: str, step_id: str) -> tuple[int, ...] | None:
        """The shape a backward's gradient must have (None: the step is not pending for this client)."""
        with self._lock:
            step = self._pending.get(step_id)
            return step.shape if step is not None and step.client_id == client_id else None

    def backward(self, client_id: str, step_id: str, grad: torch.Tensor, loss: float | None = None) -> BackwardResult:
        """Back-propagate ``grad`` (dL/d eps_hat) through the step's weights and step the optimizer."""
        taken = self._take(client_id, step_id, tuple(grad.shape))
        if isinstance(taken, BackwardResult):
            return taken
        try:
            result = self._apply(taken, grad, loss)
        except BaseException:
            self._finish(step_id, client_id, None)  # a failed step is gone: its retry is told to run it again
            raise
        self._finish(step_id, client_id, result)
        return result

    def _apply(self, step: PendingStep, grad: torch.Tensor, loss: float | None) -> BackwardResult:
        if self.done():
            self._release(step.stash)
            return BackwardResult(self.core.step, self.max_steps, applied=False, duplicate=False)
        try:
            grads = step.stash.gradients(step.x_t, step.t, step.labels, grad.to(self.core.device))
        finally:
            self._release(step.stash)
        if self.observer is not None:
            self.observer(step.step_id, grads)
        applied = self.core.step_with_gradients(grads, loss)
        if self.after_step is not None:
            self.after_step(applied)
        return BackwardResult(applied.step, self.max_steps, applied=True, duplicate=False)

    def _finish(self, step_id: str, client_id: str, result: BackwardResult | None) -> None:
        with self._lock:
            if result is not None:
                self._completed[step_id] = (client_id, result)
                while len(self._completed) > COMPLETED_KEPT:
                    self._completed.popitem(last=False)
            running = self._running.pop(step_id, None)
        if running is not None:
            running.set()


# ---- the wire -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ForwardInput:
    x_t: torch.Tensor
    t: torch.Tensor
    labels: torch.Tensor


def validate_forward(
    request: collafuse_pb2.SplitForwardRequest,
    client: ClientRecord,
    image_shape: tuple[int, int, int],
    num_train_timesteps: int,
    label_error: LabelCheck,
) -> ForwardInput:
    """Check everything a forward carries; RequestRefused (INVALID_ARGUMENT, FAILED_PRECONDITION) otherwise."""
    T = num_train_timesteps
    if client.protocol != SplitProtocol.name:
        raise RequestRefused(
            Code.FAILED_PRECONDITION,
            f"client {client.client_id[:64]!r} registered protocol {client.protocol!r}: register with protocol split "
            "before sending split steps",
        )
    if client.cut >= T:
        raise RequestRefused(
            Code.FAILED_PRECONDITION,
            f"client {client.client_id[:64]!r} registered cut {client.cut} = T (independent client model): the server "
            "owns no timesteps for it, so there is nothing to split",
        )
    if not request.HasField("x_t"):
        raise RequestRefused(Code.INVALID_ARGUMENT, "x_t is missing: send the noised batch [N, C, H, W] (float32)")
    try:
        x_t = decode(request.x_t, what="x_t", dtypes=("float32",), shape=(None, *image_shape),
                     value_range=(-MAX_ABS_INPUT, MAX_ABS_INPUT))
    except TensorError as exc:
        raise RequestRefused(Code.INVALID_ARGUMENT, f"{exc}; send x_t as float32 [N, C, H, W] of the served image spec")
    n = int(x_t.shape[0])
    if not 1 <= n <= MAX_SPLIT_BATCH:
        raise RequestRefused(Code.INVALID_ARGUMENT, f"x_t holds {n} images: send 1..{MAX_SPLIT_BATCH} per step")
    if len(request.t) != n or len(request.labels) != n:
        raise RequestRefused(
            Code.INVALID_ARGUMENT,
            f"x_t holds {n} images but t has {len(request.t)} and labels {len(request.labels)} entries: one each per image",
        )
    for i, step in enumerate(request.t):
        if not client.cut < step <= T:
            raise RequestRefused(
                Code.INVALID_ARGUMENT,
                f"t[{i}] = {step} is outside ({client.cut}, {T}]: the server evaluates only t above client "
                f"{client.client_id[:64]!r}'s registered cut {client.cut} (t <= cut is the client's own, never sent)",
            )
    for i, label in enumerate(request.labels):
        problem = label_error(int(label), client.class_names)
        if problem:
            raise RequestRefused(Code.INVALID_ARGUMENT, f"labels[{i}]: {problem}")
    return ForwardInput(x_t, torch.tensor(list(request.t), dtype=torch.long),
                        torch.tensor(list(request.labels), dtype=torch.long))


def validate_backward(request: collafuse_pb2.SplitBackwardRequest, shape: tuple[int, ...] | None) -> tuple[torch.Tensor, float | None]:
    """The gradient (finite, float32, of the step's shape when known) and the optional loss."""
    if not request.step_id:
        raise RequestRefused(Code.INVALID_ARGUMENT, "step_id is empty: send the id SplitForward returned")
    if not request.HasField("grad"):
        raise RequestRefused(Code.INVALID_ARGUMENT, "grad is missing: send dL/d(eps_hat) with eps_hat's shape")
    try:
        grad = decode(request.grad, what="grad", dtypes=("float32",), shape=shape)
    except TensorError as exc:
        raise RequestRefused(Code.INVALID_ARGUMENT, str(exc)) from None
    loss: float | None = None
    if request.HasField("loss"):
        loss = float(request.loss)
        if not math.isfinite(loss):
            raise RequestRefused(Code.INVALID_ARGUMENT, f"loss {loss} is not finite: leave it unset or send a number")
    return grad, loss


class SplitProtocol(ServerProtocol):
    """The split protocol's server side: no table, no offline training; the engine is bound to the trainer."""

    name = "split"
    wire = collafuse_pb2.PROTOCOL_SPLIT

    def __init__(self, settings: ServerSettings, store: ReleaseStore) -> None:
        super().__init__(settings, store)
        self.image_shape = (settings.channels, settings.image_size, settings.image_size)
        self.T = settings.num_train_timesteps
        self._engine: SplitEngine | None = None
        self._bind_lock = threading.Lock()

    @property
    def merger(self) -> ForwardMerger | None:
        """The engine's forward merger, once the engine exists and merges (metrics read its counters)."""
        engine = self._engine
        return engine.merger if engine is not None else None

    def engine(
        self, core: TrainCore, max_steps: int, after_step: Callable[[StepResult], None] | None = None
    ) -> SplitEngine:
        """The one engine of this server, made on first use around the trainer's core."""
        with self._bind_lock:
            if self._engine is None:
                merger = ForwardMerger(self.settings.split_max_batch, self.settings.split_max_wait_ms / 1000) \
                    if self.settings.split_cross_client else None
                self._engine = SplitEngine(
                    core, max_steps=max_steps, limits=SplitLimits.from_settings(self.settings), after_step=after_step,
                    label_dropout=self.settings.label_dropout, seed=self.settings.seed, merger=merger,
                )
            return self._engine

    def forward(
        self, engine: SplitEngine, request: collafuse_pb2.SplitForwardRequest, client: ClientRecord, label_error: LabelCheck
    ) -> collafuse_pb2.SplitForwardReply:
        batch = validate_forward(request, client, self.image_shape, self.T, label_error)
        result = engine.forward(client.client_id, batch.x_t, batch.t, batch.labels)
        return collafuse_pb2.SplitForwardReply(
            step_id=result.step_id, eps_hat=encode(result.eps_hat), server_step=result.version,
            expires_in=result.expires_in,
        )

    def backward(
        self, engine: SplitEngine, request: collafuse_pb2.SplitBackwardRequest, client: ClientRecord
    ) -> collafuse_pb2.SplitBackwardReply:
        grad, loss = validate_backward(request, engine.expected_shape(client.client_id, request.step_id))
        result = engine.backward(client.client_id, request.step_id, grad, loss)
        return collafuse_pb2.SplitBackwardReply(
            server_step=result.step, max_steps=result.max_steps, done=result.done, applied=result.applied,
            duplicate=result.duplicate,
        )
