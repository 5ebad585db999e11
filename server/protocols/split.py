"""The split protocol on the server (docs/design.md §4): split learning with the loss kept on the client.

One split step is two unary calls, and the server's optimizer steps once per **round** of them
(``split_rounds.py``):

1. ``SplitForward``: the client sends x_t (every t > its registered cut), t and labels; the server answers
   eps_hat = eps_s(x_t, t, y), computed at the open round's frozen weights, under a fresh step id.
2. ``SplitBackward``: the client sends g = dL/d(eps_hat) for its own loss L (against its private eps). The
   server adds it to the round and answers once the round's one optimizer step is applied (or the round
   closed without it), with the new model version.

This module checks what arrives on the wire and turns it into engine calls; the engine keeps the rounds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import torch
from prometheus_client.core import CounterMetricFamily, Metric

from collafuse.common.codec import TensorError, decode, encode
from collafuse.common.config import ServerSettings
from collafuse.common.enums import protocol_name
from collafuse.common.schedule import Cut
from collafuse.common.train_loop import StepResult, TrainCore
from collafuse.server.errors import RequestRefused
from collafuse.server.gradient_bounds import RowNormBook, bound_gradient_rows
from collafuse.server.gradient_trust import ContributionBook
from collafuse.server.protocols.base import LabelCheck, ServerProtocol
from collafuse.server.protocols.split_merge import ForwardMerger
from collafuse.server.protocols.split_rounds import RoundLimits, SplitEngine, TrainingFinished
from collafuse.server.store import ClientRecord, ReleaseStore
from collafuse.v1 import collafuse_pb2

Code = grpc.StatusCode

# x_t = sqrt(ab) x0 + sqrt(1 - ab) eps with x0 in [-1, 1]: |x| beyond this is not a noised image.
MAX_ABS_INPUT = 50.0
# Images per split step; the request guard (server/limits.py) caps the lists at the same size.
MAX_SPLIT_BATCH = 1024


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
    if client.protocol != SplitProtocol.wire:
        raise RequestRefused(
            Code.FAILED_PRECONDITION,
            f"client {client.client_id[:64]!r} registered protocol {protocol_name(client.protocol)!r}: register with "
            "protocol split before sending split steps",
        )
    if Cut(client.cut, T).independent:
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
    """The split protocol's server side: no table, no offline training; its rounds step the trainer's core."""

    name = "split"
    wire = collafuse_pb2.PROTOCOL_SPLIT
    # A round's step is applied by the RPC thread on rank 0 alone: the replicas would drift apart.
    data_parallel = False

    def __init__(self, settings: ServerSettings, store: ReleaseStore) -> None:
        super().__init__(settings, store)
        self.image_shape = settings.image_shape
        self.T = settings.num_train_timesteps
        self._engine: SplitEngine | None = None
        # Each client's gradient rows bounded relative to the other clients' (server/gradient_bounds.py).
        self.row_norms = RowNormBook(settings.split_relative_grad_clip)
        self.contributions = ContributionBook(settings.split_trust_window)

    def attach(self, core: TrainCore, max_steps: int, after_step: Callable[[StepResult], None] | None = None) -> None:
        """Make this server's one engine around the trainer's core (app.py, once, before serving)."""
        merger = ForwardMerger(self.settings.split_max_batch, self.settings.split_max_wait_ms / 1000) \
            if self.settings.split_cross_client else None
        self._engine = SplitEngine(
            core, max_steps=max_steps, limits=RoundLimits.from_settings(self.settings), after_step=after_step,
            label_dropout=self.settings.label_dropout, seed=self.settings.seed, merger=merger,
            trust=self.contributions, alphas_cumprod=self.settings.schedule().alphas_cumprod(),
            trust_rows=self.settings.split_trust_rows,
        )

    def forget_client(self, client_id: str) -> None:
        self.row_norms.forget(client_id)
        self.contributions.forget(client_id)

    def metrics(self) -> Iterator[Metric]:
        yield CounterMetricFamily("collafuse_split_rows_bounded", "split gradient rows scaled down (far above the "
                                  "other clients' rows, or above --split-clip-grad-norm)", self.row_norms.clipped_rows)
        yield CounterMetricFamily("collafuse_split_steps_left_out", "split steps kept out of their round: with the "
                                  "client's recent applied steps they moved the model against the server's own "
                                  "objective (--split-trust-window)", self.contributions.left_out.total())
        engine = self._engine
        if engine is None:
            return
        c = engine.counters
        yield CounterMetricFamily("collafuse_split_rounds", "split rounds whose one optimizer step was applied",
                                  c.rounds)
        yield CounterMetricFamily("collafuse_split_rounds_not_applied", "split rounds that closed without a step "
                                  "(no gradient came, the weights moved, or the gradient was not finite)", c.empty_rounds)
        yield CounterMetricFamily("collafuse_split_rounds_closed_at_deadline", "split rounds closed by "
                                  "--split-round-timeout rather than by their last backward", c.deadline_closes)
        yield CounterMetricFamily("collafuse_split_late_gradients", "split backwards refused because their round "
                                  "had closed (the client runs the forward again)", c.late_gradients)
        yield CounterMetricFamily("collafuse_split_dropped_steps", "split forwards whose backward had not come when "
                                  "their round closed", c.dropped_steps)
        yield CounterMetricFamily("collafuse_split_refused_gradients", "split gradients refused before entering a "
                                  "round (NaN/Inf, or a row above --split-max-grad-norm)", c.refused_gradients)
        merger = engine.merger
        if merger is not None:
            yield CounterMetricFamily("collafuse_split_forwards", "SplitForward calls answered", merger.forwards)
            yield CounterMetricFamily("collafuse_split_forwards_merged", "SplitForward calls that rode in another "
                                      "client's model call (cross-client batching)", merger.merged)
            yield CounterMetricFamily("collafuse_split_forward_model_calls", "model calls that answered "
                                      "SplitForward calls", merger.calls)

    @property
    def engine(self) -> SplitEngine:
        if self._engine is None:
            raise RequestRefused(Code.UNAVAILABLE, "the server is still starting: retry in a moment")
        return self._engine

    def frozen(self) -> bool:
        """True while a split round keeps the weights as its forwards saw them."""
        return self._engine is not None and self._engine.frozen()

    def split_forward(
        self, request: collafuse_pb2.SplitForwardRequest, client: ClientRecord, label_error: LabelCheck
    ) -> collafuse_pb2.SplitForwardReply:
        batch = validate_forward(request, client, self.image_shape, self.T, label_error)
        engine = self.engine
        try:
            result = engine.forward(client.client_id, batch.x_t, batch.t, batch.labels)
        except TrainingFinished:
            return collafuse_pb2.SplitForwardReply(server_step=engine.core.step, done=True)
        return collafuse_pb2.SplitForwardReply(
            step_id=result.step_id, eps_hat=encode(result.eps_hat), server_step=result.version,
            expires_in=result.expires_in, round=result.round,
        )

    def split_backward(
        self, request: collafuse_pb2.SplitBackwardRequest, client: ClientRecord
    ) -> collafuse_pb2.SplitBackwardReply:
        engine = self.engine
        bound_gradient_rows(request, client.client_id, self.row_norms, self.settings.split_clip_grad_norm,
                            self.settings.split_max_grad_norm)
        grad, loss = validate_backward(request, engine.expected_shape(client.client_id, request.step_id))
        result = engine.backward(client.client_id, request.step_id, grad, loss, last=request.last)
        return collafuse_pb2.SplitBackwardReply(
            server_step=result.step, max_steps=result.max_steps, done=result.done, applied=result.applied,
            duplicate=result.duplicate, round=result.round, round_clients=result.clients,
            round_images=result.images,
        )
