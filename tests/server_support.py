"""Helpers for the server tests: tiny settings, an in-process server on 127.0.0.1:0, release messages."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import torch

from collafuse.client.connection import end_of_stream
from collafuse.common.codec import encode
from collafuse.common.config import ServerSettings
from collafuse.common.enums import phase_name
from collafuse.common.rpc import open_channel
from collafuse.server.app import CollaFuseServer, build_server
from collafuse.v1 import collafuse_pb2, collafuse_pb2_grpc

T = 50
CLASSES = ["a", "b", "c"]
SHAPE = (1, 8, 8)


def tiny_settings(store: Path, **overrides: Any) -> ServerSettings:
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "store": store,
        "device": "cpu",
        "image_size": SHAPE[1],
        "channels": SHAPE[0],
        "classes": CLASSES,
        "model_preset": "tiny",
        "num_train_timesteps": T,
        "batch_size": 8,
        "max_steps": 3,
        "checkpoint_every": 100,
        "min_clients": 1,
        "start_timeout": 60.0,
        "max_sample_images": 16,
        "seed": 0,
        "ema_decay": 0.9,
    }
    values.update(overrides)
    return ServerSettings(**values)


def start(store: Path, **kwargs: Any) -> CollaFuseServer:
    """An in-process server; ``kwargs`` go to build_server when they are its knobs, else to the settings."""
    knobs = {k: kwargs.pop(k) for k in list(kwargs) if k in ("start_trainer", "sample_batch", "chunk_bytes", "poll_interval",
                                                                "data_parallel")}
    knobs.setdefault("poll_interval", 0.05)
    return build_server(tiny_settings(store, **kwargs), **knobs)


def stub(server: CollaFuseServer, token: str | None = None) -> collafuse_pb2_grpc.CollaFuseStub:
    return collafuse_pb2_grpc.CollaFuseStub(open_channel(server.address, token=token))


def register(stub_: collafuse_pb2_grpc.CollaFuseStub, client_id: str, cut: int = 20, classes: Sequence[str] = CLASSES,
             **fields: Any) -> collafuse_pb2.RegisterReply:
    request = collafuse_pb2.RegisterRequest(client_id=client_id, cut=cut, protocol=collafuse_pb2.PROTOCOL_AMBIENT, class_names=list(classes), **fields)
    return stub_.Register(request, timeout=10)


def release_item(key: str, label: int, x: torch.Tensor | None = None, seed: int = 0) -> collafuse_pb2.ReleaseItem:
    if x is None:
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))
    return collafuse_pb2.ReleaseItem(image_key=key, label=label, x_cut=encode(x))


def chunks(client_id: str, cut: int, n: int, per_chunk: int, prefix: str = "img", seed: int = 0) -> list[collafuse_pb2.ReleaseChunk]:
    """n releases with labels cycling over the classes, split into chunks of per_chunk items."""
    items = [release_item(f"{prefix}-{i}", i % len(CLASSES), seed=seed * 10_000 + i) for i in range(n)]
    return [
        collafuse_pb2.ReleaseChunk(client_id=client_id, cut=cut, items=items[s:s + per_chunk])
        for s in range(0, n, per_chunk)
    ]


def upload(stub_: collafuse_pb2_grpc.CollaFuseStub, chunk_list: Sequence[collafuse_pb2.ReleaseChunk]) -> collafuse_pb2.ReleaseAck:
    """A complete Release stream: the final chunk carries the end-of-stream marker, as the client sends it."""
    def stream() -> Iterator[collafuse_pb2.ReleaseChunk]:
        yield from end_of_stream(chunk_list)

    return stub_.Release(stream(), timeout=30)


def rpc_error(call: Any, *args: Any, **kwargs: Any) -> grpc.RpcError:
    """The RpcError a call raises (for streaming responses, the one its iteration raises)."""
    try:
        result = call(*args, timeout=30, **kwargs)
        if hasattr(result, "__iter__") and not hasattr(result, "ByteSize"):
            list(result)
    except grpc.RpcError as exc:
        return exc
    raise AssertionError("the call succeeded but an error was expected")


def wait_phase(stub_: collafuse_pb2_grpc.CollaFuseStub, phase: str, timeout: float = 60.0) -> collafuse_pb2.StatusReply:
    """Poll Status until the trainer's phase has the short name ``phase`` ("done", ...)."""
    deadline = time.monotonic() + timeout
    while True:
        status = stub_.Status(collafuse_pb2.StatusRequest(), timeout=10)
        if phase_name(status.trainer.phase) == phase:
            return status
        if time.monotonic() > deadline:
            raise AssertionError(f"trainer stayed {phase_name(status.trainer.phase)!r} (step {status.trainer.step}), wanted {phase!r}")
        time.sleep(0.05)
