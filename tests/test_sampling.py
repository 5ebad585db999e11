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
@pytest.mark.parametrize("guidance", [1.0, 3.0], ids=["plain", "guided"])
# 41: the paper's t = 41 is on the unshifted strided chain (0-based 40); 43 is not: the grid shifts by 2.
# The full chain (0 steps, stride 1) never shifts.
@pytest.mark.parametrize("steps,cut", [(20, 0), (20, 41), (20, 43), (20, T), (0, 0), (0, 41), (0, T)])
def test_handoff_sampler_equals_the_plain_reference_loop(
    models: tuple[UNet2DModel, UNet2DModel], kind: str, steps: int, guidance: float, cut: int
) -> None:
    server, client = models
    chain = make_chain(SCHEDULE, kind, steps, cut)  # type: ignore[arg-type]
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
    chain = make_chain(SCHEDULE, "ddpm", 10, 41)
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
    chain = make_chain(SCHEDULE, "ddpm", 20, 41)
    server, client = chain.split(41)
    assert list(chain.timesteps) == server + client and server[-1] == 45 and client[0] == 40
    assert chain.evaluations(41) == (len(server), len(client)) == (11, 9)
    for cut in (0, T):
        assert make_chain(SCHEDULE, "ddpm", 20, cut).timesteps == tuple(range(95, -1, -5))  # no hand-off: no shift
    assert make_chain(SCHEDULE, "ddpm", 20, 0).evaluations(0) == (20, 0)
    assert make_chain(SCHEDULE, "ddpm", 20, T).evaluations(T) == (0, 20)
    with pytest.raises(ValueError, match="num_inference_steps"):
        make_chain(SCHEDULE, "ddpm", T + 1, 41)


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
@pytest.mark.parametrize("steps,cut", [(20, 43), (20, 1), (7, 50), (50, 99), (3, 60), (0, 37)])
def test_the_hand_off_is_exactly_at_the_cut_and_every_step_keeps_its_stride(kind: str, steps: int, cut: int) -> None:
    chain = make_chain(SCHEDULE, kind, steps, cut)  # type: ignore[arg-type]
    server, client = chain.split(cut)
    stride = T // (steps or T)
    assert client[0] == cut - 1, "the client's first step starts at the paper's t = cut"
    assert all(a - b == stride for a, b in zip(chain.timesteps, chain.timesteps[1:], strict=False))
    # The server's last step lands on the paper's t = cut (none when the top of the grid is the cut: x_T).
    assert server[-1] - stride == cut - 1 if server else chain.timesteps[0] == cut - 1
    assert len(chain.timesteps) == (steps or T)


def test_the_hand_off_row_has_exactly_the_cuts_noise_level() -> None:
    """DDIM (eta 0) with an oracle denoiser that knows x0 keeps x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps on every
    grid level: the server's x_hat_cut must then be x0 noised to exactly the paper's alpha_bar at the cut (before
    the shift the grid handed off at t = 181 for cut 200 with 50 steps: alpha_bar 0.710 instead of 0.659)."""
    schedule, cut, shape = ScheduleConfig(), 200, (1, 4, 4)
    alphas = schedule.alphas_cumprod()  # paper's 1-based t
    x0 = torch.rand((2, *shape), generator=torch.Generator().manual_seed(1)) * 2 - 1

    def oracle(x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        ab = alphas[t].float().view(-1, 1, 1, 1)
        return (x - ab.sqrt() * x0) / (1 - ab).sqrt()

    chain = make_chain(schedule, "ddim", 50, cut)
    x_cut = server_half(oracle, chain, torch.tensor([0, 1]), 4, cut, shape)
    top = chain.timesteps[0] + 1  # x_T is taken to be at the first grid level, as the scheduler does
    eps = (initial_noise(4, [0, 1], shape) - alphas[top].float().sqrt() * x0) / (1 - alphas[top].float()).sqrt()
    expected = alphas[cut].float().sqrt() * x0 + (1 - alphas[cut].float()).sqrt() * eps
    torch.testing.assert_close(x_cut, expected, rtol=1e-4, atol=1e-4)


def test_cut_edges_are_the_baselines(models: tuple[UNet2DModel, UNet2DModel]) -> None:
    server, client = as_denoiser(models[0]), as_denoiser(models[1])
    labels = torch.tensor([0, 1])
    chain = make_chain(SCHEDULE, "ddpm", 10, 0)  # no hand-off at either edge: one chain serves both
    # ICM: the server runs nothing, the hand-off is x_T itself.
    x_cut, _ = handoff_sample(server, client, chain, labels, 3, T, SHAPE)
    assert torch.equal(x_cut, initial_noise(3, [0, 1], SHAPE))
    # GM: the client runs nothing, its output is the server's.
    x_cut, x0 = handoff_sample(server, client, chain, labels, 3, 0, SHAPE)
    assert torch.equal(x_cut, x0)


def test_seed_changes_the_chain(models: tuple[UNet2DModel, UNet2DModel]) -> None:
    server = as_denoiser(models[0])
    labels = torch.tensor([0])
    chain = make_chain(SCHEDULE, "ddpm", 5, 0)
    assert not torch.allclose(server_half(server, chain, labels, 1, 0, SHAPE), server_half(server, chain, labels, 2, 0, SHAPE))
