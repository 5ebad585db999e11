"""The split sampler: the cut is an argument, halves compose, batching changes nothing."""

from __future__ import annotations

import pytest
import torch

from collafuse.common.models import as_denoiser, build_unet
from collafuse.common.sampling import client_half, initial_noise, server_half, split_sample
from collafuse.common.schedule import ScheduleConfig

SHAPE = (1, 8, 8)
SCHEDULE = ScheduleConfig(num_train_timesteps=100)


@pytest.fixture(scope="module")
def denoisers():  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    server = build_unet("tiny", SHAPE, 3).eval()
    client = build_unet("tiny", SHAPE, 3).eval()
    return as_denoiser(server), as_denoiser(client)


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
@pytest.mark.parametrize("cut", [0, 30, 100])
def test_split_equals_halves_and_single_process_chain(denoisers, kind: str, cut: int) -> None:  # type: ignore[no-untyped-def]
    server, client = denoisers
    labels = torch.tensor([0, 1, 2, 1])
    x_cut, x0 = split_sample(server, client, SCHEDULE, labels, seed=5, cut=cut, num_inference_steps=20, kind=kind, image_shape=SHAPE)
    handoff = server_half(server, SCHEDULE, labels, 5, cut, 20, kind, SHAPE)
    assert torch.equal(handoff, x_cut)
    assert torch.equal(client_half(client, SCHEDULE, handoff, labels, 5, cut, 20, kind), x0)
    assert torch.isfinite(x0).all()


def test_cut_edges_are_the_baselines(denoisers) -> None:  # type: ignore[no-untyped-def]
    server, client = denoisers
    labels = torch.tensor([0, 1])
    # ICM: the server runs nothing, the hand-off is x_T itself.
    x_cut, _ = split_sample(server, client, SCHEDULE, labels, 3, cut=100, num_inference_steps=10, image_shape=SHAPE)
    assert torch.equal(x_cut, initial_noise(3, [0, 1], SHAPE))
    # GM: the client runs nothing, its output is the server's.
    x_cut, x0 = split_sample(server, client, SCHEDULE, labels, 3, cut=0, num_inference_steps=10, image_shape=SHAPE)
    assert torch.equal(x_cut, x0)


def test_result_does_not_depend_on_batching(denoisers) -> None:  # type: ignore[no-untyped-def]
    server, _ = denoisers
    labels = torch.tensor([0, 1, 2, 0, 1])
    whole = server_half(server, SCHEDULE, labels, 9, 40, 10, "ddpm", SHAPE)
    parts = [server_half(server, SCHEDULE, labels[i : i + 2], 9, 40, 10, "ddpm", SHAPE, image_indices=range(i, min(i + 2, 5))) for i in (0, 2, 4)]
    assert torch.allclose(torch.cat(parts), whole, rtol=1e-5, atol=1e-6)


def test_seed_changes_the_chain(denoisers) -> None:  # type: ignore[no-untyped-def]
    server, _ = denoisers
    labels = torch.tensor([0])
    a = server_half(server, SCHEDULE, labels, 1, 0, 5, "ddpm", SHAPE)
    b = server_half(server, SCHEDULE, labels, 2, 0, 5, "ddpm", SHAPE)
    assert not torch.allclose(a, b)
