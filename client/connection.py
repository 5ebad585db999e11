"""The client's end of the wire: one channel, typed calls, deadlines, retries, byte counts.

Every RPC of the CollaFuse service is idempotent (re-join, image keys, forget,
reads), so every call goes through ``common.rpc.call_with_retry``. A retry
re-runs the whole attempt: a client stream is re-created from its factory and a
server stream is read again from the start, so a half-read or half-sent
attempt never leaks into the next one. A restarting server is waited out: each
call retries UNAVAILABLE (and DEADLINE_EXCEEDED) with exponential backoff and full
jitter for up to the policy's ``wait_timeout`` (``--wait-timeout``), logging what
it waits for; the ledger makes the resumed uploads skip what was acknowledged.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Self, TypeVar

import grpc
import torch
from google.protobuf.message import Message

from collafuse.client.errors import ClientError
from collafuse.common.autoencoder import AutoencoderIdentity
from collafuse.common.codec import TensorError, decode
from collafuse.common.enums import protocol_value
from collafuse.common.rpc import RetryPolicy, call_with_retry, open_channel
from collafuse.common.sampling import ProgressFn
from collafuse.common.schedule import ScheduleConfig, ScheduleError
from collafuse.common.tls import TlsError, channel_credentials
from collafuse.v1 import collafuse_pb2, collafuse_pb2_grpc

log = logging.getLogger(__name__)
R = TypeVar("R")

# Release uploads and the server's half of a sampling chain take far longer than a
# heartbeat; they get their own, longer deadline (a multiple of the per-RPC one).
LONG_CALL_FACTOR = 10.0


@dataclass
class RpcTraffic:
    """What one RPC kind cost: calls, attempts (retries included) and serialized message bytes."""

    calls: int = 0
    attempts: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class ServerInfo:
    """What Register tells the client: the spec its data is converted to and the shared schedule."""

    server_id: str
    image_shape: tuple[int, int, int]
    schedule: ScheduleConfig
    class_names: list[str]
    fingerprint: str
    releases_stored: int
    schedule_json: str = ""
    # The shared frozen autoencoder the server announced (None: pixel space; image_shape is then the images').
    autoencoder: AutoencoderIdentity | None = None

    @classmethod
    def from_reply(cls, reply: collafuse_pb2.RegisterReply) -> ServerInfo:
        spec = reply.image_spec
        if min(spec.channels, spec.height, spec.width) <= 0:
            raise ClientError(f"server sent an unusable image spec {spec.channels}x{spec.height}x{spec.width}")
        if not reply.class_names:
            raise ClientError("server sent an empty class list")
        return cls(
            server_id=reply.server_id,
            image_shape=(spec.channels, spec.height, spec.width),
            schedule=schedule_from_spec(reply.schedule),
            class_names=list(reply.class_names),
            fingerprint=reply.fingerprint,
            releases_stored=int(reply.releases_stored),
            schedule_json=reply.schedule.config_json,
            autoencoder=identity_from_spec(reply.autoencoder) if reply.HasField("autoencoder") else None,
        )

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["schedule"] = self.schedule.model_dump()
        data["image_shape"] = list(self.image_shape)
        data["autoencoder"] = asdict(self.autoencoder) if self.autoencoder else None
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ServerInfo:
        return cls(
            server_id=data["server_id"],
            image_shape=tuple(data["image_shape"]),  # type: ignore[arg-type]
            schedule=ScheduleConfig(**data["schedule"]),
            class_names=list(data["class_names"]),
            fingerprint=data["fingerprint"],
            releases_stored=int(data.get("releases_stored", 0)),
            schedule_json=data.get("schedule_json", ""),
            autoencoder=AutoencoderIdentity(**data["autoencoder"]) if data.get("autoencoder") else None,
        )


def identity_from_spec(spec: collafuse_pb2.AutoencoderSpec) -> AutoencoderIdentity:
    """The autoencoder a server announced; checked against the client's own in client/joining.py."""
    if not spec.class_name or not spec.weights_sha256:
        raise ClientError("server announced an autoencoder without a class name or weights hash")
    return AutoencoderIdentity(spec.class_name, spec.config_json, spec.weights_sha256)


def schedule_from_spec(spec: collafuse_pb2.ScheduleSpec) -> ScheduleConfig:
    """The schedule a server sent, checked before any use: the one place a server-sent schedule enters.

    A server-sent schedule is an input, never an order (docs/design.md §7): it must rebuild with diffusers'
    ``from_config``, match its fingerprint, use only supported options and give finite, strictly decreasing
    alphas_cumprod whose alpha_bar_1 is below 1 in float32 (the NaN guard).
    """
    if not spec.config_json:
        raise ClientError("server sent no scheduler config: it runs an older, incompatible CollaFuse; upgrade it")
    try:
        return ScheduleConfig.from_wire(spec.config_json, spec.fingerprint)
    except ScheduleError as exc:
        raise ClientError(f"server sent a schedule this client refuses: {exc}") from exc


@dataclass
class SampleResult:
    """The server's half of a sampling chain: x_hat_cut [N, C, H, W] and its evaluations per image."""

    x_cut: torch.Tensor
    server_steps: int
    seconds: float = 0.0
    progress_events: int = field(default=0)


def tls_credentials(cert: Path | None, key: Path | None, ca: Path | None) -> grpc.ChannelCredentials | None:
    """The channel's TLS credentials from --tls-cert/--tls-key/--tls-ca (None: plain TCP)."""
    try:
        return channel_credentials(cert, key, ca)
    except TlsError as exc:
        raise ClientError(str(exc)) from None


class ServerConnection:
    """A channel to collafuse-server with deadlines, retries and per-RPC traffic accounting."""

    def __init__(
        self,
        target: str,
        token: str | None = None,
        policy: RetryPolicy | None = None,
        rpc_timeout: float = 60.0,
        long_timeout: float | None = None,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self.target = target
        self.policy = policy or RetryPolicy()
        self.rpc_timeout = rpc_timeout
        self.long_timeout = long_timeout if long_timeout is not None else rpc_timeout * LONG_CALL_FACTOR
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._channel = open_channel(target, token, credentials)
        self._stub = collafuse_pb2_grpc.CollaFuseStub(self._channel)
        self.traffic: dict[str, RpcTraffic] = {}

    # -- plumbing ---------------------------------------------------------------------------------

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def traffic_report(self) -> dict[str, dict[str, float]]:
        return {name: asdict(t) for name, t in sorted(self.traffic.items())}

    def _stats(self, name: str) -> RpcTraffic:
        return self.traffic.setdefault(name, RpcTraffic())

    def _invoke(self, name: str, attempt: Callable[[RpcTraffic], R]) -> R:
        """Run ``attempt`` under the retry policy; non-retryable gRPC errors become ClientError."""
        stats = self._stats(name)
        stats.calls += 1
        started = time.perf_counter()

        def once() -> R:
            stats.attempts += 1
            return attempt(stats)

        try:
            # ServerUnreachable (retries exhausted) propagates as is: its message is already plain.
            return call_with_retry(once, self.policy, name, self.target, rng=self._rng, sleep=self._sleep)
        except grpc.RpcError as exc:
            raise ClientError.from_rpc(name, exc) from None
        finally:
            stats.seconds += time.perf_counter() - started

    def _unary(self, name: str, method: Callable[..., Message], request: Message, timeout: float | None = None) -> Any:
        def attempt(stats: RpcTraffic) -> Message:
            stats.bytes_sent += request.ByteSize()
            reply = method(request, timeout=timeout or self.rpc_timeout)
            stats.bytes_received += reply.ByteSize()
            return reply

        return self._invoke(name, attempt)

    # -- the service ------------------------------------------------------------------------------

    def register(
        self,
        client_id: str,
        cut: int,
        protocol: str,
        class_names: Iterable[str],
        expected_fingerprint: str = "",
        image_spec: collafuse_pb2.ImageSpec | None = None,
    ) -> ServerInfo:
        request = collafuse_pb2.RegisterRequest(
            client_id=client_id,
            cut=cut,
            protocol=protocol_value(protocol),
            class_names=list(class_names),
            expected_fingerprint=expected_fingerprint,
        )
        if image_spec is not None:
            request.image_spec.CopyFrom(image_spec)
        reply = self._unary("Register", self._stub.Register, request)
        return ServerInfo.from_reply(reply)

    def heartbeat(self, client_id: str) -> collafuse_pb2.HeartbeatReply:
        return self._unary("Heartbeat", self._stub.Heartbeat, collafuse_pb2.HeartbeatRequest(client_id=client_id))

    def status(self) -> collafuse_pb2.StatusReply:
        return self._unary("Status", self._stub.Status, collafuse_pb2.StatusRequest())

    def forget(self, client_id: str) -> collafuse_pb2.ForgetReply:
        return self._unary("Forget", self._stub.Forget, collafuse_pb2.ForgetRequest(client_id=client_id))

    def release(self, chunks: Callable[[], Iterable[collafuse_pb2.ReleaseChunk]]) -> collafuse_pb2.ReleaseAck:
        """Upload one client stream of release chunks; ``chunks`` is called afresh for every attempt.

        The factory must yield the same messages each time (the ledger's per-image seeds make the
        payload identical), so a retried upload is a no-op for items the server already stored. The final
        message goes out with the end-of-stream marker (``end_of_stream``): the server stores a stream only
        when it ends with it, so one cut short (a cancel, a passed deadline) stores nothing.
        """

        def attempt(stats: RpcTraffic) -> collafuse_pb2.ReleaseAck:
            def counted() -> Iterator[collafuse_pb2.ReleaseChunk]:
                for chunk in end_of_stream(chunks()):
                    stats.bytes_sent += chunk.ByteSize()
                    yield chunk

            ack = self._stub.Release(counted(), timeout=self.long_timeout)
            stats.bytes_received += ack.ByteSize()
            return ack

        return self._invoke("Release", attempt)

    def sample(
        self,
        request: collafuse_pb2.SampleRequest,
        image_shape: tuple[int, int, int] | None = None,
        progress: ProgressFn | None = None,
    ) -> SampleResult:
        """The server's half of the chain for ``request``: x_hat_cut assembled from the streamed chunks."""
        total = len(request.labels)

        def attempt(stats: RpcTraffic) -> SampleResult:
            started = time.perf_counter()
            stats.bytes_sent += request.ByteSize()
            parts: dict[int, torch.Tensor] = {}
            steps: set[int] = set()
            events = 0
            call = self._stub.Sample(request, timeout=self.long_timeout)
            try:
                for event in call:
                    stats.bytes_received += event.ByteSize()
                    kind = event.WhichOneof("event")
                    if kind == "progress":
                        events += 1
                        if progress is not None:
                            progress(event.progress.steps_done, event.progress.steps_total)
                    elif kind == "chunk":
                        parts[event.chunk.offset] = _decode_chunk(event.chunk, image_shape, total)
                        steps.add(int(event.chunk.server_steps))
            except ClientError:
                # A malformed stream is not worth finishing: free the server's work at once.
                call.cancel()
                raise
            x_cut = _assemble(parts, total)
            if len(steps) > 1:
                raise ClientError(f"server reported different step counts within one Sample: {sorted(steps)}")
            return SampleResult(x_cut, steps.pop() if steps else 0, time.perf_counter() - started, events)

        return self._invoke("Sample", attempt)

    def fetch_model(
        self, client_id: str, max_bytes: Callable[[collafuse_pb2.ModelHeader], int]
    ) -> tuple[collafuse_pb2.ModelHeader, bytes]:
        """The shared model's header and safetensors bytes (FetchModel). ``max_bytes`` judges the header (and may
        refuse it with a ClientError) before a byte is kept: a stream that breaks the header's word or passes the
        bound is cut off at once (client/shared_model.py checks what the bytes hold)."""

        def attempt(stats: RpcTraffic) -> tuple[collafuse_pb2.ModelHeader, bytes]:
            request = collafuse_pb2.FetchModelRequest(client_id=client_id)
            stats.bytes_sent += request.ByteSize()
            header: collafuse_pb2.ModelHeader | None = None
            limit, data = 0, bytearray()
            call = self._stub.FetchModel(request, timeout=self.long_timeout)
            try:
                for chunk in call:
                    stats.bytes_received += chunk.ByteSize()
                    if chunk.WhichOneof("part") == "header":
                        if header is not None:
                            raise ClientError("the server sent FetchModel's header twice")
                        header = chunk.header
                        limit = min(max_bytes(header), max(0, int(header.total_bytes)))
                    elif header is None:
                        raise ClientError("the server sent model bytes before FetchModel's header")
                    else:
                        data += chunk.data
                        if len(data) > limit:
                            raise ClientError(f"the server sent more than the {limit} bytes the shared model's "
                                              f"header allows (preset {header.preset!r}, {header.total_bytes} "
                                              "announced)")
            except ClientError:
                call.cancel()  # nothing more of a broken stream is worth receiving
                raise
            if header is None:
                raise ClientError("the server ended FetchModel without a header: no model was sent")
            if len(data) != header.total_bytes:
                raise ClientError(f"the server announced {header.total_bytes} bytes of model and sent {len(data)}")
            return header, bytes(data)

        return self._invoke("FetchModel", attempt)

    def split_forward(self, request: collafuse_pb2.SplitForwardRequest) -> collafuse_pb2.SplitForwardReply:
        """The first half of a split step; build ``request`` with client/protocols/split.py (its send guard)."""
        return self._unary("SplitForward", self._stub.SplitForward, request)

    def split_backward(self, request: collafuse_pb2.SplitBackwardRequest) -> collafuse_pb2.SplitBackwardReply:
        """The second half: dL/d(eps_hat) for a step id. The server answers once the step's round is applied, so
        the call gets the long deadline (a retry of an answered step is acknowledged, not re-applied)."""
        return self._unary("SplitBackward", self._stub.SplitBackward, request, timeout=max(self.long_timeout,
                                                                                          self.rpc_timeout))


def end_of_stream(chunks: Iterable[collafuse_pb2.ReleaseChunk]) -> Iterator[collafuse_pb2.ReleaseChunk]:
    """``chunks`` with the final one sent as a copy that carries the end-of-stream marker (``last`` and the
    stream's ``total_items``); the caller's messages are not changed. An empty stream stays empty."""
    items = 0
    held: collafuse_pb2.ReleaseChunk | None = None
    for chunk in chunks:
        if held is not None:
            yield held
        items += len(chunk.items)
        held = chunk
    if held is not None:
        final = collafuse_pb2.ReleaseChunk()
        final.CopyFrom(held)
        final.last, final.total_items = True, items
        yield final


def _decode_chunk(
    chunk: collafuse_pb2.SampleChunk, image_shape: tuple[int, int, int] | None, total: int
) -> torch.Tensor:
    shape = (None, *image_shape) if image_shape is not None else (None, None, None, None)
    try:
        x = decode(chunk.x, what=f"hand-off chunk at offset {chunk.offset}", dtypes=("float32",), shape=shape)
    except TensorError as exc:
        raise ClientError(f"server sent a malformed Sample chunk: {exc}") from exc
    if chunk.offset < 0 or chunk.offset + x.shape[0] > total:
        raise ClientError(f"server sent images {chunk.offset}..{chunk.offset + x.shape[0]} of a {total}-image request")
    return x


def _assemble(parts: dict[int, torch.Tensor], total: int) -> torch.Tensor:
    """Concatenate chunks in offset order; every image must arrive exactly once."""
    if not parts:
        raise ClientError(f"server's Sample stream ended without any of the {total} images")
    ordered = [parts[k] for k in sorted(parts)]
    covered = 0
    for offset in sorted(parts):
        if offset != covered:
            raise ClientError(f"server's Sample stream skipped or repeated images (expected offset {covered}, got {offset})")
        covered += parts[offset].shape[0]
    if covered != total:
        raise ClientError(f"server's Sample stream ended after {covered} of {total} images")
    return torch.cat(ordered)
