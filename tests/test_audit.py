"""The privacy audit: quality metrics, payload checks, reconstruction attacks, and ``collafuse-audit`` on a recorded run."""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from collafuse.client.dp import privatize
from collafuse.common.codec import encode
from collafuse.common.data import save_png
from collafuse.common.diffusion import q_sample
from collafuse.common.models import as_denoiser, build_unet, save_model
from collafuse.common.schedule import ScheduleConfig
from collafuse.evaluation.audit import attacks
from collafuse.evaluation.audit.cli import main as audit_main
from collafuse.evaluation.audit.payloads import check_noise, check_raw, estimate_blind, estimate_known
from collafuse.evaluation.audit.quality import mean_psnr, psnr, ssim
from collafuse.evaluation.data.digits import digits_arrays
from collafuse.v1 import collafuse_pb2

SIZE = 8
SCHEDULE = ScheduleConfig()
AB = SCHEDULE.alphas_cumprod()


def _digits(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = digits_arrays(SIZE)
    return torch.from_numpy(images[:n]).float(), torch.from_numpy(labels[:n]).long()


def _release(x0: torch.Tensor, cut: int, seed: int = 0) -> torch.Tensor:
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    return q_sample(x0, torch.full((x0.shape[0],), cut, dtype=torch.long), eps, AB).float()


# ---- quality -------------------------------------------------------------------------------------------


def test_ssim_and_psnr() -> None:
    gen = torch.Generator().manual_seed(0)
    target = torch.rand(4, 1, SIZE, SIZE, generator=gen) * 2 - 1
    noisy = (target + 0.2 * torch.randn(target.shape, generator=gen)).clamp(-1, 1)
    noisier = (target + 0.8 * torch.randn(target.shape, generator=gen)).clamp(-1, 1)
    assert float(ssim(target, target).min()) == pytest.approx(1.0)
    assert bool((ssim(noisier, target) < ssim(noisy, target)).all())
    mse = float((noisy - target).pow(2).mean())
    assert mean_psnr(noisy, target) == pytest.approx(10 * math.log10(4 / mse))
    assert psnr(target, target).min() >= 299


# ---- payload checks --------------------------------------------------------------------------------------


def test_noise_check_passes_honest_releases_and_flags_less_noise_and_raw_x0() -> None:
    x0, _ = _digits()
    honest = _release(x0, 200)
    check = check_noise(honest, float(AB[200]), x0)
    assert check.findings == []
    measured = np.asarray(check.measured_alpha_bar)
    assert abs(measured.mean() - float(AB[200])) < 0.02
    # Released at 20 while declaring 200: every payload is flagged, and the group.
    cheat = _release(x0, 20)
    flagged = check_noise(cheat, float(AB[200]), x0).findings
    assert sum(f.kind == "less_noise" for f in flagged) >= 60 and flagged[-1].kind == "less_noise_group"
    # Rescaling does not hide it: the check measures signal-to-noise, not variance.
    assert sum(f.kind == "less_noise" for f in check_noise(cheat * 0.5, float(AB[200]), x0).findings) >= 60
    # Released at 150 while declaring 200: too close to call per 8x8 image, plain as a group.
    assert check_noise(_release(x0, 150), float(AB[200]), x0).summary()["group_less_noisy"] is True
    # A raw image among honest releases, its float bytes on the wire, and a file's bytes on the wire.
    mixed = honest.clone()
    mixed[5] = x0[5]
    raw = check_raw(mixed, x0, payload_bytes=b"head" + x0[7].numpy().astype("<f4").tobytes(), files={"a.png": b"PNGDATA"})
    assert [(f.kind, f.index) for f in raw if f.kind == "raw_x0"] == [("raw_x0", 5)]
    assert any(f.kind == "raw_bytes" for f in raw)
    assert check_raw(honest, x0, b"xxPNGDATAyy", {"a.png": b"PNGDATA"})[-1].kind == "file_bytes"
    assert check_raw(honest, x0, honest.numpy().tobytes(), {}) == []


def test_noise_estimators_error() -> None:
    """Known-x0 regression is within its stated error; the blind estimator errs towards 'noisier'."""
    x0, _ = _digits()
    for cut in (50, 200, 500):
        payload = _release(x0, cut, seed=cut)
        known = estimate_known(payload, x0, float(AB[cut]))
        z = (known.alpha_bar - float(AB[cut])) / known.stderr
        assert float(z.abs().max()) < 5
        blind = estimate_blind(payload)
        excess = float(blind.noise_var.mean()) - (1 - float(AB[cut]))  # edges read as noise: >= 0 on average
        assert -0.03 < excess < 0.2, (cut, excess)
    # Blind flags a raw image (no noise at all) declared as a release at 500.
    assert check_noise(x0, float(AB[500])).findings


# ---- attacks --------------------------------------------------------------------------------------------


def test_two_level_reuse_of_one_noise_is_exact() -> None:
    x0, _ = _digits(16)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    x_a = q_sample(x0.double(), torch.full((16,), 200, dtype=torch.long), eps.double(), AB)
    x_b = q_sample(x0.double(), torch.full((16,), 600, dtype=torch.long), eps.double(), AB)
    rec = attacks.score("two_level", attacks.two_level(x_a, float(AB[200]), x_b, float(AB[600])), x0)
    assert rec.psnr_db > 100


def test_averaging_gains_ten_log_k_decibels() -> None:
    x0 = torch.rand(64, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(2)) - 0.5  # away from the clamp
    ab = 0.99
    gen = torch.Generator().manual_seed(3)

    def releases(k: int) -> torch.Tensor:
        return torch.stack([math.sqrt(ab) * x0 + math.sqrt(1 - ab) * torch.randn(x0.shape, generator=gen) for _ in range(k)])

    single = attacks.score("one", attacks.linear(releases(1)[0], ab), x0).psnr_db
    for k in (4, 16):
        mean, ab_k = attacks.average_releases(releases(k), ab)
        gain = attacks.score("avg", attacks.linear(mean, ab_k), x0).psnr_db - single
        assert gain == pytest.approx(10 * math.log10(k), abs=0.5)
    assert attacks.averaged_level(0.5, 1) == pytest.approx(0.5)
    # The mean of k releases, rescaled, is a release at the level averaged_level says (measured against x0).
    x0_digits, _ = _digits()
    stacked = torch.stack([_release(x0_digits, 300, seed=s) for s in range(8)])
    mean, level = attacks.average_releases(stacked, float(AB[300]))
    assert float(estimate_known(mean, x0_digits).alpha_bar.mean()) == pytest.approx(level, abs=0.02)


def _split_batch(t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]:
    torch.manual_seed(0)
    x0, labels = _digits(16)
    model = build_unet("tiny", (1, SIZE, SIZE), 10)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(4))
    x_t = q_sample(x0, torch.full((16,), t, dtype=torch.long), eps, AB).float()
    eps_hat = as_denoiser(model)(x_t, torch.full((16,), t, dtype=torch.long), labels)
    loss = torch.nn.functional.mse_loss(eps_hat, eps)
    (grad,) = torch.autograd.grad(loss, eps_hat)
    return x0, x_t, eps_hat.detach(), grad, attacks.mse_loss_scale(tuple(eps.shape))


def test_gradient_inversion_is_exact_without_dp_and_blunted_with_it() -> None:
    t = 300
    x0, x_t, eps_hat, grad, scale = _split_batch(t)
    ab = float(AB[t])
    exact = attacks.score("inv", attacks.invert_gradient(grad, eps_hat, x_t, ab, scale), x0)
    assert exact.psnr_db > 100, exact.psnr_db
    clip = float(grad.flatten(1).norm(dim=1).median())
    tweedie_only = attacks.score("tw", attacks.x0_from_eps(x_t, eps_hat, ab), x0).psnr_db
    for sigma, ceiling in ((0.5, 40.0), (4.0, tweedie_only + 1.0)):
        noisy = privatize(grad, clip, sigma, torch.Generator().manual_seed(5))
        rec = attacks.score("dp", attacks.invert_gradient(noisy, eps_hat, x_t, ab, scale, clip, sigma), x0)
        assert rec.psnr_db < ceiling, (sigma, rec.psnr_db)
        assert rec.psnr_db > tweedie_only - 0.5  # the MMSE attacker never does worse than ignoring the gradient


# ---- the CLI on a recorded run --------------------------------------------------------------------------


def _transcript_line(seq: int, chunk: collafuse_pb2.ReleaseChunk) -> str:
    """One line in server/transcript.py's format."""
    return json.dumps({
        "seq": seq, "time": 0.0, "method": "/collafuse.v1.CollaFuse/Release",
        "request_type": chunk.DESCRIPTOR.full_name, "peer": "ipv4:127.0.0.1:1",
        "payload_b64": base64.b64encode(chunk.SerializeToString()).decode("ascii"),
    })


def _recorded_run(root: Path, cuts: dict[str, int], schedule: ScheduleConfig) -> Path:
    images, labels = digits_arrays(SIZE)
    ab = schedule.alphas_cumprod()
    lines = []
    for k, (client, cut) in enumerate(cuts.items()):
        part = slice(12 * k, 12 * (k + 1))
        x0, y = torch.from_numpy(images[part]).float(), labels[part]
        for i, (image, label) in enumerate(zip(x0, y)):
            save_png(image, root / "data" / "shards" / client / str(label) / f"{i}.png")
        x_cut = _release_with(x0, cut, ab)
        chunk = collafuse_pb2.ReleaseChunk(client_id=client, cut=cut)
        for i, (row, label) in enumerate(zip(x_cut, y)):
            chunk.items.add(image_key=f"key-{client}-{i}", label=int(label), x_cut=encode(row))
        lines.append(_transcript_line(k + 1, chunk))
    (root / "server").mkdir(parents=True, exist_ok=True)
    (root / "server" / "transcript.jsonl").write_text("\n".join(lines) + "\n")
    torch.manual_seed(0)
    model = build_unet("tiny", (1, SIZE, SIZE), 10)
    save_model(model, root / "server" / "checkpoints" / "latest" / "ema", {"schedule": schedule.model_dump()})
    return root


def _release_with(x0: torch.Tensor, cut: int, ab: torch.Tensor) -> torch.Tensor:
    # Loaded back from PNG the images are quantised: release from what the auditor will load.
    x0 = torch.round((x0 + 1) * 127.5) / 127.5 - 1
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(cut))
    return q_sample(x0, torch.full((x0.shape[0],), cut, dtype=torch.long), eps, ab).float()


def test_cli_audits_a_recorded_run(tmp_path: Path) -> None:
    schedule = ScheduleConfig(num_train_timesteps=100)
    run = _recorded_run(tmp_path / "run", {"client-0": 20, "client-1": 0}, schedule)
    code = audit_main([str(run), "--features", "pixels", "--chain-steps", "10", "--chains", "ddim",
                       "--dp-noise", "1.0", "--log-level", "WARNING"])
    assert code == 0
    report = json.loads((run / "audit.json").read_text())
    assert (run / "audit.png").stat().st_size > 0 and (run / "audit_grid.png").stat().st_size > 0
    groups = {g["client_id"]: g for g in report["groups"]}
    honest, raw = groups["client-0"], groups["client-1"]
    assert honest["images"] == 12 and honest["noise_check"]["less_noisy_than_declared"] == 0
    assert honest["raw_findings"] == []
    by_attack = {a["attack"]: a for a in honest["attacks"]}
    assert {"linear", "tweedie", "chain_ddim", "two_level", "split_inversion", "split_inversion_dp1"} <= set(by_attack)
    assert by_attack["split_inversion"]["psnr_db"] > 100 and by_attack["two_level"]["psnr_db"] > 100
    assert by_attack["split_inversion_dp1"]["psnr_db"] < 60
    assert set(honest["disclosure"]["frechet"]) == {"release", "handoff", "server_alone"}
    assert math.isfinite(honest["epsilon_release"]["epsilon_exact"])
    # The cut-0 client released x0 itself: flagged raw, infinite epsilon.
    assert {f["kind"] for f in raw["raw_findings"]} >= {"raw_x0"}
    assert raw["best_actual"]["psnr_db"] > 100 and "global-model baseline" in raw["note"]
    assert raw["epsilon_release"]["epsilon_exact"] == "inf"
    assert report["unexpected_tensors"] == []


def test_cli_says_what_is_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert audit_main([str(tmp_path)]) == 2
    assert "--transcript" in capsys.readouterr().err
