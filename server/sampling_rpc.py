"""The Sample RPC's jobs, one function each: request -> job, progress while the chain runs, chunked hand-off.

The servicer's ``Sample`` handler checks who is asking and strings these together;
none of them needs a gRPC context, so each can be tested alone.
"""

from __future__ import annotations

import logging
import math
import queue
from collections.abc import Callable, Generator, Iterator
from typing import cast, get_args

import grpc

from collafuse.common.codec import encode
from collafuse.common.schedule import SchedulerKind, validate_cut
from collafuse.server.sampler import HandOff, SampleJob, SampleTicket
from collafuse.v1 import collafuse_pb2

log = logging.getLogger(__name__)

SCHEDULERS: tuple[str, ...] = get_args(SchedulerKind)
PROGRESS_EVENTS = 20  # about this many progress events per request, whatever its length
POLL_S = 0.25  # how often a waiting Sample call checks that its caller is still there

Code = grpc.StatusCode
# label -> None when the server serves it, else what is wrong (CollaFuseServicer._label_error).
LabelCheck = Callable[[int], str | None]


class InvalidSample(ValueError):
    """A Sample request the server refuses; ``code`` is the gRPC status to answer with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def sample_job(
    request: collafuse_pb2.SampleRequest, num_train_timesteps: int, max_images: int, label_error: LabelCheck
) -> SampleJob:
    """The validated job of a request, or InvalidSample saying what to change."""
    T = num_train_timesteps
    n = len(request.labels)
    if n == 0:
        raise InvalidSample(Code.INVALID_ARGUMENT, "labels is empty: ask for at least one image (one label per image)")
    if n > max_images:
        raise InvalidSample(
            Code.RESOURCE_EXHAUSTED,
            f"{n} images requested, the server allows at most {max_images} per Sample call; split the request",
        )
    for i, label in enumerate(request.labels):
        problem = label_error(label)
        if problem:
            raise InvalidSample(Code.INVALID_ARGUMENT, f"labels[{i}]: {problem}")
    try:
        cut = validate_cut(request.cut, T)
    except ValueError as exc:
        raise InvalidSample(Code.INVALID_ARGUMENT, str(exc)) from None
    if not 0 <= request.num_inference_steps <= T:
        raise InvalidSample(
            Code.INVALID_ARGUMENT,
            f"num_inference_steps {request.num_inference_steps} must lie in [1, {T}] (0 means all {T})",
        )
    kind = request.scheduler or "ddpm"
    if kind not in SCHEDULERS:
        raise InvalidSample(Code.INVALID_ARGUMENT, f"scheduler {request.scheduler!r} is unknown: use 'ddpm' or 'ddim'")
    guidance = float(request.guidance_scale)
    if not math.isfinite(guidance) or guidance < 0:
        raise InvalidSample(
            Code.INVALID_ARGUMENT, f"guidance_scale {guidance} must be finite and > 0 (1 = plain conditional)"
        )
    if guidance == 0.0:
        # proto3 cannot tell 0 from unset: unset means plain conditional sampling. Unconditional
        # samples are asked for with the null label (index len(classes)).
        guidance = 1.0
    return SampleJob(
        labels=list(request.labels), seed=int(request.seed), num_inference_steps=int(request.num_inference_steps),
        kind=cast(SchedulerKind, kind), guidance_scale=guidance, cut=cut,
    )


def _progress_event(done: int, total: int) -> collafuse_pb2.SampleEvent:
    return collafuse_pb2.SampleEvent(progress=collafuse_pb2.SampleProgress(steps_done=done, steps_total=total))


def run_with_progress(
    ticket: SampleTicket, cancelled: Callable[[], bool], poll_s: float = POLL_S
) -> Generator[collafuse_pb2.SampleEvent, None, HandOff]:
    """Yields about PROGRESS_EVENTS progress events while a sampler worker runs the ticket; returns the HandOff.

    The chain runs on the sampler's workers, never in the RPC's thread; this thread only relays
    events, and cancels the ticket when ``cancelled()`` turns true (a backstop: the handler also
    cancels it from the call's termination callback). The ticket's error is raised here.
    """
    total = ticket.plan.total_steps
    every = max(1, total // PROGRESS_EVENTS)
    while True:
        try:
            item = ticket.events.get(timeout=poll_s)
        except queue.Empty:
            if cancelled():
                ticket.cancel()
            continue
        if isinstance(item, BaseException):
            raise item
        if isinstance(item, HandOff):
            return item
        done, steps_total = item
        if done % every == 0 or done == steps_total:
            yield _progress_event(done, steps_total)


def handoff_chunks(handoff: HandOff, chunk_bytes: int) -> Iterator[collafuse_pb2.SampleEvent]:
    """x_hat_cut as float32 [n, C, H, W] chunks of at most ``chunk_bytes`` (at least one image each)."""
    x = handoff.x_cut
    per_image = 4 * int(x[0].numel()) if x.shape[0] else 1
    step = max(1, chunk_bytes // per_image)
    for offset in range(0, x.shape[0], step):
        yield collafuse_pb2.SampleEvent(
            chunk=collafuse_pb2.SampleChunk(
                offset=offset, x=encode(x[offset:offset + step].contiguous()), server_steps=handoff.server_steps
            )
        )
