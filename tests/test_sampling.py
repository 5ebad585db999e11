"""The split sampler: it equals one plain reference loop, halves compose, batching changes nothing."""

from __future__ import annotations

import pytest
import torch
from diffusers.models import UNet2DModel
from sampling_reference import reference_sample, relative_difference

from collafuse.common.models import as_denoiser, build_unet
from collafuse.common.sampling import client_half, handoff_sample, initial_noise, make_chain, server_half
from collafuse.common.schedule import ScheduleConfig

SHAPE = (1, 8, 8)
T = 100
SCHEDULE = ScheduleConfig(num_train_timesteps=T)
LABELS = [0, 1, 2, 1]  # 2 is the null label of a 3-embedding model: an unconditional image


@pytest.fixture(scope="module")
def models() -> tuple[UNet2DModel, UNet2DModel]:
    torch.manual_seed(0)
    return build_unet("tiny", SHAPE, 3).eval(), build_unet("tiny", SHAPE, 3).eval()


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
@pytest.mark.parametrize("steps", [20, 0], ids=["strided", "full"])
@pytest.mark.parametrize("guidance", [1.0, 3.0], ids=["plain", "guided"])
# 41: the paper's t = 41 is a step of the strided chain (0-based 40): "server evaluates t = cut" shows.
@pytest.mark.parametrize("cut", [0, 41, T])
def test_handoff_sampler_equals_the_plain_reference_loop(
    models: tuple[UNet2DModel, UNet2DModel], kind: str, steps: int, guidance: float, cut: int
) -> None:
    server, client = models
    chain = make_chain(SCHEDULE, kind, steps)  # type: ignore[arg-type]
    labels = torch.tensor(LABELS)
    x_cut, x0 = handoff_sample(as_denoiser(server, guidance), as_denoiser(client, guidance), chain, labels, 5, cut, SHAPE)
    ref_cut, ref_x0 = reference_sample(
        server, client, num_train_timesteps=T, kind=kind, num_inference_steps=steps, cut=cut, labels=LABELS, seed=5,
        guidance=guidance, image_shape=SHAPE,
    )
    assert relative_difference(x_cut, ref_cut) <= 1e-5
    assert relative_difference(x0, ref_x0) <= 1e-5
    assert torch.isfinite(x0).all()


def test_halves_in_batches_equal_the_reference(models: tuple[UNet2DModel, UNet2DModel]) -> None:
    """The server half in batches of two (as the server runs it), then the client half on the whole hand-off."""
    server, client = models
    chain = make_chain(SCHEDULE, "ddpm", 10)
    labels = torch.tensor(LABELS + [0])
    parts = [server_half(as_denoiser(server), chain, labels[i : i + 2], 9, 41, SHAPE, image_indices=range(i, min(i + 2, 5)))
             for i in (0, 2, 4)]
    x_cut = torch.cat(parts)
    x0 = client_half(as_denoiser(client), chain, x_cut, labels, 9, 41)
    ref_cut, ref_x0 = reference_sample(
        server, client, num_train_timesteps=T, kind="ddpm", num_inference_steps=10, cut=41, labels=LABELS + [0], seed=9,
        guidance=1.0, image_shape=SHAPE,
    )
    assert relative_difference(x_cut, ref_cut) <= 1e-5
    assert relative_difference(x0, ref_x0) <= 1e-5


def test_chain_slices_at_the_cut() -> None:
    chain = make_chain(SCHEDULE, "ddpm", 20)
    server, client = chain.split(41)
    assert list(chain.timesteps) == server + client and server[-1] == 45 and client[0] == 40
    assert chain.evaluations(41) == (len(server), len(client)) == (11, 9)
    assert chain.evaluations(0) == (20, 0) and chain.evaluations(T) == (0, 20)
    with pytest.raises(ValueError, match="num_inference_steps"):
        make_chain(SCHEDULE, "ddpm", T + 1)


def test_cut_edges_are_the_baselines(models: tuple[UNet2DModel, UNet2DModel]) -> None:
    server, client = as_denoiser(models[0]), as_denoiser(models[1])
    labels = torch.tensor([0, 1])
    chain = make_chain(SCHEDULE, "ddpm", 10)
    # ICM: the server runs nothing, the hand-off is x_T itself.
    x_cut, _ = handoff_sample(server, client, chain, labels, 3, T, SHAPE)
    assert torch.equal(x_cut, initial_noise(3, [0, 1], SHAPE))
    # GM: the client runs nothing, its output is the server's.
    x_cut, x0 = handoff_sample(server, client, chain, labels, 3, 0, SHAPE)
    assert torch.equal(x_cut, x0)


def test_seed_changes_the_chain(models: tuple[UNet2DModel, UNet2DModel]) -> None:
    server = as_denoiser(models[0])
    labels = torch.tensor([0])
    chain = make_chain(SCHEDULE, "ddpm", 5)
    assert not torch.allclose(server_half(server, chain, labels, 1, 0, SHAPE), server_half(server, chain, labels, 2, 0, SHAPE))
