"""The client's epsilon against an independent computation with Google's dp-accounting, for both protocols.

The relation is replace-one with labels fixed (client/dp.py): neighbouring data sets differ in the pixels of one
image. dp-accounting's PLD accountant under REPLACE_ONE takes a Gaussian mechanism's noise multiplier as noise std
over the *radius* each record's output lies in (two records are up to twice that apart), so here every radius is
written out from the mechanism itself, not taken from client/dp.py:

- an image in [-1, 1]^d lies within sqrt(d) of 0, so sqrt(ab) x_0 within sqrt(ab d): noise sqrt(1 - ab);
- a clipped gradient row lies within C of 0; given x_t it also moves by at most (2/d) sqrt(ab / (1 - ab)) per unit
  of x_0, i.e. within (2/d) sqrt(ab / (1 - ab)) sqrt(d) of its value at x_0 = 0: noise sigma C.

Split: the images each step actually sent, and their t, are read off the client as it draws them; each image's
sends are composed in dp-accounting (x_t and gradient as two Gaussian events per send), and the client's epsilon
must be the worst image's. No subsampling amplification is used on either side (client/dp.py says why).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import dp_accounting as dpa
import pytest
import torch
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

from collafuse.client.ledger import Ledger, ReleaseLevel, SentItem
from collafuse.client.privacy_ledger import privacy_report
from collafuse.client.protocols import split as client_split
from collafuse.client.protocols.split import SplitClient, SplitOptions
from collafuse.common.codec import decode, encode
from collafuse.common.config import ClientSettings
from collafuse.common.schedule import ScheduleConfig
from collafuse.v1 import collafuse_pb2

DELTA = 1e-5
SCHEDULE = ScheduleConfig()  # T = 1000, linear betas 1e-4..0.02
AB = SCHEDULE.alphas_cumprod().double()
REPLACE = dpa.NeighboringRelation.REPLACE_ONE


def _pld_epsilon(noise_over_radius: list[float]) -> float:
    accountant = PLDAccountant(REPLACE, value_discretization_interval=1e-3)
    accountant.compose(dpa.ComposedDpEvent([dpa.GaussianDpEvent(s) for s in noise_over_radius]))
    return float(accountant.get_epsilon(DELTA))


def test_ambient_release_epsilon_is_dp_accountings(tmp_path: Path) -> None:
    """Releases at cuts 100 / 200 / 500 / 900 of 8x8 images: the client's epsilon per release (replace-one)."""
    d = 64
    with Ledger(tmp_path / "work") as ledger:
        for k, cut in enumerate((100, 200, 500, 900)):
            ledger.record_sent([SentItem(f"k{k}", 0, k, "0" * 64)], ReleaseLevel.of(SCHEDULE, cut), "ambient", "srv")
        report = privacy_report(ledger, DELTA, (1, 8, 8))
    got = {entry["cut"]: entry["epsilon_per_release"] for entry in report["ambient"]}
    for cut in (100, 200, 500, 900):
        ab = float(AB[cut])
        radius = math.sqrt(ab * d)
        exact = dpa.get_epsilon_gaussian(math.sqrt(1 - ab) / (2 * radius), DELTA)  # two images: 2 radii apart
        assert got[cut] == pytest.approx(exact, rel=1e-6), cut
        if cut >= 500:  # small enough for the PLD accountant's grid
            assert got[cut] == pytest.approx(_pld_epsilon([math.sqrt(1 - ab) / radius]), rel=2e-3), cut
        # Not the old figure, which priced the release against the blank image only (add/remove, half the distance).
        assert got[cut] > 1.5 * dpa.get_epsilon_gaussian(math.sqrt(1 - ab) / radius, DELTA)
    assert [round(got[c]) for c in (100, 200, 500)] == [1315, 341, 30]


class Recorder:
    """Watches ``draw_step``: every step the client draws, in order (the k-th forward sends the k-th draw)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.steps: list[Any] = []
        original = client_split.draw_step

        def draw(planner: Any) -> Any:
            step = original(planner)
            if step is not None:
                self.steps.append(step)
            return step

        monkeypatch.setattr(client_split, "draw_step", draw)


class EchoServer:
    """Answers every forward with eps_hat = x_t / sqrt(1 - ab) (a far-off prediction: large rows, all clipped)."""

    def __init__(self) -> None:
        self.forwards: list[collafuse_pb2.SplitForwardRequest] = []

    def split_forward(self, request: collafuse_pb2.SplitForwardRequest) -> collafuse_pb2.SplitForwardReply:
        self.forwards.append(request)
        x_t = decode(request.x_t)
        ab = AB[torch.tensor(list(request.t))].float().view(-1, 1, 1, 1)
        return collafuse_pb2.SplitForwardReply(step_id=f"s{len(self.forwards)}", eps_hat=encode(x_t / (1 - ab).sqrt() + 3))

    def split_backward(self, request: collafuse_pb2.SplitBackwardRequest) -> collafuse_pb2.SplitBackwardReply:
        return collafuse_pb2.SplitBackwardReply(server_step=len(self.forwards), applied=True)


def _per_image(steps: list[Any], d: int, clip: float, sigma: float, bound: float = 1.0) -> dict[int, list[float]]:
    """Per image, the noise-over-radius of each Gaussian event its sends made: x_t, then the gradient row. The data
    lie in [-bound, bound]^d: within bound sqrt(d) of 0."""
    per_image: dict[int, list[float]] = {}
    for step in steps:
        for i, t in zip(step.index.tolist(), step.t.tolist()):
            ab = float(AB[t])
            x_radius = bound * math.sqrt(ab * d)
            g_radius = min(clip, 2 / d * math.sqrt(ab / (1 - ab)) * bound * math.sqrt(d))
            per_image.setdefault(i, []).extend([math.sqrt(1 - ab) / x_radius, sigma * clip / g_radius])
    return per_image


def _independent_split_epsilon(steps: list[Any], d: int, clip: float, sigma: float,
                               bound: float = 1.0) -> tuple[float, float]:
    """(PLD epsilon of the worst image, RDP epsilon of the same image) from the sends alone."""
    worst = max(_per_image(steps, d, clip, sigma, bound).values(), key=lambda s: sum(v**-2 for v in s))
    rdp = RdpAccountant(neighboring_relation=dpa.NeighboringRelation.ADD_OR_REMOVE_ONE)  # N(0) vs N(distance)
    rdp.compose(dpa.ComposedDpEvent([dpa.GaussianDpEvent(s / 2) for s in worst]))
    return _pld_epsilon(worst), float(rdp.get_epsilon(DELTA))


def test_split_epsilon_where_the_clipping_bound_binds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Cut 100, C = 0.1, sigma = 0.5, 8x8: below t ~ 450 the gradient's bound is 2C (any two clipped rows, the zero
    image's included, are up to 2C apart), and
    epsilon is in the thousands (too large for the PLD grid): dp-accounting's exact Gaussian epsilon of the worst
    image's composed sends, each part's sensitivity written out here."""
    recorder = Recorder(monkeypatch)
    images = torch.rand((12, 1, 8, 8), generator=torch.Generator().manual_seed(2)) * 2 - 1
    options = SplitOptions(batch_size=4, steps=20, dp_clip=0.1, dp_noise_multiplier=0.5, max_image_exposure=math.inf)
    with Ledger(tmp_path / "work") as ledger:
        report = SplitClient(options).contribute(EchoServer(), ledger, client_id="c0", images=images,  # type: ignore[arg-type]
                                                 labels=[0] * 12, paths=None, cut=100, schedule=SCHEDULE, server="srv")
    per_image = _per_image(recorder.steps, 64, 0.1, 0.5)
    gradient = [v for s in per_image.values() for v in s[1::2]]
    assert any(v == pytest.approx(0.5) for v in gradient)  # sigma C / C: the 2C bound binds (t below ~430)
    mu = math.sqrt(max(sum(v**-2 for v in s) for s in per_image.values())) * 2  # radii -> distances
    assert report.epsilon == pytest.approx(dpa.get_epsilon_gaussian(1 / mu, DELTA), rel=1e-6)


def test_split_epsilon_is_dp_accountings_for_the_sends_made(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The issue's run: 12 images at 16x16, cut 900, sigma = 1, C = 1, 4 a step, 40 steps (caps lifted so that the
    run is the same). The old accountant said 17.4 (Poisson rate 1/3, add/remove, gradient sensitivity C); fixed-size
    draws under replace-one with 2C give 123 on dp-accounting's sampled-without-replacement RDP. Per image, over the
    sends actually made, with the gradient bounded by how far it can move given x_t: 7.5 to 8."""
    recorder = Recorder(monkeypatch)
    server = EchoServer()
    images = torch.rand((12, 1, 16, 16), generator=torch.Generator().manual_seed(0)) * 2 - 1
    options = SplitOptions(batch_size=4, steps=40, dp_clip=1.0, dp_noise_multiplier=1.0, max_image_exposure=math.inf)
    with Ledger(tmp_path / "work") as ledger:
        report = SplitClient(options).contribute(server, ledger, client_id="c0", images=images,  # type: ignore[arg-type]
                                                 labels=[0] * 12, paths=None, cut=900, schedule=SCHEDULE, server="srv")
    assert report.steps == 40 and len(recorder.steps) == 40
    assert [list(s.t) for s in recorder.steps] == [list(r.t) for r in server.forwards]  # what the server got
    pld, rdp = _independent_split_epsilon(recorder.steps, 256, 1.0, 1.0)
    assert report.epsilon == pytest.approx(pld, rel=2e-3)
    assert pld <= rdp <= 1.3 * pld  # RDP is an upper bound, and a close one here
    assert 3 < report.epsilon < 15  # type: ignore[operator]


def test_split_epsilon_under_the_default_cap_is_one_release(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Default caps at cut 500, sigma = 0.5, C = 0.1 (gradient near its clipping bound): every image ends within one
    ambient release at its floor, and the client's epsilon is dp-accounting's for the worst image's sends."""
    recorder = Recorder(monkeypatch)
    server = EchoServer()
    images = torch.rand((12, 1, 8, 8), generator=torch.Generator().manual_seed(1)) * 2 - 1
    options = SplitOptions(batch_size=4, dp_clip=0.1, dp_noise_multiplier=0.5)
    with Ledger(tmp_path / "work") as ledger:
        report = SplitClient(options).contribute(server, ledger, client_id="c0", images=images,  # type: ignore[arg-type]
                                                 labels=[0] * 12, paths=None, cut=500, schedule=SCHEDULE, server="srv")
    assert report.stopped.startswith("privacy budget spent") and report.steps == len(server.forwards) > 3
    ab = float(AB[500])
    one_release = dpa.get_epsilon_gaussian(math.sqrt(1 - ab) / (2 * math.sqrt(ab * 64)), DELTA)
    pld, _ = _independent_split_epsilon(recorder.steps, 64, 0.1, 0.5)
    assert report.epsilon == pytest.approx(pld, rel=2e-3)
    assert report.epsilon <= one_release * (1 + 1e-9)  # type: ignore[operator]
    assert report.max_image_exposure is not None and report.max_image_exposure <= 1.0


def test_latent_epsilon_is_priced_per_latent_element_in_the_latents_range(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """In latent space (--autoencoder) the mechanism acts on the client's scaled latents, which it clamps to
    [-4, 4]^d (common/autoencoder.py's LATENT_BOUND), d the latent elements: every radius is 4 times a pixel's.
    Split sends (4x8x8 latents, cut 500, sigma 1, C 1) and an ambient release, against dp-accounting."""
    assert SplitClient.from_settings(ClientSettings(autoencoder=tmp_path / "ae")).options.value_bound == 4.0
    assert SplitClient.from_settings(ClientSettings()).options.value_bound == 1.0
    recorder = Recorder(monkeypatch)
    latents = (torch.randn((12, 4, 8, 8), generator=torch.Generator().manual_seed(3)) * 1.5).clamp(-4, 4)
    options = SplitOptions(batch_size=4, steps=10, dp_clip=1.0, dp_noise_multiplier=1.0, max_image_exposure=math.inf,
                           value_bound=4.0)
    with Ledger(tmp_path / "work") as ledger:
        report = SplitClient(options).contribute(EchoServer(), ledger, client_id="c0", images=latents,  # type: ignore[arg-type]
                                                 labels=[0] * 12, paths=None, cut=500, schedule=SCHEDULE, server="srv")
    pld, _ = _independent_split_epsilon(recorder.steps, 256, 1.0, 1.0, bound=4.0)
    assert report.epsilon == pytest.approx(pld, rel=2e-3)
    as_pixels, _ = _independent_split_epsilon(recorder.steps, 256, 1.0, 1.0)
    assert report.epsilon is not None and report.epsilon > 2 * as_pixels  # what the [-1, 1] accounting would have understated
    with Ledger(tmp_path / "ambient") as ledger:
        ledger.record_sent([SentItem("k0", 0, 0, "0" * 64)], ReleaseLevel.of(SCHEDULE, 900), "ambient", "srv")
        (entry,) = privacy_report(ledger, DELTA, (4, 8, 8), bound=4.0)["ambient"]
    ab = float(AB[900])
    assert entry["epsilon_per_release"] == pytest.approx(
        dpa.get_epsilon_gaussian(math.sqrt(1 - ab) / (2 * 4 * math.sqrt(ab * 256)), DELTA), rel=1e-6)
