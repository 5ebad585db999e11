"""``--ambient-timesteps c2``: t above a release's cut drawn in proportion to c(t)^2, importance-weighted back to the
same objective as the uniform draw (common/diffusion.py::sample_server_times_c2)."""

from __future__ import annotations

import torch

from collafuse.common.config import ServerSettings
from collafuse.common.diffusion import (
    ambient_c2,
    ambient_pooled_weights,
    ambient_server_loss,
    sample_server_times,
    sample_server_times_c2,
)
from collafuse.common.schedule import ScheduleConfig
from collafuse.server.protocols.ambient import AmbientSource, ReleaseRows, ambient_source

AB = ScheduleConfig().alphas_cumprod()
T = 1000


def test_the_c2_draw_has_the_uniform_draws_expectation_exactly() -> None:
    """sum_t p(t) w(t) L(t) == mean_t L(t) for any per-t loss L: computed over every t, from the draw's own
    frequencies and weights (a large draw), against the uniform mean."""
    cut = 200
    steps, c2 = ambient_c2(cut, AB)
    # c^2 written out independently: 0.012 at t = 201 and ~0.49 at t = 260 for cut 200 (the figures).
    ab = AB.double()
    assert abs(float((1 - ab[201] / ab[200]) / (1 - ab[201])) - float(c2[0])) < 1e-12
    assert 0.010 < float(c2[0]) < 0.014 and 0.45 < float(c2[59]) < 0.53
    loss = torch.rand(len(steps), generator=torch.Generator().manual_seed(0), dtype=torch.float64)  # any L(t)
    t, w = sample_server_times_c2(torch.full((400_000,), cut), AB, torch.Generator().manual_seed(1))
    assert bool((t > cut).all()) and bool((t <= T).all())
    estimate = float((w * loss[t - cut - 1]).mean())
    assert abs(estimate - float(loss.mean())) < 0.01 * float(loss.mean())
    # The weight undoes the draw's density exactly: p(t) w(t) = 1 / (T - cut) at every t.
    p = c2 / c2.sum()
    first = torch.nonzero(t == cut + 1).flatten()[:1]
    assert abs(float(p[0] * w[first]) - 1 / (T - cut)) < 1e-12
    # Far fewer draws land just above the cut than uniformly (the point of the flag).
    near = float((t <= cut + 20).double().mean())
    uniform_near = float((sample_server_times(torch.full((400_000,), cut), T, torch.Generator().manual_seed(2))
                          <= cut + 20).double().mean())
    assert near < 0.2 * uniform_near


def test_the_weighted_c2_loss_equals_the_uniform_loss_in_expectation_for_a_model() -> None:
    """The whole ambient loss with a fixed denoiser: its mean over many c2-drawn batches equals the uniform one's."""
    gen = torch.Generator().manual_seed(3)
    x_cut = torch.randn((1, 1, 4, 4), generator=gen)

    def denoiser(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return 0.8 * x * (t.float() / T).view(-1, 1, 1, 1)

    n = 200_000
    cuts = torch.full((n,), 300)
    rows = x_cut.expand(n, -1, -1, -1)
    labels = torch.zeros(n, dtype=torch.long)
    uniform = float(ambient_server_loss(denoiser, rows, labels, cuts, AB, generator=torch.Generator().manual_seed(4)))
    t, w = sample_server_times_c2(cuts, AB, torch.Generator().manual_seed(5))
    weighted = float(ambient_server_loss(denoiser, rows, labels, cuts, AB, t=t, weight=w,
                                         generator=torch.Generator().manual_seed(6)))
    assert abs(weighted - uniform) < 0.02 * uniform, (weighted, uniform)


def test_the_servers_setting_reaches_its_batches() -> None:
    """--ambient-timesteps c2: the trainer's source draws t by c^2 and carries the importance weights (times the
    pooled ones when several cuts are held); uniform keeps the plain loss (no weights)."""
    settings = ServerSettings(ambient_timesteps="c2", image_size=4, channels=1, classes=["a"])
    assert ambient_source(settings, None, torch.device("cpu"), 1).timesteps == "c2"
    n = 12

    def source(timesteps: str, cuts: list[int], weighting: str = "standard") -> AmbientSource:
        out = AmbientSource(None, AB, batch_size=256, label_dropout=0.0, null_label=10, device=torch.device("cpu"),
                            weighting=weighting, timesteps=timesteps)  # type: ignore[arg-type]
        out.take(ReleaseRows(torch.randn(n, 1, 4, 4), torch.zeros(n, dtype=torch.long), torch.tensor(cuts),
                             ["c"] * n, n, 1, 0), True)
        return out

    assert source("uniform", [200] * n).batch(torch.Generator().manual_seed(0)).weight is None
    batch = source("c2", [200] * n).batch(torch.Generator().manual_seed(0))
    _, c2 = ambient_c2(200, AB)
    assert batch.weight is not None
    assert torch.allclose(batch.weight.double(), c2.mean() / c2[batch.t - 201], rtol=1e-6)
    mixed = source("c2", [100, 500] * (n // 2), "pooled").batch(torch.Generator().manual_seed(0))
    pooled = ambient_pooled_weights(mixed.cuts, mixed.t, torch.tensor([100, 500]), AB, 10.0)
    importance = torch.stack([ambient_c2(int(c), AB)[1].mean() / ambient_c2(int(c), AB)[1][int(t) - int(c) - 1]
                              for c, t in zip(mixed.cuts, mixed.t)])
    assert mixed.weight is not None and torch.allclose(mixed.weight.double(), pooled * importance, rtol=1e-5)
