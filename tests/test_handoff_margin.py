"""``--handoff-margin`` (issue 19's near-cut zone): the client's local model also covers (cut, cut + margin] and
sampling hands off there, while the release stays at the cut (nothing more leaves the client)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from client_fake_server import make_image_folder
from server_support import start

from collafuse.client.generate import load_client_model
from collafuse.client.ledger import Ledger
from collafuse.client.lifecycle import ClientLifecycle
from collafuse.common.config import ClientSettings
from collafuse.common.data import save_png
from collafuse.common.diffusion import q_sample
from collafuse.common.models import as_denoiser
from collafuse.common.schedule import ScheduleConfig
from collafuse.evaluation.data.digits import digits_arrays
from collafuse.server.protocols.ambient import ReleaseTable

T, CUT, MARGIN = 50, 20, 10  # the in-process test server's T (tests/server_support.py)


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_the_handoff_cut_is_the_cut_plus_the_margin_within_zero_and_t() -> None:
    assert ClientSettings(cut=CUT, handoff_margin=MARGIN).handoff_cut(T) == CUT + MARGIN
    assert ClientSettings(cut=CUT).handoff_cut(T) == CUT  # the default: at the cut
    assert ClientSettings(cut=45, handoff_margin=MARGIN).handoff_cut(T) == T  # the client runs the whole chain
    assert ClientSettings(cut=0, handoff_margin=MARGIN).handoff_cut(T) == 0  # GM has no local model to extend


@pytest.mark.parametrize("margin", [0, MARGIN])
def test_a_margin_moves_the_local_model_and_the_handoff_but_not_the_release(tmp_path: Path, margin: int) -> None:
    server = start(tmp_path / "store", classes=["0", "2"], max_steps=2)
    try:
        make_image_folder(tmp_path / "data", classes=("0", "2"), per_class=3)
        settings = ClientSettings(data=tmp_path / "data", server=server.address, workdir=tmp_path / "work", cut=CUT,
                                  handoff_margin=margin, train_steps=2, batch_size=4, inference_steps=0,
                                  samples_per_class=1, retries=2, rpc_timeout=30, device="cpu", seed=1)
        with ClientLifecycle(settings, show_progress=False, poll_interval=0.02) as client:
            metrics = client.run()
            with Ledger(client.workdir) as ledger:
                released_at = {r.cut for r in ledger.releases()}
        # The release is at the cut whatever the margin: the server holds x_cut at CUT only.
        assert released_at == {CUT} and set(ReleaseTable(server.store).load().cuts.tolist()) == {CUT}
        # The local model was trained for t in [1, CUT + margin] ...
        meta = json.loads(next((tmp_path / "work" / "checkpoints" / "latest").rglob("collafuse.json")).read_text())
        assert meta["cut"] == CUT + margin
        # ... and sampling handed off there: every one of the T steps, split at CUT + margin.
        generated = metrics["generate"]
        assert generated["server_steps_per_image"] == T - CUT - margin
        assert generated["client_steps_per_image"] == CUT + margin
    finally:
        server.stop(0)


@pytest.mark.slow  # about a minute on 2 cores; `make test-faults` (CI) runs it, benchmarks/cut_study.py measures samples
def test_a_client_trained_with_a_margin_denoises_the_margin_zone_and_uses_the_label(tmp_path: Path) -> None:
    """The outcome for a user who picks --handoff-margin: the local model now has to denoise (cut, cut + margin]
    itself. Trained through the client's lifecycle on real digits (classes 0-3, cut 200, margin 50 at T = 1000), it
    must do so on held-out digits far better than the same budget without the margin, and use the label there."""
    t_total, cut, margin, classes = 1000, 200, 50, ["0", "1", "2", "3"]
    images, targets = digits_arrays(8)
    x, y = torch.from_numpy(images), torch.from_numpy(targets)
    four = torch.nonzero(y < len(classes)).flatten()
    order = four[torch.randperm(len(four), generator=torch.Generator().manual_seed(0))]
    held_out, private = order[:200], order[200:]
    for i in private.tolist():
        save_png(x[i].numpy(), tmp_path / "data" / str(int(y[i])) / f"{i:04d}.png")
    server = start(tmp_path / "store", classes=classes, num_train_timesteps=t_total, max_steps=1)
    models = {}
    try:
        for m in (0, margin):
            settings = ClientSettings(data=tmp_path / "data", server=server.address, workdir=tmp_path / f"work{m}",
                                      cut=cut, handoff_margin=m, train_steps=400, batch_size=32, lr=2e-3,
                                      retries=2, rpc_timeout=30, device="cpu", seed=0)
            with ClientLifecycle(settings, show_progress=False, poll_interval=0.05) as client:
                client.train()
                fingerprint = client.server_info().fingerprint
            models[m] = load_client_model(settings.workdir, fingerprint, cut + m).eval()
    finally:
        server.stop(0)

    alphas = ScheduleConfig(num_train_timesteps=t_total).alphas_cumprod()
    g = torch.Generator().manual_seed(7)
    x0, labels = x[held_out], y[held_out]
    t = torch.randint(cut + 1, cut + margin + 1, (len(x0),), generator=g)  # the margin zone
    eps = torch.randn(x0.shape, generator=g)
    wrong = (labels + 1 + torch.randint(len(classes) - 1, labels.shape, generator=g)) % len(classes)
    x_t = q_sample(x0, t, eps, alphas)

    def eps_mse(model: torch.nn.Module, y_in: torch.Tensor) -> float:
        with torch.no_grad():
            return float((as_denoiser(model)(x_t, t, y_in) - eps).pow(2).mean())  # type: ignore[arg-type]

    with_margin, wrong_label, without = eps_mse(models[margin], labels), eps_mse(models[margin], wrong), eps_mse(
        models[0], labels)
    assert with_margin < 0.8 * without, f"the margin zone is not learned: {with_margin:.4f} vs {without:.4f} without"
    assert wrong_label > 1.3 * with_margin, f"label-blind: true-label MSE {with_margin:.4f}, wrong {wrong_label:.4f}"
