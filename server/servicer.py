"""The CollaFuse gRPC service: registration, release uploads, forgetting, status and sampling.

Every handler validates its input and answers problems with the status code of
docs/design.md §8 and a message a person can act on (``context.abort``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator

import grpc

from collafuse.common.config import ServerSettings
from collafuse.common.enums import protocol_name
from collafuse.common.rpc import CHUNK_BYTES
from collafuse.common.schedule import validate_cut
from collafuse.server.auth import caller, sample_scope_error
from collafuse.server.errors import RequestRefused, abort, refuse
from collafuse.server.protocols import ServerProtocol
from collafuse.server.sampler import QueueFull, SampleCancelled, Sampler
from collafuse.server.sampling_rpc import (
    InvalidSample,
    handoff_chunks,
    run_with_progress,
    sample_job,
)
from collafuse.server.store import ClientRecord, ReleaseStore
from collafuse.server.trainer import Trainer, TrainerState
from collafuse.v1 import collafuse_pb2, collafuse_pb2_grpc

log = logging.getLogger(__name__)

# Sample chunks stay well under the message limit.
DEFAULT_CHUNK_BYTES = CHUNK_BYTES // 4

Code = grpc.StatusCode


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
        protocols: dict[int, ServerProtocol],
        *,
        traffic: Callable[[], tuple[int, int]] | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        data_parallel: int = 1,
    ) -> None:
        self.settings = settings
        self.store = store
        self.trainer = trainer
        self.sampler = sampler
        self.fingerprint = fingerprint
        self.schedule = settings.schedule()
        self.T = self.schedule.num_train_timesteps
        self.classes = list(settings.classes)
        self.image_shape = settings.image_shape
        self.chunk_bytes = max(1, chunk_bytes)
        self._traffic = traffic or (lambda: (0, 0))
        self._shutting_down = threading.Event()
        # Serialises Register against itself so two racing registrations of one client see each other.
        self._register_lock = threading.Lock()
        # The protocols this server speaks, by wire value (built once in app.py, shared with the trainer).
        self.protocols = protocols
        self.data_parallel = data_parallel

    def begin_shutdown(self) -> None:
        self._shutting_down.set()
        self.sampler.close()  # queued and running Sample calls end now with UNAVAILABLE

    # ---- helpers --------------------------------------------------------------------------
    def _check_serving(self, context: grpc.ServicerContext) -> None:
        if self._shutting_down.is_set():
            abort(context, Code.UNAVAILABLE, "the server is shutting down; retry once it is back")

    @staticmethod
    def _client_id(client_id: str, context: grpc.ServicerContext) -> str:
        if not client_id.strip():
            abort(context, Code.INVALID_ARGUMENT, "client_id is empty: every client needs a stable, non-empty id")
        return client_id

    def _registered(self, client_id: str, context: grpc.ServicerContext, what: str) -> ClientRecord:
        record = self.store.get_client(client_id)
        if record is None:
            abort(context, Code.FAILED_PRECONDITION, f"client {client_id!r} is not registered: call Register before {what}")
        return record

    def _cut(self, cut: int, context: grpc.ServicerContext) -> int:
        try:
            return validate_cut(cut, self.T)
        except ValueError as exc:
            abort(context, Code.INVALID_ARGUMENT, str(exc))

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
        # diffusers' scheduler config and its hash: the client rebuilds it with from_config and checks it.
        return collafuse_pb2.ScheduleSpec(
            config_json=self.schedule.config_json(), fingerprint=self.schedule.config_fingerprint()
        )

    # ---- RPCs -----------------------------------------------------------------------------
    def Register(self, request: collafuse_pb2.RegisterRequest, context: grpc.ServicerContext) -> collafuse_pb2.RegisterReply:
        self._check_serving(context)
        client_id = self._client_id(request.client_id, context)
        if request.protocol not in self.protocols:
            spoken = ", ".join(protocol_name(p) for p in self.protocols)
            why = (f" (it trains data-parallel on {self.data_parallel} ranks, and split rounds need a single-process "
                   "server)" if self.data_parallel > 1 else "")
            abort(
                context, Code.INVALID_ARGUMENT,
                f"protocol {protocol_name(request.protocol)!r} is not supported: this server speaks {spoken}{why}",
            )
        cut = self._cut(request.cut, context)
        unknown = [c for c in request.class_names if c not in self.classes]
        if unknown:
            abort(
                context, Code.INVALID_ARGUMENT,
                f"classes {unknown} are not served (the server serves {self.classes}): remove those images "
                "or start the server with --classes that include them",
            )
        spec = request.image_spec
        sent = (spec.channels, spec.height, spec.width)
        # An unset (all-zero) spec means "adopt the server's".
        if request.HasField("image_spec") and sent != (0, 0, 0) and sent != self.image_shape:
            c, h, w = self.image_shape
            abort(
                context, Code.INVALID_ARGUMENT,
                f"image spec mismatch: server serves {spec_text(c, h, w)}, client sent {spec_text(*sent)}; "
                "convert the images to the served size (or leave the client's image size unset to adopt the server's)",
            )
        if request.expected_fingerprint and request.expected_fingerprint != self.fingerprint:
            abort(
                context, Code.FAILED_PRECONDITION,
                f"fingerprint mismatch: the client expects {request.expected_fingerprint[:12]}..., this server has "
                f"{self.fingerprint[:12]}... (another schedule, image spec or class list). The client's stored state "
                "was made with another server: delete the client workdir's state, or point it at the right server",
            )
        with self._register_lock:
            existing = self.store.get_client(client_id)
            held = self.store.count(client_id)
            if existing is not None and existing.cut != cut and held:
                abort(
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
        """All or nothing: every message is validated first, then the whole stream is one store transaction."""
        self._check_serving(context)
        client: ClientRecord | None = None
        protocol: ServerProtocol | None = None
        pending: list[object] = []
        for number, chunk in enumerate(request_iterator):
            self._check_serving(context)
            where = f"release chunk {number}"
            if client is None:
                client_id = self._client_id(chunk.client_id, context)
                client = self._registered(client_id, context, "Release")
                protocol = self._protocol_of(client, context)
            elif chunk.client_id and chunk.client_id != client.client_id:
                abort(
                    context, Code.INVALID_ARGUMENT,
                    f"{where}: client_id {chunk.client_id[:64]!r} differs from {client.client_id[:64]!r} earlier in "
                    "the stream; nothing of this stream was stored",
                )
            assert protocol is not None
            try:
                pending.extend(protocol.validate_release(chunk, client, where, self._label_error))
            except RequestRefused as exc:
                refuse(context, exc, "; nothing of this stream was stored")
        # gRPC ends the request iterator of a call cancelled by shutdown (or by a vanished caller) as if the
        # client had finished it: such a stream is never committed, so it stays all-or-nothing across faults.
        if self._shutting_down.is_set() or not context.is_active():
            abort(context, Code.UNAVAILABLE, "the server is shutting down or the call was cancelled; nothing of "
                   "this stream was stored: retry once the server is back")
        if client is None or protocol is None:
            return collafuse_pb2.ReleaseAck()
        try:
            # The ack goes out only after this commit (synchronous=FULL): stored means durable.
            outcome = protocol.commit_release(client, pending)
        except RequestRefused as exc:
            refuse(context, exc)
        self.store.touch(client.client_id)
        total = self.store.count(client.client_id)
        log.info("client %s released %d new images (%d duplicates ignored), %d held",
                 client.client_id, outcome.stored, outcome.duplicates, total)
        return collafuse_pb2.ReleaseAck(stored=outcome.stored, duplicates=outcome.duplicates, total_for_client=total)

    def _protocol_of(self, client: ClientRecord, context: grpc.ServicerContext) -> ServerProtocol:
        protocol = self.protocols.get(client.protocol)
        if protocol is None:
            abort(
                context, Code.FAILED_PRECONDITION,
                f"client {client.client_id[:64]!r} registered protocol {protocol_name(client.protocol)!r}, which this "
                "server no longer speaks: register again with a supported protocol",
            )
        return protocol

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
                if caller().may_see(c.client_id)  # a client sees only itself; an operator sees all
            ],
            device=str(self.trainer.device),
            bytes_received=received,
            bytes_sent=sent,
            release_conflicts=self.store.release_conflicts,
        )

    def Sample(self, request: collafuse_pb2.SampleRequest, context: grpc.ServicerContext) -> Iterator[collafuse_pb2.SampleEvent]:
        """Who asks is checked here; the request's jobs live in server/sampling_rpc.py."""
        self._check_serving(context)
        client_id = self._client_id(request.client_id, context)
        record = self._registered(client_id, context, "Sample")
        self.store.touch(client_id)
        try:
            job = sample_job(request, self.T, self.settings.max_sample_images, lambda y: self._label_error(y, None))
        except InvalidSample as exc:
            abort(context, exc.code, str(exc))
        beyond = sample_scope_error(record, job.labels, job.cut, self.classes, self.store.clients(), self.store.counts())
        if beyond:
            abort(context, Code.PERMISSION_DENIED, beyond)
        try:
            # Admitted into the sampler's bounded, per-client queue, or refused at once with a retry hint.
            ticket = self.sampler.submit(client_id, self.sampler.plan(job))
        except QueueFull as exc:
            abort(context, Code.RESOURCE_EXHAUSTED, str(exc), exc.retry_after_s)
        except SampleCancelled as exc:
            abort(context, Code.UNAVAILABLE, str(exc))
        if not context.add_callback(ticket.cancel):  # the call ended (client gone): free the slot at once
            ticket.cancel()

        def cancelled() -> bool:
            return self._shutting_down.is_set() or not context.is_active()

        try:
            handoff = yield from run_with_progress(ticket, cancelled)
        except SampleCancelled:
            code = Code.UNAVAILABLE if self._shutting_down.is_set() else Code.CANCELLED
            abort(context, code, "sampling was interrupted: the server is shutting down or the call was cancelled")
        except Exception as exc:  # noqa: BLE001 -- any failure of the chain becomes one INTERNAL status
            log.error("sampling failed: %r", exc)
            abort(context, Code.INTERNAL, f"sampling failed on the server: {exc}")
        yield from handoff_chunks(handoff, self.chunk_bytes)

    # ---- the split protocol: the client's registered protocol answers (server/protocols) ----------------
    def SplitForward(self, request: collafuse_pb2.SplitForwardRequest, context: grpc.ServicerContext) -> collafuse_pb2.SplitForwardReply:
        self._check_serving(context)
        client = self._registered(self._client_id(request.client_id, context), context, "SplitForward")
        protocol = self._protocol_of(client, context)
        try:
            reply = protocol.split_forward(request, client, self._label_error)
        except RequestRefused as exc:
            refuse(context, exc)
        self.store.touch(client.client_id)
        return reply

    def SplitBackward(self, request: collafuse_pb2.SplitBackwardRequest, context: grpc.ServicerContext) -> collafuse_pb2.SplitBackwardReply:
        self._check_serving(context)
        client = self._registered(self._client_id(request.client_id, context), context, "SplitBackward")
        protocol = self._protocol_of(client, context)
        try:
            return protocol.split_backward(request, client)
        except RequestRefused as exc:
            refuse(context, exc)


def _trainer_message(state: TrainerState) -> collafuse_pb2.TrainerState:
    return collafuse_pb2.TrainerState(
        phase=state.phase,
        step=state.step,
        max_steps=state.max_steps,
        last_loss=state.last_loss if state.last_loss is not None else 0.0,
        releases=state.releases,
        clients_with_releases=state.clients_with_releases,
        error=state.error or "",
        skipped_steps=state.skipped_steps,
    )
