"""``--ambient-loss x0``: the x0-parametrised ambient loss (Daras et al. 2024; common/diffusion.py::ambient_server_loss).

Three things could go wrong, and each has a test: the x0 target (the double Tweedie step), the minimiser (it must
stay E[eps | x_t], the eps loss's), and the trained model (it must be as good and use the label).
"""

from __future__ import annotations

import pytest
import torch
from split_support import CLASSES, CUT, Digits, fresh_model

from collafuse.common.config import ServerSettings
from collafuse.common.diffusion import (
    ambient_renoise,
    ambient_server_loss,
    ambient_x0_target,
    release,
    sample_server_times_c2,
)
from collafuse.common.models import as_denoiser
from collafuse.common.schedule import ScheduleConfig
from collafuse.common.train_loop import make_optimizer
from collafuse.server.protocols.ambient import AmbientSource, ReleaseRows, ambient_source

AB = ScheduleConfig().alphas_cumprod()


def test_the_x0_loss_is_the_eps_loss_reweighted_per_t() -> None:
    """Written out in eps terms, the x0 loss is min(1/c^2, max_weight) || c eps_hat - eps' ||^2 for any denoiser, and
    its x0 target is unbiased: E[target | x_0] = x_0. Both computed here from the definitions, not from the code's
    helpers."""
    gen = torch.Generator().manual_seed(0)
    n = 4096
    x0 = torch.rand((n, 1, 2, 2), generator=gen) * 2 - 1
    cuts = torch.full((n,), 200)
    x_cut = release(x0, list(range(n)), 200, AB)
    t = torch.randint(201, 1001, (n,), generator=gen)
    noise = torch.randn(x_cut.shape, generator=gen)

    def denoiser(x: torch.Tensor, tt: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return 0.6 * x - 0.1 * (tt.float() / 1000).view(-1, 1, 1, 1)

    ab_t, ab_c = AB[t].double().view(-1, 1, 1, 1), AB[200].double()
    c2 = (1 - ab_t / ab_c) / (1 - ab_t)
    x_t = (ab_t / ab_c).sqrt() * x_cut.double() + (1 - ab_t / ab_c).sqrt() * noise.double()
    eps_hat = denoiser(x_t.float(), t, cuts).double()
    for cap in (10.0, 3.0):
        expected = (torch.minimum(1 / c2, torch.tensor(cap)) * (c2.sqrt() * eps_hat - noise.double()) ** 2).mean()
        got = ambient_server_loss(denoiser, x_cut, cuts, cuts, AB, t=t, noise=noise, parametrisation="x0",
                                  max_weight=cap)
        assert abs(float(got) - float(expected)) < 1e-4 * float(expected), (cap, float(got), float(expected))
    # Unbiased: averaged over the release noise and eps', the target is x_0 (here one x_0, many draws).
    one = torch.full((20_000, 1, 1, 1), 0.3)
    seeds = list(range(20_000))
    rows = release(one, seeds, 200, AB)
    t_far = torch.full((20_000,), 400)
    x_t_far, _ = ambient_renoise(rows, torch.full((20_000,), 200), t_far, torch.randn(rows.shape, generator=gen), AB)
    target = ambient_x0_target(x_t_far, rows, torch.full((20_000,), 200), t_far, AB)
    assert abs(float(target.mean()) - 0.3) < 4 * float(target.std()) / 20_000**0.5


@pytest.mark.parametrize("t_value", [215, 260, 700])
def test_the_x0_loss_has_the_eps_losss_minimiser(t_value: int) -> None:
    """Gaussian data x_0 ~ N(mu, s^2), where E[eps | x_t] is known in closed form: among eps_hat = (1 + d) E[eps | x_t],
    both losses are smallest at d = 0 (the same draws for every d), just above the cut as well as far from it."""
    gen = torch.Generator().manual_seed(1)
    n, mu, s, cut = 400_000, 0.4, 0.5, 200
    x0 = mu + s * torch.randn((n, 1, 1, 1), generator=gen)
    ab_c = float(AB[cut])
    x_cut = ab_c**0.5 * x0 + (1 - ab_c) ** 0.5 * torch.randn(x0.shape, generator=gen)
    cuts, t = torch.full((n,), cut), torch.full((n,), t_value)
    noise = torch.randn(x0.shape, generator=gen)
    ab_t = float(AB[t_value])

    def posterior_eps(x: torch.Tensor) -> torch.Tensor:
        return (1 - ab_t) ** 0.5 * (x - ab_t**0.5 * mu) / (ab_t * s**2 + 1 - ab_t)

    for parametrisation in ("eps", "x0"):
        def loss(d: float, parametrisation: str = parametrisation) -> float:
            def denoiser(x: torch.Tensor, tt: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
                return (1 + d) * posterior_eps(x)
            return float(ambient_server_loss(denoiser, x_cut, cuts, cuts, AB, t=t, noise=noise,
                                             parametrisation=parametrisation))  # type: ignore[arg-type]
        best = loss(0.0)
        assert best < loss(-0.05) and best < loss(0.05), (parametrisation, t_value)


def test_the_setting_reaches_the_trainers_loss_and_refuses_pooled_weighting() -> None:
    settings = ServerSettings(ambient_loss="x0", ambient_max_weight=4.0, image_size=4, channels=1, classes=["a"])
    source = ambient_source(settings, None, torch.device("cpu"), 1)
    assert source.loss_kind == "x0" and source.max_weight == 4.0
    n = 8
    source.take(ReleaseRows(torch.randn(n, 1, 4, 4), torch.zeros(n, dtype=torch.long), torch.full((n,), 100),
                            ["c"] * n, n, 1, 0), True)
    batch = source.batch(torch.Generator().manual_seed(0))

    def denoiser(x: torch.Tensor, tt: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return 0.5 * x

    got = source.loss(denoiser, batch, torch.Generator())
    expected = ambient_server_loss(denoiser, batch.x_cut, batch.labels, batch.cuts, AB, t=batch.t, noise=batch.noise,
                                   parametrisation="x0", max_weight=4.0)
    plain = ambient_server_loss(denoiser, batch.x_cut, batch.labels, batch.cuts, AB, t=batch.t, noise=batch.noise)
    assert float(got) == float(expected) != float(plain)
    with pytest.raises(ValueError, match="count 1/c\\^2 twice"):
        ServerSettings(ambient_loss="x0", ambient_weighting="pooled")


def train_ambient(digits: Digits, loss: str, timesteps: str = "uniform", steps: int = 300) -> torch.nn.Module:
    """The server's model trained by its own training source on releases of the digits at cut 200 (three clients'
    shards together), batch 32, AdamW 2e-3: only the loss differs between the runs."""
    torch.manual_seed(0)
    train = torch.cat(digits.shards)
    x_cut = release(digits.x[train], [int(i) for i in train], CUT, AB)
    source = AmbientSource(None, AB, batch_size=32, label_dropout=0.0, null_label=len(CLASSES),
                           device=torch.device("cpu"), loss=loss, timesteps=timesteps)  # type: ignore[arg-type]
    source.take(ReleaseRows(x_cut, digits.y[train], torch.full((len(train),), CUT), ["c"] * len(train), len(train), 1, 0),
                True)
    model = fresh_model().train()
    optimizer = make_optimizer(model, 2e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        source.loss(as_denoiser(model), source.batch(gen), gen).backward()  # type: ignore[arg-type]
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def digits() -> Digits:
    torch.set_num_threads(1)
    return Digits()


@pytest.mark.slow  # about a minute; `make test-faults` (CI) runs it, benchmarks/cut_study.py --variants x0 c2 measures it
def test_a_server_trained_with_the_x0_loss_is_as_good_and_uses_the_label(digits: Digits) -> None:
    """The outcome: eps-MSE on held-out digits at t in (cut, 2 cut] (the zone the x0 loss lifts), with the true label
    and with a wrong one, for the eps loss, the x0 loss and the c^2 draw (each a mode a user can pick)."""
    results = {name: digits.eps_mse(train_ambient(digits, loss, timesteps))
               for name, loss, timesteps in (("eps", "eps", "uniform"), ("x0", "x0", "uniform"), ("c2", "eps", "c2"))}
    eps_true, _ = results["eps"]
    for name, (true_label, wrong_label) in results.items():
        assert true_label < 0.5, f"{name}: not trained (true-label MSE {true_label:.3f}; an untrained model is ~1)"
        assert true_label <= 1.25 * eps_true, (name, results)
        assert wrong_label > 1.2 * true_label, f"{name} is label-blind: {true_label:.4f} vs wrong {wrong_label:.4f}"


def test_the_c2_draw_combines_with_the_x0_loss() -> None:
    """Importance weights multiply the x0 loss too: drawn by c^2 and weighted, its mean equals the uniform draw's."""
    gen = torch.Generator().manual_seed(3)
    n = 200_000
    rows = torch.randn((1, 1, 2, 2), generator=gen).expand(n, -1, -1, -1)
    cuts = torch.full((n,), 300)

    def denoiser(x: torch.Tensor, tt: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return 0.8 * x * (tt.float() / 1000).view(-1, 1, 1, 1)

    uniform = float(ambient_server_loss(denoiser, rows, cuts, cuts, AB, generator=torch.Generator().manual_seed(4),
                                        parametrisation="x0"))
    t, w = sample_server_times_c2(cuts, AB, torch.Generator().manual_seed(5))
    weighted = float(ambient_server_loss(denoiser, rows, cuts, cuts, AB, t=t, weight=w, parametrisation="x0",
                                         generator=torch.Generator().manual_seed(6)))
    assert abs(weighted - uniform) < 0.03 * uniform, (weighted, uniform)
