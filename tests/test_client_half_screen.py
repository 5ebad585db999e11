"""``client_half.py``'s screen-only settings: each patch acts during its one training, as named, and is undone after."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import client_half

from collafuse.client import trainer
from collafuse.common import diffusion, train_loop
from collafuse.common.models import build_unet
from collafuse.common.schedule import ScheduleConfig

ORIGINAL = train_loop.make_optimizer, diffusion.sample_client_times


def _model() -> torch.nn.Module:
    return build_unet("tiny", (1, 8, 8), 10)


def test_the_optimizer_patch_sets_beta2_and_the_embedding_rate_then_goes() -> None:
    model = _model()
    with client_half.screen_patches(client_half.SETTINGS["emb10"]):
        optimizer = train_loop.make_optimizer(model, 1e-3)
        assert diffusion.sample_client_times is ORIGINAL[1], "an optimizer setting must not touch the t-draw"
    by_rate = {group["lr"]: {id(p) for p in group["params"]} for group in optimizer.param_groups}
    assert sorted(by_rate) == pytest.approx([1e-3, 1e-2])
    embedding = {id(p) for n, p in model.named_parameters() if n.startswith("class_embedding.")}
    assert embedding and by_rate[max(by_rate)] == embedding, "only the class embedding learns 10x faster"
    assert set().union(*by_rate.values()) == {id(p) for p in model.parameters()}, "every parameter is trained"
    with client_half.screen_patches(client_half.SETTINGS["beta2"]):
        assert train_loop.make_optimizer(_model(), 1e-3).param_groups[0]["betas"] == (0.9, 0.99)
    assert (train_loop.make_optimizer, diffusion.sample_client_times) == ORIGINAL


def _draws(name: str, calls: int) -> list[torch.Tensor]:
    """The t of each call of the trainer's client loss under the patch (the denoiser records them)."""
    seen: list[torch.Tensor] = []

    def denoiser(x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        seen.append(t.clone())
        return torch.zeros_like(x)

    alphas_cumprod = ScheduleConfig().alphas_cumprod()
    generator = torch.Generator().manual_seed(0)
    with client_half.screen_patches(client_half.SETTINGS[name]):
        for _ in range(calls):
            trainer.client_loss(denoiser, torch.zeros(4000, 1, 2, 2), torch.zeros(4000, dtype=torch.long), 200,
                                alphas_cumprod, generator)
    assert (train_loop.make_optimizer, diffusion.sample_client_times) == ORIGINAL
    return seen


def test_the_curriculum_draws_linearly_for_half_the_steps_then_uniformly() -> None:
    steps = client_half.SETTINGS["tcurve"].steps
    draws = _draws("tcurve", steps // 2 + 1)
    # Linear: mean (2 cut + 1) / 3 = 133.7; uniform: (cut + 1) / 2 = 100.5 (standard error about 0.9 for 4,000).
    assert float(draws[0].double().mean()) == pytest.approx(133.7, abs=4)
    assert float(draws[steps // 2 - 1].double().mean()) == pytest.approx(133.7, abs=4)
    assert float(draws[steps // 2].double().mean()) == pytest.approx(100.5, abs=4)


def test_the_mixture_draws_half_of_each_batch_each_way() -> None:
    (draws,) = _draws("tmix", 1)
    assert float(draws[:2000].double().mean()) == pytest.approx(133.7, abs=4)
    assert float(draws[2000:].double().mean()) == pytest.approx(100.5, abs=4)


def test_the_patches_are_undone_when_training_fails() -> None:
    with pytest.raises(RuntimeError), client_half.screen_patches(client_half.SETTINGS["tmix"]):
        assert diffusion.sample_client_times is not ORIGINAL[1]
        raise RuntimeError("training failed")
    assert (train_loop.make_optimizer, diffusion.sample_client_times) == ORIGINAL
    with client_half.screen_patches(client_half.BASE):
        assert (train_loop.make_optimizer, diffusion.sample_client_times) == ORIGINAL, "the base setting patches nothing"
