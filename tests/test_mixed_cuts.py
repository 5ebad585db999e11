"""The ambient loss with clients at different cuts (docs/design.md §2, "mixed cuts"), and the pooled weighting.

The toy: two equal-size clients with 1-D Gaussian data, A ~ N(-1.5, 0.25^2) at cut 0 and
B ~ N(+1.5, 0.25^2) at cut 250, looked at t = 300 near x_t = 0. The pooled posterior E[eps | x_t]
there is +0.011; the unweighted ambient loss learns +0.359, because it mixes the clients' posteriors
by n_i c_i(t)^2 / (T - cut_i): 1/1000 for A against 0.40/750 for B, 1.86 to 1 in favour of A.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from collafuse.common.diffusion import ambient_pooled_weights, ambient_renoise, ambient_server_loss, q_sample
from collafuse.common.schedule import ScheduleConfig
from collafuse.common.settings import ConfigError, parse_settings
from collafuse.deploy import sim
from collafuse.deploy.sim import SimSettings, client_settings, server_command, server_settings
from collafuse.server.cli import build_parser as server_parser
from collafuse.server.protocols.ambient import AmbientSource, ReleaseRows

AB = ScheduleConfig().alphas_cumprod()
T = 1000
T_TOY, X_TOY = 300, -0.02
CLIENTS = {"A": (0, -1.5), "B": (250, 1.5)}  # name: (cut, data mean)
SIGMA2 = 0.25**2


def c2(cut: int, t: int) -> float:
    return (1 - AB[t].item() / AB[cut].item()) / (1 - AB[t].item())


def gaussian_posterior(mu: float, x: float, t: int) -> tuple[float, float]:
    """(E[eps | x_t = x], p(x_t = x)) for x0 ~ N(mu, SIGMA2)."""
    ab = AB[t].item()
    var = ab * SIGMA2 + 1 - ab
    return math.sqrt(1 - ab) * (x - math.sqrt(ab) * mu) / var, math.exp(-((x - math.sqrt(ab) * mu) ** 2) / (2 * var)) / math.sqrt(var)


def mix(weights: dict[str, float], x: float = X_TOY, t: int = T_TOY) -> float:
    """The per-t minimiser: the clients' posteriors mixed by weight_i * p_i(x)."""
    parts = {name: gaussian_posterior(mu, x, t) for name, (_, mu) in CLIENTS.items()}
    total = sum(weights[n] * parts[n][1] for n in parts)
    return sum(weights[n] * parts[n][1] * parts[n][0] for n in parts) / total


POOLED = mix({"A": 1.0, "B": 1.0})
# Unweighted ambient loss: n_i c_i(t)^2 / (T - cut_i), n_A = n_B.
STANDARD = mix({n: c2(cut, T_TOY) / (T - cut) for n, (cut, _) in CLIENTS.items()})


def test_toy_closed_form_matches_the_reported_numbers() -> None:
    assert POOLED == pytest.approx(0.011, abs=0.002)
    assert STANDARD == pytest.approx(0.359, abs=0.003)


def scalar_minimiser(weighting: str, max_weight: float = 10.0, rows: int = 1_400_000) -> float:
    """The minimiser over a constant predictor of the real ``ambient_server_loss`` on the toy's rows at
    t = 300 whose x_t lies within 0.05 of X_TOY.

    The rows are what uniform sampling of releases, then t ~ U(cut, T] per release, puts at t = 300: a share
    1 / (T - cut) of each client's (equal) releases. The loss is quadratic in the constant theta, so two
    gradients give its minimiser exactly: theta* = -g(0) / (g(1) - g(0)).
    """
    gen = torch.Generator().manual_seed(0)
    x_cut, cuts = [], []
    for cut, mu in CLIENTS.values():
        n = round(rows / (T - cut) * 500)
        x0 = mu + math.sqrt(SIGMA2) * torch.randn(n, 1, generator=gen, dtype=torch.float64)
        x_cut.append(q_sample(x0, torch.full((n,), cut), torch.randn(n, 1, generator=gen, dtype=torch.float64), AB))
        cuts.append(torch.full((n,), cut))
    xc, cut_t = torch.cat(x_cut), torch.cat(cuts)
    t = torch.full_like(cut_t, T_TOY)
    noise = torch.randn(xc.shape, generator=gen, dtype=torch.float64)
    x_t, _ = ambient_renoise(xc, cut_t, t, noise, AB)
    keep = (x_t[:, 0] - X_TOY).abs() < 0.05
    xc, cut_t, t, noise = xc[keep], cut_t[keep], t[keep], noise[keep]
    weight = None
    if weighting == "pooled":
        weight = ambient_pooled_weights(cut_t, t, torch.tensor([0, 250]), AB, max_weight)

    def gradient(theta: float) -> float:
        param = torch.tensor(theta, dtype=torch.float64, requires_grad=True)
        loss = ambient_server_loss(lambda x, tt, y: param.expand_as(x), xc, torch.zeros(len(t), dtype=torch.long),
                                   cut_t, AB, t=t, noise=noise, weight=weight)
        (grad,) = torch.autograd.grad(loss, param)
        return float(grad)

    g0, g1 = gradient(0.0), gradient(1.0)
    return -g0 / (g1 - g0)


def test_unweighted_ambient_loss_learns_the_cut_skewed_mix() -> None:
    value = scalar_minimiser("standard")
    assert value == pytest.approx(STANDARD, abs=0.04)
    assert abs(value - POOLED) > 0.25


@pytest.mark.parametrize("max_weight", [1.0, 10.0, math.inf])
def test_pooled_weights_restore_the_pooled_posterior(max_weight: float) -> None:
    # Any cap scales all weights at one t alike: the per-t minimiser does not move.
    assert scalar_minimiser("pooled", max_weight) == pytest.approx(POOLED, abs=0.04)


def test_weights_are_one_with_equal_cuts_or_one_cut_below_t() -> None:
    t = torch.arange(201, 1001)
    same = ambient_pooled_weights(torch.full_like(t, 200), t, torch.tensor([200]), AB)
    assert torch.allclose(same, torch.ones_like(same))
    # Cuts {100, 200, 500}: at 100 < t <= 200 only the cut-100 client is below t.
    t = torch.arange(101, 201)
    alone = ambient_pooled_weights(torch.full_like(t, 100), t, torch.tensor([100, 200, 500]), AB)
    assert torch.allclose(alone, torch.ones_like(alone))


def test_weights_follow_the_ratio_and_respect_the_cap() -> None:
    levels = torch.tensor([100, 200, 500])
    t = torch.arange(501, 1001).repeat(3)
    cuts = levels.repeat_interleave(500)
    for cap in (1.0, 10.0, 1e9):
        w = ambient_pooled_weights(cuts, t, levels, AB, cap)
        assert float(w.max()) <= cap * (1 + 1e-9) and bool((w > 0).all())
        # At each t the weights are proportional to (T - cut) / c^2.
        by_t = w.view(3, 500)
        raw = torch.stack([torch.tensor([(T - z) / c2(z, int(tt)) for tt in range(501, 1001)], dtype=torch.float64)
                           for z in (100, 200, 500)])
        assert torch.allclose(by_t / by_t[0], raw / raw[0], rtol=1e-9)
    # Far above every cut c ~ 1 and r ~ T - cut: the highest cut (densest t draws) keeps weight 1, the others
    # are raised by (T - cut) / (T - 500).
    w = ambient_pooled_weights(torch.tensor([100, 500]), torch.tensor([1000, 1000]), levels, AB, 1e9)
    assert float(w[1]) == pytest.approx(1.0)
    assert float(w[0]) == pytest.approx((T - 100) / (T - 500), rel=0.01)
    with pytest.raises(ValueError, match="below 1"):
        ambient_pooled_weights(cuts, t, levels, AB, 0.5)
    with pytest.raises(ValueError, match="t > cut"):
        ambient_pooled_weights(torch.tensor([300]), torch.tensor([300]), levels, AB)


def test_weighted_loss_with_unit_weights_is_the_plain_loss() -> None:
    gen = torch.Generator().manual_seed(3)
    x_cut = torch.randn(8, 1, 4, 4, generator=gen)
    cuts = torch.tensor([100, 200] * 4)
    t = cuts + 50
    noise = torch.randn(8, 1, 4, 4, generator=gen)
    net = torch.nn.Conv2d(1, 1, 3, padding=1)
    args = (lambda x, tt, y: net(x), x_cut, torch.zeros(8, dtype=torch.long), cuts, AB)
    plain = ambient_server_loss(*args, t=t, noise=noise)
    weighted = ambient_server_loss(*args, t=t, noise=noise, weight=torch.ones(8, dtype=torch.float64))
    assert weighted.item() == pytest.approx(plain.item(), rel=1e-6)


def _source(weighting: str, cuts: list[int]) -> AmbientSource:
    source = AmbientSource(None, AB, batch_size=64, label_dropout=0.0, null_label=10, device=torch.device("cpu"),
                           weighting=weighting, max_weight=5.0)  # type: ignore[arg-type]
    n = len(cuts)
    rows = ReleaseRows(torch.randn(n, 1, 4, 4), torch.zeros(n, dtype=torch.long), torch.tensor(cuts),
                       [f"client-{c}" for c in cuts], n, 1, 0)
    source.take(rows, True)
    return source


def test_source_weights_only_mixed_cuts_under_pooled() -> None:
    gen = torch.Generator().manual_seed(0)
    assert _source("standard", [100, 200, 500] * 4).batch(gen).weight is None
    assert _source("pooled", [200] * 12).batch(gen).weight is None  # one cut: the plain loss, bit for bit
    source = _source("pooled", [100, 200, 500] * 4)
    batch = source.batch(gen)
    assert batch.weight is not None and batch.weight.shape == (64,)
    assert float(batch.weight.max()) <= 5.0 + 1e-6
    expected = ambient_pooled_weights(batch.cuts, batch.t, torch.tensor([100, 200, 500]), AB, 5.0).float()
    assert torch.equal(batch.weight, expected)
    # The source's loss uses the batch's weights.
    net = torch.nn.Conv2d(1, 1, 3, padding=1)
    denoiser = lambda x, tt, y: net(x)
    weighted = ambient_server_loss(denoiser, batch.x_cut, batch.labels, batch.cuts, AB, t=batch.t, noise=batch.noise,
                                   weight=batch.weight)
    plain = ambient_server_loss(denoiser, batch.x_cut, batch.labels, batch.cuts, AB, t=batch.t, noise=batch.noise)
    assert source.loss(denoiser, batch, gen).item() == pytest.approx(weighted.item(), rel=1e-6)
    assert weighted.item() != pytest.approx(plain.item(), rel=1e-3)
    assert "pooled weighting" in source.describe()


def test_sim_gives_each_client_its_cut_and_the_server_its_weighting(tmp_path: Path) -> None:
    argv = ["--clients", "3", "--cuts", "100", "200", "500", "--ambient-weighting", "pooled", "--ambient-max-weight",
            "4", "--out", str(tmp_path)]
    settings = parse_settings(SimSettings, argv, prog="collafuse-sim")
    assert [client_settings(settings, k, tmp_path / "shard", 4321).cut for k in range(3)] == [100, 200, 500]
    server = server_settings(settings, 4321, [str(i) for i in range(10)])
    assert server.ambient_weighting == "pooled" and server.ambient_max_weight == 4
    parser, flags = server_parser()
    assert flags.load(parser.parse_args(server_command(settings, 4321, [str(i) for i in range(10)]).args)) == server
    with pytest.raises(ConfigError, match="one per client"):
        sim.run(settings.model_copy(update={"cuts": [100, 200]}))
