"""``--local-timesteps linear`` (issue 19's scarce-regime accuracy): the client's local training draws t in [1, cut]
with P(t) proportional to t instead of uniformly.

Three things could go wrong, and each has a test: the draw (its distribution, computed here from the definition),
the setting's way into the trainer, and the trained model (it must finish hand-offs into the right digits, use the
label, and be better than uniform draws on the noisier steps it spends more of its training on).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from collafuse.client import trainer
from collafuse.client.trainer import train_local
from collafuse.common import diffusion
from collafuse.common.config import ClientSettings
from collafuse.common.diffusion import q_sample, sample_client_times
from collafuse.common.models import as_denoiser, load_model
from collafuse.common.sampling import client_half, make_chain
from collafuse.common.schedule import ScheduleConfig
from collafuse.evaluation.data.digits import digits_arrays
from collafuse.evaluation.metrics.classifier import PixelClassifier


@pytest.mark.parametrize("cut", [1, 7, 200])
def test_linear_draws_have_probability_t_over_the_triangle_number(cut: int) -> None:
    """P(t) = t / (cut (cut + 1) / 2) on {1, ..., cut}, from 400,000 draws (every frequency within 5 standard errors)."""
    n = 400_000
    t = sample_client_times(n, cut, torch.Generator().manual_seed(0), "linear")
    assert int(t.min()) >= 1 and int(t.max()) <= cut
    counts = np.bincount(t.numpy(), minlength=cut + 1)[1:]
    expected = np.arange(1, cut + 1) / (cut * (cut + 1) / 2)
    standard_error = np.sqrt(expected * (1 - expected) / n)
    assert np.all(np.abs(counts / n - expected) <= 5 * standard_error + 1e-12), (counts[:5] / n, expected[:5])
    # And the mean, the figure a slip (uniform draws, t - 1 weights) moves most: E[t] = (2 cut + 1) / 3.
    assert abs(float(t.double().mean()) - (2 * cut + 1) / 3) <= 5 * float(t.double().std()) / n**0.5 + 1e-9


def test_uniform_stays_the_default_and_unknown_draws_are_refused() -> None:
    t = sample_client_times(100_000, 200, torch.Generator().manual_seed(1))
    assert abs(float(t.double().mean()) - 100.5) < 0.6  # U{1..200}: mean 100.5, standard error 0.18
    assert ClientSettings().local_timesteps == "uniform"
    with pytest.raises(ValueError, match="uniform or linear"):
        sample_client_times(4, 200, None, "quadratic")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="local_timesteps"):
        ClientSettings(local_timesteps="quadratic")  # type: ignore[arg-type]


def test_the_setting_reaches_every_draw_of_local_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """train_local hands the client's --local-timesteps to each loss's draw of t (two steps, spied on)."""
    seen: list[str] = []
    real = diffusion.sample_client_times

    def spy(n: int, cut: int, generator: torch.Generator | None = None, timesteps: Any = "uniform") -> torch.Tensor:
        seen.append(timesteps)
        return real(n, cut, generator, timesteps)

    monkeypatch.setattr(diffusion, "sample_client_times", spy)
    images, labels = torch.rand((6, 1, 8, 8)) * 2 - 1, torch.tensor([0, 1, 0, 1, 0, 1])
    settings = ClientSettings(workdir=tmp_path, local_timesteps="linear", train_steps=2, batch_size=4, device="cpu")
    train_local(images=images, labels=labels, num_classes=2, image_shape=(1, 8, 8), schedule=ScheduleConfig(), cut=50,
                fingerprint="f", workdir=tmp_path, settings=settings, show_progress=False)
    assert seen == ["linear", "linear"]
    assert trainer.client_loss is diffusion.client_loss  # the trainer's loss is the one spied through


@pytest.mark.slow  # about a minute on 2 cores; `make test-faults` (CI) runs it, benchmarks/client_half.py measures it
def test_a_client_trained_with_linear_draws_finishes_handoffs_into_the_right_digits(tmp_path: Path) -> None:
    """The outcome for a user who picks --local-timesteps linear. Real digits (8x8, ten classes) train two local
    models at cut 200 with the same budget, one per draw. The linear one must finish x_200 of held-out digits into
    the right digit (a pixel classifier's reading; at least 0.85, or 0.05 under its reading of the real digits),
    denoise the noisier half of its steps (t in (100, 200]) better than the uniform one, and use the label there.
    Measured on 2 cores: 0.95 (real digits 0.97); eps MSE 0.192 linear, 0.208 uniform, 0.296 with wrong labels."""
    torch.set_num_threads(1)
    cut = 200
    images, targets = digits_arrays(8)
    order = np.random.default_rng(0).permutation(len(targets))
    held_out, private = order[:300], order[300:]
    x, y = torch.from_numpy(images), torch.from_numpy(targets)
    models = {}
    for draws in ("uniform", "linear"):
        settings = ClientSettings(workdir=tmp_path / draws, local_timesteps=draws, train_steps=400, batch_size=32,
                                  lr=2e-3, device="cpu", seed=0)
        done = train_local(images=x[private], labels=y[private], num_classes=10, image_shape=(1, 8, 8),
                           schedule=ScheduleConfig(), cut=cut, fingerprint="f", workdir=settings.workdir,
                           settings=settings, show_progress=False)
        assert done.model_dir is not None
        models[draws] = load_model(done.model_dir)[0].eval()

    schedule = ScheduleConfig()
    alphas = schedule.alphas_cumprod()
    g = torch.Generator().manual_seed(7)
    x0, labels = x[held_out], y[held_out]
    x_cut = q_sample(x0, torch.full((len(x0),), cut), torch.randn(x0.shape, generator=g), alphas)
    finished = client_half(as_denoiser(models["linear"]), make_chain(schedule, "ddpm", 50, cut), x_cut, labels,
                           seed=0, cut=cut)
    classifier = PixelClassifier().fit(images[private], [str(int(v)) for v in targets[private]])
    reads_real = float((classifier.predict(images[held_out]) == np.array([str(int(v)) for v in labels])).mean())
    accuracy = float((classifier.predict(finished.numpy()) == np.array([str(int(v)) for v in labels])).mean())
    assert accuracy >= min(0.85, reads_real - 0.05), f"finished hand-offs read as their digit {accuracy:.3f}"

    t = torch.randint(cut // 2 + 1, cut + 1, (len(x0),), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    wrong = (labels + 1 + torch.randint(9, labels.shape, generator=g)) % 10
    x_t = q_sample(x0, t, eps, alphas)

    def eps_mse(model: torch.nn.Module, y_in: torch.Tensor) -> float:
        with torch.no_grad():
            return float((as_denoiser(model)(x_t, t, y_in) - eps).pow(2).mean())  # type: ignore[arg-type]

    linear, uniform, wrong_label = eps_mse(models["linear"], labels), eps_mse(models["uniform"], labels), eps_mse(
        models["linear"], wrong)
    assert linear < uniform, f"linear draws did not learn the noisier steps better: {linear:.4f} vs {uniform:.4f}"
    assert wrong_label > 1.1 * linear, f"label-blind: true-label MSE {linear:.4f}, wrong {wrong_label:.4f}"
