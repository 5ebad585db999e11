"""A minimal in-process CollaFuse server for the client's tests (the real server has its own e2e tests).

It implements the proto on 127.0.0.1 with a port picked by the OS, keeps a transcript
of every release payload, and can simulate failures: a Release whose ack is lost
after the store wrote it (UNAVAILABLE), a fingerprint check, unknown classes. A hostile
one (tests/test_hostile_server.py) changes what it serves at will (``serve``) and may
claim a fingerprint that is not the one of its setup.
"""

from __future__ import annotations

import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from typing import Self

import grpc
import torch

from collafuse.common.codec import decode, encode
from collafuse.common.models import as_denoiser, build_unet
from collafuse.common.rpc import server_options
from collafuse.common.sampling import make_chain, server_half
from collafuse.common.schedule import ScheduleConfig, fingerprint
from collafuse.v1 import collafuse_pb2, collafuse_pb2_grpc


@dataclass
class StoredRelease:
    client_id: str
    image_key: str
    label: int
    cut: int
    x_cut: torch.Tensor
    data: bytes


@dataclass
class FakeState:
    image_shape: tuple[int, int, int] = (1, 8, 8)
    classes: tuple[str, ...] = ("0", "1", "2")
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(num_train_timesteps=50))
    server_id: str = "fake-server"
    # Release calls to answer UNAVAILABLE *after* storing (a lost ack).
    lose_release_acks: int = 0
    # Phases Heartbeat reports in turn (short names of the Phase enum); the last one repeats.
    phases: list[str] = field(default_factory=lambda: ["done"])
    sample_chunk_images: int = 2
    # A hostile server's claim: this fingerprint string whatever it serves (None: the honest one).
    claimed_fingerprint: str | None = None


class FakeServicer(collafuse_pb2_grpc.CollaFuseServicer):
    def __init__(self, state: FakeState, model_seed: int = 123) -> None:
        self.state = state
        self.store: dict[tuple[str, str], StoredRelease] = {}
        self.transcript: list[collafuse_pb2.ReleaseChunk] = []
        self.release_calls = 0
        self.sample_requests: list[collafuse_pb2.SampleRequest] = []
        self.registered: list[collafuse_pb2.RegisterRequest] = []
        self._lock = threading.Lock()
        torch.manual_seed(model_seed)
        self.model = build_unet("tiny", state.image_shape, len(state.classes)).eval()

    @property
    def fingerprint(self) -> str:
        """What the server says its fingerprint is: the honest one of its state, or the claimed string."""
        s = self.state
        return s.claimed_fingerprint or fingerprint(s.schedule, s.image_shape, list(s.classes))

    def serve(self, **changes: object) -> None:
        """Serve another setup from the next call on (e.g. ``schedule=``, ``image_shape=``, ``claimed_fingerprint=``);
        a hostile server changes what it serves whenever it likes, and keeps what it got."""
        for name, value in changes.items():
            if not hasattr(self.state, name):
                raise AttributeError(f"FakeState has no field {name!r}")
            setattr(self.state, name, value)

    def _spec(self) -> collafuse_pb2.ImageSpec:
        c, h, w = self.state.image_shape
        return collafuse_pb2.ImageSpec(channels=c, height=h, width=w)

    def Register(self, request, context):
        self.registered.append(request)
        if request.expected_fingerprint and request.expected_fingerprint != self.fingerprint:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "fingerprint differs from the server's")
        unknown = sorted(set(request.class_names) - set(self.state.classes))
        if unknown:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown classes {unknown}; served: {list(self.state.classes)}")
        s = self.state.schedule
        held = sum(1 for (cid, _) in self.store if cid == request.client_id)
        return collafuse_pb2.RegisterReply(
            server_id=self.state.server_id,
            image_spec=self._spec(),
            schedule=collafuse_pb2.ScheduleSpec(config_json=s.config_json(), fingerprint=s.config_digest()),
            class_names=list(self.state.classes),
            fingerprint=self.fingerprint,
            releases_stored=held,
        )

    def Heartbeat(self, request, context):
        phase = self.state.phases.pop(0) if len(self.state.phases) > 1 else self.state.phases[0]
        return collafuse_pb2.HeartbeatReply(
            server_time=time.time(),
            trainer=collafuse_pb2.TrainerState(phase=f"PHASE_{phase.upper()}", step=10, max_steps=10, last_loss=0.5, releases=len(self.store)),
        )

    def Release(self, request_iterator, context):
        stored = duplicates = 0
        client = ""
        for chunk in request_iterator:
            self.transcript.append(chunk)
            client = chunk.client_id
            for item in chunk.items:
                x = decode(item.x_cut, what="x_cut", shape=self.state.image_shape)
                key = (chunk.client_id, item.image_key)
                with self._lock:
                    if key in self.store:
                        duplicates += 1
                    else:
                        self.store[key] = StoredRelease(chunk.client_id, item.image_key, item.label, chunk.cut, x, item.x_cut.data)
                        stored += 1
        self.release_calls += 1
        if self.state.lose_release_acks > 0:
            self.state.lose_release_acks -= 1
            context.abort(grpc.StatusCode.UNAVAILABLE, "simulated: connection lost before the ack")
        total = sum(1 for (cid, _) in self.store if cid == client)
        return collafuse_pb2.ReleaseAck(stored=stored, duplicates=duplicates, total_for_client=total)

    def Forget(self, request, context):
        keys = [k for k in self.store if k[0] == request.client_id]
        for k in keys:
            del self.store[k]
        return collafuse_pb2.ForgetReply(removed=len(keys))

    def Status(self, request, context):
        return collafuse_pb2.StatusReply(
            server_id=self.state.server_id, fingerprint=self.fingerprint,
            trainer=collafuse_pb2.TrainerState(phase=collafuse_pb2.PHASE_DONE), device="cpu",
        )

    def Sample(self, request, context):
        self.sample_requests.append(request)
        labels = torch.tensor(list(request.labels), dtype=torch.long)
        events: list[tuple[int, int]] = []
        chain = make_chain(self.state.schedule, request.scheduler or "ddpm", request.num_inference_steps,
                           request.cut)
        x = server_half(
            as_denoiser(self.model, request.guidance_scale or 1.0), chain, labels, request.seed, request.cut,
            self.state.image_shape, progress=lambda d, t: events.append((d, t)),
        )
        for done, total in events:
            yield collafuse_pb2.SampleEvent(progress=collafuse_pb2.SampleProgress(steps_done=done, steps_total=total))
        n = self.state.sample_chunk_images
        for offset in range(0, x.shape[0], n):
            yield collafuse_pb2.SampleEvent(
                chunk=collafuse_pb2.SampleChunk(offset=offset, x=encode(x[offset : offset + n]), server_steps=len(events))
            )


class FakeServer:
    """Start with ``with FakeServer() as fake: fake.target``."""

    def __init__(self, state: FakeState | None = None, servicer: FakeServicer | None = None) -> None:
        # ``servicer``: a misbehaving subclass (tests/test_client_guard.py) instead of the honest one.
        self.servicer = servicer or FakeServicer(state or FakeState())
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=server_options())
        collafuse_pb2_grpc.add_CollaFuseServicer_to_server(self.servicer, self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self.target = f"127.0.0.1:{self.port}"

    def __enter__(self) -> Self:
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop(grace=None)


def make_image_folder(root, classes=("0", "2"), per_class=4, size=8, seed=0):  # type: ignore[no-untyped-def]
    """A small class-folder dataset of random grey PNGs; returns the root."""
    import numpy as np

    from collafuse.common.data import save_png

    rng = np.random.default_rng(seed)
    for name in classes:
        for i in range(per_class):
            save_png(rng.uniform(-1, 1, (1, size, size)).astype(np.float32), root / name / f"img{i:03d}.png")
    return root


def closed_port() -> int:
    """A local port nothing listens on (bound and released at once)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
