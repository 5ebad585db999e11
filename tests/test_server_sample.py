"""Sample over gRPC equals the plain reference loop (tests/sampling_reference.py) with the checkpointed EMA weights."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TypedDict, Unpack

import pytest
import torch
from sampling_reference import reference_sample, relative_difference
from server_support import SHAPE, T, chunks, register, start, stub, upload, wait_phase

from collafuse.common.codec import decode
from collafuse.common.models import load_model
from collafuse.common.sampling import initial_noise
from collafuse.server.app import CollaFuseServer
from collafuse.v1 import collafuse_pb2

torch.set_num_threads(1)
IMAGE_BYTES = 4 * SHAPE[0] * SHAPE[1] * SHAPE[2]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[CollaFuseServer, Path]]:
    store = tmp_path_factory.mktemp("sample")
    # Two images per chunk and per batch: a 5-image request spans 3 chunks and 3 batches.
    running = start(store, max_steps=3, min_clients=2, chunk_bytes=2 * IMAGE_BYTES, sample_batch=2)
    api = stub(running)
    register(api, "alice", cut=10)
    register(api, "bob", cut=30)
    upload(api, chunks("alice", 10, 4, 2, prefix="alice"))
    upload(api, chunks("bob", 30, 4, 4, prefix="bob", seed=1))
    status = wait_phase(api, "done")
    assert status.trainer.step == 3 and status.trainer.clients_with_releases == 2
    yield running, store
    running.stop(0)


class SampleFields(TypedDict, total=False):
    """SampleRequest's fields besides client_id."""

    labels: list[int]
    seed: int
    num_inference_steps: int
    scheduler: str
    guidance_scale: float
    cut: int


def sample(server: CollaFuseServer, **fields: Unpack[SampleFields]
           ) -> tuple[torch.Tensor, list[collafuse_pb2.SampleChunk], list[collafuse_pb2.SampleProgress]]:
    events = list(stub(server).Sample(collafuse_pb2.SampleRequest(client_id="alice", **fields), timeout=120))
    progress = [e.progress for e in events if e.WhichOneof("event") == "progress"]
    parts = [e.chunk for e in events if e.WhichOneof("event") == "chunk"]
    assert events[-1].WhichOneof("event") == "chunk", "chunks come after the progress events"
    x = torch.cat([decode(c.x, shape=(None, *SHAPE)) for c in parts])
    return x, parts, progress


# Cuts 21 and 11 are steps (t) of their chains over T = 50, so a server evaluating t = cut shows; both are at or
# above the lowest cut the server trained for (10), which the server requires (server/auth.py).
@pytest.mark.parametrize(("kind", "steps", "guidance", "cut", "per_image"),
                         [("ddpm", 10, 1.0, 21, 5), ("ddim", 5, 2.0, 11, 3), ("ddpm", 0, 1.0, 21, 29)])
def test_sample_matches_the_reference_loop(trained, kind: str, steps: int, guidance: float, cut: int, per_image: int) -> None:  # type: ignore[no-untyped-def]
    server, store = trained
    labels = [0, 1, 2, 3, 0]  # 3 is the null label: unconditional
    x, parts, progress = sample(server, labels=labels, seed=7, num_inference_steps=steps, scheduler=kind,
                                guidance_scale=guidance, cut=cut)
    assert [c.offset for c in parts] == [0, 2, 4]
    assert all(c.x.dtype == "float32" and len(c.x.data) <= 2 * IMAGE_BYTES for c in parts)

    ema, meta = load_model(store / "checkpoints" / "latest" / "ema")
    assert meta["step"] == 3
    reference, _ = reference_sample(
        ema, ema, num_train_timesteps=T, kind=kind, num_inference_steps=steps, cut=cut, labels=labels, seed=7,
        guidance=guidance, image_shape=SHAPE,
    )
    assert x.shape == reference.shape
    rel = relative_difference(x, reference)
    assert rel <= 1e-5, rel

    assert all(c.server_steps == per_image for c in parts)
    total = per_image * 3  # three batches of at most two images
    assert (progress[0].steps_done, progress[0].steps_total) == (0, total)
    assert (progress[-1].steps_done, progress[-1].steps_total) == (total, total)
    assert [p.steps_done for p in progress] == sorted(p.steps_done for p in progress)


def test_cut_T_returns_the_initial_noise(trained) -> None:  # type: ignore[no-untyped-def]
    server, _ = trained
    T = server.settings.num_train_timesteps
    x, parts, progress = sample(server, labels=[0, 1, 2], seed=3, num_inference_steps=10, scheduler="ddpm",
                                guidance_scale=1.0, cut=T)
    assert torch.equal(x, initial_noise(3, range(3), SHAPE))
    assert all(c.server_steps == 0 for c in parts)
    assert progress[-1].steps_total == 0


def test_unset_guidance_means_plain_conditional(trained) -> None:  # type: ignore[no-untyped-def]
    server, _ = trained
    common: SampleFields = {"labels": [0, 1], "seed": 5, "num_inference_steps": 5, "scheduler": "ddim", "cut": 20}
    unset, _, _ = sample(server, **common)
    guided: SampleFields = {**common, "guidance_scale": 1.0}
    plain, _, _ = sample(server, **guided)
    assert torch.equal(unset, plain)
