"""The shared model's weights for clients that start their local models from them (FetchModel, ``--share-model``).

The EMA weights a Sample call would use, serialised as safetensors (tensors only: nothing a client loads can run
code) and cached per trainer step, since every client of a run asks for the same ones once the trainer is done.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import cast

import safetensors.torch
import torch
from diffusers.models import UNet2DModel

from collafuse.v1 import collafuse_pb2


class NotShared(Exception):
    """Why FetchModel cannot answer (the server does not share its model, or has nothing trained to share)."""


@dataclass(frozen=True)
class SharedWeights:
    preset: str
    step: int
    data: bytes  # the safetensors file
    sha256: str


class SharedModel:
    """Serialises the trainer's EMA snapshot once per step."""

    def __init__(self, preset: str, snapshot: Callable[[], tuple[int, UNet2DModel]], enabled: bool) -> None:
        self.preset = preset
        self._snapshot = snapshot
        self.enabled = enabled
        self._lock = threading.Lock()
        self._cached: SharedWeights | None = None

    def weights(self) -> SharedWeights:
        if not self.enabled:
            raise NotShared("this server does not share its model: its operator can start it with --share-model "
                            "(every registered client may then download the shared weights); until then, run the "
                            "client without --init-from-server")
        step, model = self._snapshot()
        if step <= 0:
            raise NotShared("the shared model has not trained a step yet: wait for the server's training (the "
                            "client's --init-from-server waits for it to finish) and ask again")
        with self._lock:
            if self._cached is None or self._cached.step != step:
                state = cast(torch.nn.Module, model).state_dict()
                tensors = {name: value.detach().cpu().contiguous() for name, value in state.items()}
                data = safetensors.torch.save(tensors, metadata={"preset": self.preset, "step": str(step)})
                self._cached = SharedWeights(self.preset, step, data, hashlib.sha256(data).hexdigest())
            return self._cached


def model_chunks(weights: SharedWeights, chunk_bytes: int) -> Iterator[collafuse_pb2.ModelChunk]:
    """The header, then the safetensors bytes in pieces of at most ``chunk_bytes``."""
    yield collafuse_pb2.ModelChunk(header=collafuse_pb2.ModelHeader(
        preset=weights.preset, step=weights.step, total_bytes=len(weights.data), sha256=weights.sha256))
    size = max(1, chunk_bytes)
    for offset in range(0, len(weights.data), size):
        yield collafuse_pb2.ModelChunk(data=weights.data[offset:offset + size])
