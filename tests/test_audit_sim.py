"""``collafuse-sim --audit`` on a tiny split run: the transcript is recorded and audited, and the gradient
inversion on the recorded payloads (x_t, the server's eps_hat, the client's gradient) recovers x0 exactly."""

from __future__ import annotations

import json
import math
from pathlib import Path

from collafuse.deploy.sim import SimSettings, run


def test_sim_audit_inverts_recorded_split_gradients_exactly(tmp_path: Path) -> None:
    settings = SimSettings(
        clients=1, cut=100, protocol="split", steps=4, client_steps=2, batch_size=8, samples_per_class=1,
        inference_steps=5, out=tmp_path / "run", seed=1, threads=1, timeout=600, audit=True, audit_features="pixels",
        split_max_image_exposure=math.inf,  # split without DP noise sends nothing unless the cap is lifted
    )
    summary = run(settings)
    audit = json.loads((settings.out / "audit.json").read_text())
    assert (settings.out / "audit.png").is_file() and summary["audit"]["groups"]
    assert audit["split_steps"] == 4 and audit["unexpected_tensors"] == []
    (group,) = audit["groups"]
    assert group["protocol"] == "split" and group["images"] == 4 * 8 and group["schedule_source"] == "client ledger (pinned)"
    assert group["match"]["confident"] == 1.0  # without DP the gradient pins every row to its image
    # The client's ledger names every row's image (its split sends), and the likelihood match agrees with it.
    assert group["match"]["method"].startswith("the client's ledger") and group["match"]["likelihood_agrees"] == 1.0
    linked = {a["attack"]: a for a in group["attacks"]}["linked_by_image"]
    assert linked["psnr_db"] > 100 and linked["per_image"], linked
    inversion = {a["attack"]: a for a in group["attacks"]}["split_inversion"]
    assert inversion["psnr_db"] > 100 and inversion["exact_rows"] == 1.0, inversion
    # Both are exact here (> 100 dB): whichever the float rounding puts first is the best.
    assert group["best_actual"]["attack"] in ("split_inversion", "linked_by_image")
    assert group["best_actual"]["psnr_db"] > 100
    # (a): nothing less noisy than declared at the client's pinned schedule, no t <= cut, no raw x0 or file bytes.
    assert group["t_at_or_below_cut"] == 0 and group["above_floor"] == 0
    assert group["noise_check"]["less_noisy_than_declared"] == 0 and not group["noise_check"]["group_less_noisy"]
    assert group["raw_findings"] == []
    assert group["epsilon_unbounded"] is True
