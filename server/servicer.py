"""The CollaFuse gRPC service: registration, release uploads, forgetting, status and sampling.

Every handler validates its input and answers problems with the status code of
docs/design.md §8 and a message a person can act on (``context.abort``).

Reliability (issue 16):

- Release is atomic: a stream is stored only when its final message carries the end-of-stream marker
  (``last`` with ``total_items``), and its one transaction commits only if, right before COMMIT, the call
  is still live and the client's registration is the one the stream was validated against. A stream is
  bounded (``--release-max-stream-bytes``/``-chunks``).
- Register, Forget and a Release's commit of one client are serialised (one lock per client id); while a
  client holds releases its cut, protocol and classes are fixed (forget first to change them).
- A full or failing disk is RESOURCE_EXHAUSTED with a retry hint naming the disk (``StorageFull``), never
  UNKNOWN; a failed ``last_seen`` update does not fail the call it belongs to.
- A split client whose steps keep being refused is dropped for a while (``server/strikes.py``).
- Registrations are bounded (``--max-clients``), Status is paginated, and sampling the whole chain (cut 0)
  is only for a client holding releases at cut 0.
"""

from __future__ import annotations

import functools
import inspect
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import grpc

from collafuse.common.autoencoder import AutoencoderIdentity
from collafuse.common.config import ServerSettings
from collafuse.common.enums import protocol_name
from collafuse.common.rpc import CHUNK_BYTES
from collafuse.common.schedule import validate_cut
from collafuse.server.auth import caller, sample_scope_error
from collafuse.server.errors import RequestRefused, StorageFull, abort, is_storage_error, refuse
from collafuse.server.latent import autoencoder_spec
from collafuse.server.protocols import ServerProtocol
from collafuse.server.sampler import QueueFull, SampleCancelled, Sampler
from collafuse.server.sampling_rpc import (
    InvalidSample,
    handoff_chunks,
    run_with_progress,
    sample_job,
)
from collafuse.server.shared_model import NotShared, SharedModel, model_chunks
from collafuse.server.staging import ReleaseStaging
from collafuse.server.store import ClientRecord, ReleaseStore
from collafuse.server.strikes import StrikeBook
from collafuse.server.trainer import Trainer, TrainerState
from collafuse.v1 import collafuse_pb2, collafuse_pb2_grpc

log = logging.getLogger(__name__)

# Sample chunks stay well under the message limit.
DEFAULT_CHUNK_BYTES = CHUNK_BYTES // 4

Code = grpc.StatusCode
# Status pages: the default and the largest number of clients in one reply.
STATUS_PAGE = 1_000
MAX_STATUS_PAGE = 10_000
F = TypeVar("F", bound=Callable[..., Any])


def spec_text(channels: int, height: int, width: int) -> str:
    return f"{height}x{width}x{channels}"


def answers_storage_errors(handler: F) -> F:
    """A handler whose RequestRefused (StorageFull included) and disk errors become their status code, never
    UNKNOWN. Works for unary handlers and for response-streaming (generator) ones."""

    def convert(context: grpc.ServicerContext, exc: BaseException) -> None:
        if isinstance(exc, RequestRefused):
            refuse(context, exc)
        if isinstance(exc, (sqlite3.Error, OSError, RuntimeError)) and is_storage_error(exc):
            refuse(context, StorageFull("the server's store", exc))

    if inspect.isgeneratorfunction(handler):
        @functools.wraps(handler)
        def streaming(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            try:
                yield from handler(self, request, context)
            except (RequestRefused, sqlite3.Error, OSError, RuntimeError) as exc:
                convert(context, exc)
                raise
        return streaming  # type: ignore[return-value]

    @functools.wraps(handler)
    def unary(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return handler(self, request, context)
        except (RequestRefused, sqlite3.Error, OSError, RuntimeError) as exc:
            convert(context, exc)
            raise
    return unary  # type: ignore[return-value]


class ClientLocks:
    """One lock per client id, held while Register, Forget or a Release commit of that client runs; an entry
    lives only while someone holds or waits for it."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._locks: dict[str, tuple[threading.Lock, int]] = {}

    @contextmanager
    def hold(self, client_id: str) -> Iterator[None]:
        with self._mutex:
            lock, users = self._locks.get(client_id, (threading.Lock(), 0))
            self._locks[client_id] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self._mutex:
                lock, users = self._locks[client_id]
                if users <= 1:
                    del self._locks[client_id]
                else:
                    self._locks[client_id] = (lock, users - 1)


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
        autoencoder: AutoencoderIdentity | None = None,
    ) -> None:
        self.settings = settings
        self.autoencoder = autoencoder  # announced in the Register reply (None: pixel space)
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
        # Serialises Register, Forget and a Release's commit of one client, so each sees the others' outcome.
        self._client_locks = ClientLocks()
        # Split clients whose steps keep being refused are dropped for a while.
        self.strikes = StrikeBook(settings.split_max_strikes, settings.split_strike_cooldown)
        # The protocols this server speaks, by wire value (built once in app.py, shared with the trainer).
        self.protocols = protocols
        self.data_parallel = data_parallel
        # FetchModel's weights (answered only with --share-model).
        self.shared_model = SharedModel(settings.model_preset, trainer.ema_snapshot, settings.share_model)

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

    def _touch(self, client_id: str) -> None:
        """Record that a client was heard from; a disk that refuses it does not fail the call (last_seen only)."""
        try:
            self.store.touch(client_id)
        except StorageFull as exc:
            log.warning("last_seen of %s not updated: %s", client_id[:64], exc.cause)

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
            config_json=self.schedule.config_json(), fingerprint=self.schedule.config_digest()
        )

    # ---- RPCs -----------------------------------------------------------------------------
    @answers_storage_errors
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
        with self._client_locks.hold(client_id):
            existing = self.store.get_client(client_id)
            held = self.store.count(client_id)
            if existing is not None and held:
                problem = _fixed_while_held(existing, held, cut, request.protocol, list(request.class_names))
                if problem:
                    abort(context, Code.FAILED_PRECONDITION, problem)
            if existing is None:
                registered = self.store.client_count()
                if registered >= self.settings.max_clients:
                    abort(
                        context, Code.RESOURCE_EXHAUSTED,
                        f"the server already has {registered} registered clients (its --max-clients is "
                        f"{self.settings.max_clients}): ask its operator to raise the limit or to forget clients "
                        "that have left",
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
            autoencoder=autoencoder_spec(self.autoencoder),
        )

    @answers_storage_errors
    def Heartbeat(self, request: collafuse_pb2.HeartbeatRequest, context: grpc.ServicerContext) -> collafuse_pb2.HeartbeatReply:
        self._check_serving(context)
        if request.client_id:
            self._touch(request.client_id)
        return collafuse_pb2.HeartbeatReply(server_time=time.time(), trainer=self._trainer_state())

    @answers_storage_errors
    def Release(self, request_iterator: Iterator[collafuse_pb2.ReleaseChunk], context: grpc.ServicerContext) -> collafuse_pb2.ReleaseAck:
        """All or nothing: every message is validated first (its items staged on disk, server/staging.py), then
        the whole stream is one store transaction that commits only when the stream ended with its marker and
        the call and the registration are still as they were (checked under the store's lock right before COMMIT)."""
        self._check_serving(context)
        with ReleaseStaging(self.store.root) as staged:
            return self._release(request_iterator, context, staged)

    def _release(self, request_iterator: Iterator[collafuse_pb2.ReleaseChunk], context: grpc.ServicerContext,
                 staged: ReleaseStaging) -> collafuse_pb2.ReleaseAck:
        client: ClientRecord | None = None
        protocol: ServerProtocol | None = None
        items = size = 0
        declared: int | None = None  # total_items of the final message: set once the marker came
        max_bytes, max_chunks = self.settings.release_max_stream_bytes, self.settings.release_max_stream_chunks
        for number, chunk in enumerate(request_iterator):
            self._check_serving(context)
            where = f"release chunk {number}"
            if declared is not None:
                abort(context, Code.INVALID_ARGUMENT, f"{where} follows the end-of-stream marker (last) of chunk "
                      f"{number - 1}: set last on the final message only; nothing of this stream was stored")
            size += chunk.ByteSize()
            if number >= max_chunks or size > max_bytes:
                abort(
                    context, Code.RESOURCE_EXHAUSTED,
                    f"this Release stream passed the server's bound of {max_chunks} messages or {max_bytes} bytes "
                    f"per stream at {where} ({size} bytes so far): nothing of it was stored; send fewer images per "
                    "Release call",
                )
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
            if chunk.items or not chunk.last:  # a bare end-of-stream marker carries nothing to validate
                try:
                    staged.extend(protocol.validate_release(chunk, client, where, self._label_error))
                except RequestRefused as exc:
                    refuse(context, exc, "; nothing of this stream was stored")
            items += len(chunk.items)
            if chunk.last:
                declared = int(chunk.total_items)
        # gRPC ends the request iterator of a call cancelled by shutdown (or by a vanished caller) as if the
        # client had finished it: such a stream is never committed, so it stays all-or-nothing across faults.
        if self._shutting_down.is_set() or not context.is_active():
            abort(context, Code.UNAVAILABLE, "the server is shutting down or the call was cancelled; nothing of "
                   "this stream was stored: retry once the server is back")
        if client is None or protocol is None:
            return collafuse_pb2.ReleaseAck()
        if declared is not None and declared != items:
            abort(context, Code.INVALID_ARGUMENT, f"the end-of-stream marker declares {declared} items but the "
                  f"stream carried {items}: nothing of it was stored; send total_items = the items of every message")
        with self._client_locks.hold(client.client_id), \
                self.store.commit_only_if(lambda: self._release_commit_refusal(client, declared, context)):
            try:
                # The ack goes out only after this commit (synchronous=FULL): stored means durable.
                outcome = protocol.commit_release(client, staged)
            except RequestRefused as exc:
                refuse(context, exc)
        self._touch(client.client_id)
        total = self.store.count(client.client_id)
        log.info("client %s released %d new images (%d duplicates ignored), %d held",
                 client.client_id, outcome.stored, outcome.duplicates, total)
        return collafuse_pb2.ReleaseAck(stored=outcome.stored, duplicates=outcome.duplicates, total_for_client=total)

    def _release_commit_refusal(self, client: ClientRecord, declared: int | None,
                                context: grpc.ServicerContext) -> RequestRefused | None:
        """Why a validated Release stream must not commit now (run under the store's lock before COMMIT)."""
        if declared is None:
            return RequestRefused(
                Code.FAILED_PRECONDITION,
                "the Release stream ended without its end-of-stream marker (last, with total_items, on the final "
                "message), so it may have been cut short: nothing of it was stored. Send the marker (a client older "
                "than this server does not: upgrade it) and retry",
            )
        remaining = context.time_remaining()
        if self._shutting_down.is_set() or not context.is_active() or (remaining is not None and remaining <= 0):
            return RequestRefused(Code.UNAVAILABLE, "the call ended (cancelled, past its deadline, or the server is "
                                  "shutting down) before its commit: nothing of this stream was stored; retry")
        now = self.store.get_client(client.client_id)
        if now is None:
            return RequestRefused(
                Code.FAILED_PRECONDITION,
                f"client {client.client_id[:64]!r} was forgotten while this Release stream was being received: "
                "nothing of it was stored; register again before releasing",
            )
        if (now.cut, now.protocol, sorted(now.class_names), now.registered_at) != (
                client.cut, client.protocol, sorted(client.class_names), client.registered_at):
            return RequestRefused(
                Code.FAILED_PRECONDITION,
                f"client {client.client_id[:64]!r} registered again (cut {now.cut}, protocol "
                f"{protocol_name(now.protocol)!r}) while this Release stream, made for cut {client.cut}, was being "
                "received: nothing of it was stored; release again under the current registration",
            )
        return None

    def _protocol_of(self, client: ClientRecord, context: grpc.ServicerContext) -> ServerProtocol:
        protocol = self.protocols.get(client.protocol)
        if protocol is None:
            abort(
                context, Code.FAILED_PRECONDITION,
                f"client {client.client_id[:64]!r} registered protocol {protocol_name(client.protocol)!r}, which this "
                "server no longer speaks: register again with a supported protocol",
            )
        return protocol

    @answers_storage_errors
    def Forget(self, request: collafuse_pb2.ForgetRequest, context: grpc.ServicerContext) -> collafuse_pb2.ForgetReply:
        self._check_serving(context)
        client_id = self._client_id(request.client_id, context)
        with self._client_locks.hold(client_id):  # after any Release commit of this client, never during one
            removed = self.store.forget(client_id)
        for protocol in self.protocols.values():
            protocol.forget_client(client_id)
        log.info("client %s forgotten: %d releases deleted", client_id, removed)
        return collafuse_pb2.ForgetReply(removed=removed)

    @answers_storage_errors
    def Status(self, request: collafuse_pb2.StatusRequest, context: grpc.ServicerContext) -> collafuse_pb2.StatusReply:
        """Server and trainer state, and the clients the caller may see, one page at a time (in id order)."""
        self._check_serving(context)
        if request.page_size < 0:
            abort(context, Code.INVALID_ARGUMENT, f"page_size {request.page_size} is negative: leave it 0 for the "
                  f"default page of {STATUS_PAGE} clients, or ask for 1..{MAX_STATUS_PAGE}")
        size = min(request.page_size or STATUS_PAGE, MAX_STATUS_PAGE)
        after = request.page_token
        identity = caller()
        if identity.operator or identity.unrestricted:
            page = self.store.clients_page(after, size + 1)
            total = self.store.client_count()
        else:  # a client sees only itself: no scan of the others
            own = [self.store.get_client(name) for name in sorted(identity.names)]
            mine = [c for c in own if c is not None]
            page, total = [c for c in mine if c.client_id > after][:size + 1], len(mine)
        more = len(page) > size
        page = page[:size]
        counts = self.store.counts_of([c.client_id for c in page])
        received, sent = self._traffic()
        clients = []
        for c in page:
            strikes, dropped_until = self.strikes.status(c.client_id)
            clients.append(collafuse_pb2.ClientStatus(
                client_id=c.client_id, cut=c.cut, protocol=c.protocol, releases=counts.get(c.client_id, 0),
                last_seen=c.last_seen, strikes=strikes, dropped_until=dropped_until,
            ))
        return collafuse_pb2.StatusReply(
            server_id=self.store.server_id,
            fingerprint=self.fingerprint,
            trainer=self._trainer_state(),
            clients=clients,
            device=str(self.trainer.device),
            bytes_received=received,
            bytes_sent=sent,
            release_conflicts=self.store.release_conflicts,
            next_page_token=page[-1].client_id if more and page else "",
            clients_total=total,
        )

    @answers_storage_errors
    def Sample(self, request: collafuse_pb2.SampleRequest, context: grpc.ServicerContext) -> Iterator[collafuse_pb2.SampleEvent]:
        """Who asks is checked here; the request's jobs live in server/sampling_rpc.py."""
        self._check_serving(context)
        client_id = self._client_id(request.client_id, context)
        record = self._registered(client_id, context, "Sample")
        self._touch(client_id)
        try:
            job = sample_job(request, self.T, self.settings.max_sample_images, lambda y: self._label_error(y, None))
        except InvalidSample as exc:
            abort(context, exc.code, str(exc))
        beyond = sample_scope_error(record, job.labels, job.cut, self.classes, self.store.clients(), self.store.counts())
        if beyond:
            abort(context, Code.PERMISSION_DENIED, beyond)
        if job.cut == 0 and not (record.cut == 0 and self.store.count(client_id) > 0):
            abort(
                context, Code.PERMISSION_DENIED,
                f"cut 0 samples the whole chain (the global-model baseline): only a client that released its "
                f"images at cut 0 may ask for it, and client {client_id[:64]!r} holds no releases at cut 0; ask for "
                f"its registered cut {record.cut}",
            )
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

    @answers_storage_errors
    def FetchModel(self, request: collafuse_pb2.FetchModelRequest, context: grpc.ServicerContext) -> Iterator[collafuse_pb2.ModelChunk]:
        """The shared model's EMA weights (server/shared_model.py), for a registered client of a --share-model server."""
        self._check_serving(context)
        client_id = self._client_id(request.client_id, context)
        self._registered(client_id, context, "FetchModel")
        self._touch(client_id)
        try:
            weights = self.shared_model.weights()
        except NotShared as exc:
            abort(context, Code.FAILED_PRECONDITION, str(exc))
        log.info("sending the shared model (step %d, %d bytes) to %s", weights.step, len(weights.data), client_id[:64])
        yield from model_chunks(weights, self.chunk_bytes)

    # ---- the split protocol: the client's registered protocol answers (server/protocols) ----------------
    @answers_storage_errors
    def SplitForward(self, request: collafuse_pb2.SplitForwardRequest, context: grpc.ServicerContext) -> collafuse_pb2.SplitForwardReply:
        self._check_serving(context)
        client = self._registered(self._client_id(request.client_id, context), context, "SplitForward")
        protocol = self._protocol_of(client, context)
        dropped = self.strikes.refusal(client.client_id)
        if dropped is not None:
            refuse(context, dropped)
        try:
            reply = protocol.split_forward(request, client, self._label_error)
        except RequestRefused as exc:
            refuse(context, exc)
        self._touch(client.client_id)
        return reply

    @answers_storage_errors
    def SplitBackward(self, request: collafuse_pb2.SplitBackwardRequest, context: grpc.ServicerContext) -> collafuse_pb2.SplitBackwardReply:
        self._check_serving(context)
        client = self._registered(self._client_id(request.client_id, context), context, "SplitBackward")
        protocol = self._protocol_of(client, context)
        dropped = self.strikes.refusal(client.client_id)
        if dropped is not None:
            refuse(context, dropped)
        try:
            reply = protocol.split_backward(request, client)
        except RequestRefused as exc:
            self.strikes.strike(client.client_id, exc)
            refuse(context, exc)
        if reply.applied:
            self.strikes.clear(client.client_id)
        return reply


def _fixed_while_held(existing: ClientRecord, held: int, cut: int, protocol: int, class_names: list[str]) -> str | None:
    """Why a re-registration may not change what a client holding releases registered (None: it may)."""
    who = f"client {existing.client_id[:64]!r} has {held} releases stored"
    if existing.cut != cut:
        return (f"{who} at cut {existing.cut}; registering at cut {cut} would mix noise levels of the same images: "
                "run forget first (it deletes them), then register again")
    if existing.protocol != protocol:
        return (f"{who} under protocol {protocol_name(existing.protocol)!r}; it cannot switch to "
                f"{protocol_name(protocol)!r} while it holds them: run forget first, then register again")
    if sorted(set(existing.class_names)) != sorted(set(class_names)):
        return (f"{who} for classes {sorted(set(existing.class_names))}; its classes are fixed while it holds "
                f"releases (asked for {sorted(set(class_names))[:16]}): register with the same classes, or run "
                "forget first")
    return None


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
        save_failures=state.save_failures,
        save_error=state.save_error or "",
        clipped_steps=state.clipped_steps,
        refused_steps=state.refused_steps,
        saved_step=state.saved_step,
    )
