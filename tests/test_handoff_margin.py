"""``--handoff-margin`` (issue 19's near-cut zone): the client's local model also covers (cut, cut + margin] and
sampling hands off there, while the release stays at the cut (nothing more leaves the client)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from client_fake_server import make_image_folder
from server_support import start

from collafuse.client.ledger import Ledger
from collafuse.client.lifecycle import ClientLifecycle
from collafuse.common.config import ClientSettings
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
