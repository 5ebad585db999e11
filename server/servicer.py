"""The CollaFuse gRPC service: registration, release uploads, forgetting, status and sampling.

Every handler validates its input and answers problems with the status code of
DESIGN 3 and a message a person can act on (``context.abort``).
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import NoReturn, cast

import grpc

from collafuse.common.codec import TensorError, decode, encode
from collafuse.common.config import ServerSettings
from collafuse.common.rpc import CHUNK_BYTES
from collafuse.common.schedule import validate_cut
from collafuse.server.sampler import SampleCancelled, SampleJob, Sampler, SampleResult
from collafuse.server.store import ClientRecord, NewRelease, ReleaseStore
from collafuse.server.trainer import Trainer, TrainerState
from collafuse.v1 import collafuse_pb2, collafuse_pb2_grpc

log = logging.getLogger(__name__)

PROTOCOLS = ("ambient",)
SCHEDULERS = ("ddpm", "ddim")
# A release is sqrt(ab) x0 + sqrt(1 - ab) eps with x0 in [-1, 1]: |x| beyond this is not a release.
MAX_ABS_RELEASE = 50.0
MAX_KEY_LENGTH = 256
# Sample chunks stay well under the message limit.
DEFAULT_CHUNK_BYTES = CHUNK_BYTES // 4
PROGRESS_EVENTS = 20

Code = grpc.StatusCode


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    context.abort(code, message)
    raise AssertionError("unreachable: context.abort raises")  # for type checkers


def spec_text(channels: int, height: int, width: int) -> str:
    return f"{height}x{width}x{channels}"


class CollaFuseServicer(collafuse_pb2_grpc.CollaFuseServicer):
    def __init__(
        self,
        settings: ServerSettings,
        store: ReleaseStore,
        trainer: Trainer,
        sampler: Sampler,
        fingerprint: str,
        *,
        traffic: Callable[[], tuple[int, int]] | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> None:
        self.settings = settings
        self.store = store
        self.trainer = trainer
        self.sampler = sampler
        self.fingerprint = fingerprint
        self.schedule = settings.schedule()
        self.T = self.schedule.num_train_timesteps
        self.classes = list(settings.classes)
        self.image_shape = (settings.channels, settings.image_size, settings.image_size)
        self.chunk_bytes = max(1, chunk_bytes)
        self._traffic = traffic or (lambda: (0, 0))
        self._shutting_down = threading.Event()
        # Serialises Register against itself so two racing registrations of one client see each other.
        self._register_lock = threading.Lock()

    def begin_shutdown(self) -> None:
        self._shutting_down.set()

    # ---- helpers --------------------------------------------------------------------------
    def _check_serving(self, context: grpc.ServicerContext) -> None:
        if self._shutting_down.is_set():
            _abort(context, Code.UNAVAILABLE, "the server is shutting down; retry once it is back")

    @staticmethod
    def _client_id(client_id: str, context: grpc.ServicerContext) -> str:
        if not client_id.strip():
            _abort(context, Code.INVALID_ARGUMENT, "client_id is empty: every client needs a stable, non-empty id")
        return client_id

    def _registered(self, client_id: str, context: grpc.ServicerContext, what: str) -> ClientRecord:
        record = self.store.get_client(client_id)
        if record is None:
            _abort(context, Code.FAILED_PRECONDITION, f"client {client_id!r} is not registered: call Register before {what}")
        return record

    def _cut(self, cut: int, context: grpc.ServicerContext) -> int:
        try:
            return validate_cut(cut, self.T)
        except ValueError as exc:
            _abort(context, Code.INVALID_ARGUMENT, str(exc))

    def _label_error(self, label: int, allowed: list[str] | None) -> str | None:
        null = len(self.classes)
        if not 0 <= label <= null:
            return (
                f"label {label} is not a served class index: use 0..{null - 1} for {self.classes} "
                f"or {null} for no label"
            )
        if allowed and label < null and self.classes[label] not in allowed:
            return f"label {label} ({self.classes[label]!r}) is not among the classes this client registered {allowed}"
        return None

    def _trainer_state(self) -> collafuse_pb2.TrainerState:
        return _trainer_message(self.trainer.state())

    def _schedule_message(self) -> collafuse_pb2.ScheduleSpec:
        s = self.schedule
        return collafuse_pb2.ScheduleSpec(
            num_train_timesteps=s.num_train_timesteps,
            beta_start=s.beta_start,
            beta_end=s.beta_end,
            beta_schedule=s.beta_schedule,
            config_json=s.config_json(),
        )

    # ---- RPCs -----------------------------------------------------------------------------
    def Register(self, request: collafuse_pb2.RegisterRequest, context: grpc.ServicerContext) -> collafuse_pb2.RegisterReply:
        self._check_serving(context)
        client_id = self._client_id(request.client_id, context)
        if request.protocol not in PROTOCOLS:
            _abort(
                context, Code.INVALID_ARGUMENT,
                f"protocol {request.protocol!r} is not supported: this server speaks {', '.join(PROTOCOLS)}",
            )
        cut = self._cut(request.cut, context)
        unknown = [c for c in request.class_names if c not in self.classes]
        if unknown:
            _abort(
                context, Code.INVALID_ARGUMENT,
                f"classes {unknown} are not served (the server serves {self.classes}): remove those images "
                "or start the server with --classes that include them",
            )
        spec = request.image_spec
        sent = (spec.channels, spec.height, spec.width)
        # An unset (all-zero) spec means "adopt the server's".
        if request.HasField("image_spec") and sent != (0, 0, 0) and sent != self.image_shape:
            c, h, w = self.image_shape
            _abort(
                context, Code.INVALID_ARGUMENT,
                f"image spec mismatch: server serves {spec_text(c, h, w)}, client sent {spec_text(*sent)}; "
                "convert the images to the served size (or leave the client's image size unset to adopt the server's)",
            )
        if request.expected_fingerprint and request.expected_fingerprint != self.fingerprint:
            _abort(
                context, Code.FAILED_PRECONDITION,
                f"fingerprint mismatch: the client expects {request.expected_fingerprint[:12]}..., this server has "
                f"{self.fingerprint[:12]}... (another schedule, image spec or class list). The client's stored state "
                "was made with another server: delete the client workdir's state, or point it at the right server",
            )
        with self._register_lock:
            existing = self.store.get_client(client_id)
            held = self.store.count(client_id)
            if existing is not None and existing.cut != cut and held:
                _abort(
                    context, Code.FAILED_PRECONDITION,
                    f"client {client_id!r} has {held} releases stored at cut {existing.cut}; registering at cut {cut} "
                    "would mix noise levels of the same images: run forget first (it deletes them), then register again",
                )
            self.store.register_client(client_id, cut, request.protocol, list(request.class_names), self.fingerprint)
        if cut == 0:
            log.warning(
                "client %s registered with cut 0 (global-model baseline): its releases are its RAW IMAGES, not private",
                client_id,
            )
        elif cut == self.T:
            log.info("client %s registered with cut T=%d (independent client model): it releases nothing", client_id, cut)
        else:
            log.info("client %s registered (cut %d, %d classes, %d releases held)", client_id, cut, len(request.class_names), held)
        c, h, w = self.image_shape
        return collafuse_pb2.RegisterReply(
            server_id=self.store.server_id,
            image_spec=collafuse_pb2.ImageSpec(channels=c, height=h, width=w),
            schedule=self._schedule_message(),
            class_names=self.classes,
            fingerprint=self.fingerprint,
            releases_stored=held,
        )

    def Heartbeat(self, request: collafuse_pb2.HeartbeatRequest, context: grpc.ServicerContext) -> collafuse_pb2.HeartbeatReply:
        self._check_serving(context)
        if request.client_id:
            self.store.touch(request.client_id)
        return collafuse_pb2.HeartbeatReply(server_time=time.time(), trainer=self._trainer_state())

    def Release(self, request_iterator: Iterator[collafuse_pb2.ReleaseChunk], context: grpc.ServicerContext) -> collafuse_pb2.ReleaseAck:
        self._check_serving(context)
        client: ClientRecord | None = None
        stored = duplicates = 0
        for number, chunk in enumerate(request_iterator):
            self._check_serving(context)
            where = f"release chunk {number}"
            if client is None:
                client_id = self._client_id(chunk.client_id, context)
                client = self._registered(client_id, context, "Release")
            elif chunk.client_id and chunk.client_id != client.client_id:
                _abort(
                    context, Code.INVALID_ARGUMENT,
                    f"{where}: client_id {chunk.client_id!r} differs from {client.client_id!r} earlier in the stream",
                )
            cut = self._cut(chunk.cut, context)
            if cut != client.cut:
                _abort(
                    context, Code.INVALID_ARGUMENT,
                    f"{where}: released at cut {cut} but client {client.client_id!r} registered cut {client.cut}; "
                    "release at the registered cut, or forget and register again with the new cut",
                )
            if cut == self.T:
                _abort(
                    context, Code.INVALID_ARGUMENT,
                    f"{where}: cut {cut} = T is an independent client model, which releases nothing",
                )
            items = self._validate_items(chunk, client, where, context)
            # The ack goes out only after this commit (synchronous=FULL): stored means durable.
            new, dup = self.store.add_releases(client.client_id, cut, items)
            stored += new
            duplicates += dup
        if client is None:
            return collafuse_pb2.ReleaseAck()
        self.store.touch(client.client_id)
        total = self.store.count(client.client_id)
        log.info("client %s released %d new images (%d duplicates ignored), %d held", client.client_id, stored, duplicates, total)
        return collafuse_pb2.ReleaseAck(stored=stored, duplicates=duplicates, total_for_client=total)

    def _validate_items(
        self, chunk: collafuse_pb2.ReleaseChunk, client: ClientRecord, where: str, context: grpc.ServicerContext
    ) -> list[NewRelease]:
        items = []
        for i, item in enumerate(chunk.items):
            what = f"{where}, item {i} (key {item.image_key[:40]!r})"
            if not item.image_key:
                _abort(context, Code.INVALID_ARGUMENT, f"{where}, item {i}: image_key is empty; give every image a stable key")
            if len(item.image_key) > MAX_KEY_LENGTH:
                _abort(context, Code.INVALID_ARGUMENT, f"{what}: image_key longer than {MAX_KEY_LENGTH} characters")
            problem = self._label_error(item.label, client.class_names)
            if problem:
                _abort(context, Code.INVALID_ARGUMENT, f"{what}: {problem}")
            if not item.HasField("x_cut"):
                _abort(context, Code.INVALID_ARGUMENT, f"{what}: x_cut is missing")
            try:
                x_cut = decode(
                    item.x_cut, what=f"{what}: x_cut", dtypes=("float32",), shape=self.image_shape,
                    finite=True, value_range=(-MAX_ABS_RELEASE, MAX_ABS_RELEASE),
                )
            except TensorError as exc:
                c, h, w = self.image_shape
                _abort(context, Code.INVALID_ARGUMENT, f"{exc} (the server serves {spec_text(c, h, w)} images, float32 [C, H, W])")
            items.append(NewRelease(image_key=item.image_key, label=item.label, x_cut=x_cut))
        return items

    def Forget(self, request: collafuse_pb2.ForgetRequest, context: grpc.ServicerContext) -> collafuse_pb2.ForgetReply:
        self._check_serving(context)
        client_id = self._client_id(request.client_id, context)
        removed = self.store.forget(client_id)
        log.info("client %s forgotten: %d releases deleted", client_id, removed)
        return collafuse_pb2.ForgetReply(removed=removed)

    def Status(self, request: collafuse_pb2.StatusRequest, context: grpc.ServicerContext) -> collafuse_pb2.StatusReply:
        self._check_serving(context)
        counts = self.store.counts()
        received, sent = self._traffic()
        return collafuse_pb2.StatusReply(
            server_id=self.store.server_id,
            fingerprint=self.fingerprint,
            trainer=self._trainer_state(),
            clients=[
                collafuse_pb2.ClientStatus(
                    client_id=c.client_id, cut=c.cut, protocol=c.protocol,
                    releases=counts.get(c.client_id, 0), last_seen=c.last_seen,
                )
                for c in self.store.clients()
            ],
            device=str(self.trainer.device),
            bytes_received=received,
            bytes_sent=sent,
        )

    def Sample(self, request: collafuse_pb2.SampleRequest, context: grpc.ServicerContext) -> Iterator[collafuse_pb2.SampleEvent]:
        self._check_serving(context)
        job = self._sample_job(request, context)
        events: queue.Queue[tuple[str, object]] = queue.Queue()
        total = self.sampler.evaluations_per_image(job) * math.ceil(len(job.labels) / self.sampler.batch_size)
        every = max(1, total // PROGRESS_EVENTS)

        def progress(done: int, steps_total: int) -> None:
            if done % every == 0 or done == steps_total:
                events.put(("progress", (done, steps_total)))

        def cancelled() -> bool:
            return self._shutting_down.is_set() or not context.is_active()

        def work() -> None:
            outcome: tuple[str, object] = ("error", RuntimeError("the sampling thread ended without a result"))
            try:
                outcome = ("result", self.sampler.sample(job, progress, cancelled))
            except Exception as exc:  # noqa: BLE001 -- handed to the RPC thread, which answers with a status
                outcome = ("error", exc)
            finally:
                events.put(outcome)

        # The chain runs beside the RPC thread so progress streams while it computes.
        threading.Thread(target=work, name="collafuse-sample", daemon=True).start()
        yield collafuse_pb2.SampleEvent(progress=collafuse_pb2.SampleProgress(steps_done=0, steps_total=total))
        while True:
            kind, payload = events.get()
            if kind == "progress":
                done, steps_total = cast(tuple[int, int], payload)
                yield collafuse_pb2.SampleEvent(progress=collafuse_pb2.SampleProgress(steps_done=done, steps_total=steps_total))
            elif kind == "error":
                if isinstance(payload, SampleCancelled):
                    code = Code.UNAVAILABLE if self._shutting_down.is_set() else Code.CANCELLED
                    _abort(context, code, "sampling was interrupted: the server is shutting down or the call was cancelled")
                log.error("sampling failed: %r", payload)
                _abort(context, Code.INTERNAL, f"sampling failed on the server: {payload}")
            else:
                result = cast(SampleResult, payload)
                break
        # float32 [n, C, H, W] per chunk, each well under the message limit.
        x = result.x_cut
        per_image = 4 * int(x[0].numel())
        step = max(1, self.chunk_bytes // per_image)
        for offset in range(0, x.shape[0], step):
            yield collafuse_pb2.SampleEvent(
                chunk=collafuse_pb2.SampleChunk(
                    offset=offset, x=encode(x[offset:offset + step].contiguous()), server_steps=result.server_steps
                )
            )

    def _sample_job(self, request: collafuse_pb2.SampleRequest, context: grpc.ServicerContext) -> SampleJob:
        client_id = self._client_id(request.client_id, context)
        self._registered(client_id, context, "Sample")
        self.store.touch(client_id)
        n = len(request.labels)
        if n == 0:
            _abort(context, Code.INVALID_ARGUMENT, "labels is empty: ask for at least one image (one label per image)")
        if n > self.settings.max_sample_images:
            _abort(
                context, Code.RESOURCE_EXHAUSTED,
                f"{n} images requested, the server allows at most {self.settings.max_sample_images} per Sample call; "
                "split the request",
            )
        for i, label in enumerate(request.labels):
            problem = self._label_error(label, None)
            if problem:
                _abort(context, Code.INVALID_ARGUMENT, f"labels[{i}]: {problem}")
        cut = self._cut(request.cut, context)
        if not 0 <= request.num_inference_steps <= self.T:
            _abort(
                context, Code.INVALID_ARGUMENT,
                f"num_inference_steps {request.num_inference_steps} must lie in [1, {self.T}] (0 means all {self.T})",
            )
        kind = request.scheduler or "ddpm"
        if kind not in SCHEDULERS:
            _abort(context, Code.INVALID_ARGUMENT, f"scheduler {request.scheduler!r} is unknown: use 'ddpm' or 'ddim'")
        guidance = float(request.guidance_scale)
        if not math.isfinite(guidance) or guidance < 0:
            _abort(context, Code.INVALID_ARGUMENT, f"guidance_scale {guidance} must be finite and > 0 (1 = plain conditional)")
        if guidance == 0.0:
            # proto3 cannot tell 0 from unset: unset means plain conditional sampling. Unconditional
            # samples are asked for with the null label (index len(classes)).
            guidance = 1.0
        return SampleJob(
            labels=list(request.labels), seed=int(request.seed), num_inference_steps=int(request.num_inference_steps),
            kind=kind,  # type: ignore[arg-type]
            guidance_scale=guidance, cut=cut,
        )


def _trainer_message(state: TrainerState) -> collafuse_pb2.TrainerState:
    return collafuse_pb2.TrainerState(
        phase=state.phase,
        step=state.step,
        max_steps=state.max_steps,
        last_loss=state.last_loss if state.last_loss is not None else 0.0,
        releases=state.releases,
        clients_with_releases=state.clients_with_releases,
    )
