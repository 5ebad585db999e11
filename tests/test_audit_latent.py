"""The privacy audit of a run in latent space (issue 18): every attack's estimate is decoded through the run's
autoencoder and scored against the client's x0 in pixels.

The transcripts carry latent payloads made here from the client's own images (encode, then noise), and the expected
figures are computed here, independently of the audit's code: the decoder applied to the attacker's latent estimate,
and numpy's PSNR against the PNGs' pixels. A raw latent (cut 0) or an exact split inversion gives the attacker z0
itself, so its figure is the autoencoder's own reconstruction PSNR, not a perfect score: what the server can see is
bounded by what the autoencoder keeps. Last, ``collafuse-sim --autoencoder --audit`` end to end.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_autoencoder import FAST, write_digits
from transcript_support import split_step_lines, transcript_line, write_transcript

from collafuse.client.joining import CACHED_SERVER_FILE
from collafuse.common.autoencoder import FrozenAutoencoder, load_autoencoder
from collafuse.common.autoencoder_train import train_autoencoder
from collafuse.common.codec import encode
from collafuse.common.data import load_image_folder
from collafuse.common.schedule import ScheduleConfig
from collafuse.deploy import sim
from collafuse.deploy.sim import SimSettings
from collafuse.evaluation.audit.cli import main as audit_main
from collafuse.v1 import collafuse_pb2

torch.set_num_threads(1)
AB = ScheduleConfig().alphas_cumprod().double()
CLIENT = "client-0"
TOLERANCE_DB = 0.05


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def autoencoders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The run's autoencoder (16x16 grey -> 4x8x8) and another one with other weights."""
    root = tmp_path_factory.mktemp("ae")
    digits = write_digits(root / "digits", count=48)
    train_autoencoder(digits, root / "ae", FAST.model_copy(update={"steps": 6}), show_progress=False)
    train_autoencoder(digits, root / "other", FAST.model_copy(update={"steps": 6, "seed": 1}), show_progress=False)
    return root / "ae", root / "other"


def _client(run: Path, ae: FrozenAutoencoder, **metrics: Any) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """12 digits in the client's shard, the client's cached server setup naming the autoencoder; (x0, z0, labels)."""
    shard = write_digits(run / "data" / "shards" / CLIENT, count=12)
    client_dir = run / "clients" / CLIENT
    client_dir.mkdir(parents=True)
    (client_dir / CACHED_SERVER_FILE).write_text(json.dumps({"autoencoder": asdict(ae.identity)}))
    (client_dir / "metrics.json").write_text(json.dumps(metrics))
    data = load_image_folder(shard, 1, 16)
    # The client clamps its latents to +-4 (common/autoencoder.py's LATENT_BOUND) before anything leaves.
    return data.images.float(), ae.encode(data.images.float()).clamp(-4, 4), [int(c) for c in data.class_names]


def _audit(run: Path, *extra: str) -> dict[str, Any]:
    assert audit_main([str(run), "--features", "none", "--log-level", "WARNING", *extra]) == 0
    return json.loads((run / "audit.json").read_text())


def _psnr(estimate: np.ndarray, truth: np.ndarray) -> float:
    return 10 * math.log10(4.0 / float(np.mean((estimate - truth) ** 2)))


def _decoded(ae: FrozenAutoencoder, z: torch.Tensor) -> np.ndarray:
    """What the attacker looks at: the latent estimate through the public decoder."""
    model: Any = ae.model  # a diffusers AutoencoderKL
    return model.decode(z.float() / ae.scaling_factor + ae.shift_factor).sample.clamp(-1, 1).detach().numpy()


def _releases(z_cut: torch.Tensor, labels: list[int], cut: int) -> list[str]:
    chunk = collafuse_pb2.ReleaseChunk(client_id=CLIENT, cut=cut, last=True, total_items=len(labels))
    for i, (row, label) in enumerate(zip(z_cut, labels)):
        chunk.items.add(image_key=f"key-{i}", label=label, x_cut=encode(row.float().contiguous()))
    return [transcript_line(1, "Release", chunk)]


@pytest.mark.parametrize("cut", [0, 200])
def test_latent_releases_are_decoded_and_scored_against_x0_in_pixels(autoencoders: tuple[Path, Path], tmp_path: Path,
                                                                     cut: int) -> None:
    ae = load_autoencoder(autoencoders[0])
    run = tmp_path / "run"
    x0, z0, labels = _client(run, ae)
    ab = float(AB[cut])
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    z_cut = (math.sqrt(ab) * z0.double() + math.sqrt(1 - ab) * noise).float() if cut else z0
    write_transcript(run, _releases(z_cut, labels, cut))
    (group,) = _audit(run, "--autoencoder", str(autoencoders[0]))["groups"]
    attacks = {a["attack"]: a for a in group["attacks"]}
    assert group["latent"]["latent_shape"] == [4, 8, 8] and group["latent"]["pixel_shape"] == [1, 16, 16]
    ceiling = _psnr(_decoded(ae, z0), x0.numpy())  # the autoencoder's own reconstruction
    if cut == 0:
        # A raw latent is z0: decoded, it is the autoencoder's reconstruction of x0, not x0 itself.
        assert abs(attacks["identity"]["psnr_db"] - ceiling) < TOLERANCE_DB, (attacks["identity"], ceiling)
        assert attacks["identity"]["psnr_db_latent"] == 300.0
        return
    # The linear look z_cut / sqrt(ab), bounded by the client's latent range, decoded.
    bound = float(z0.abs().max())
    linear = _psnr(_decoded(ae, (z_cut.double() / math.sqrt(ab)).clamp(-bound, bound)), x0.numpy())
    assert abs(attacks["linear"]["psnr_db"] - linear) < TOLERANCE_DB, (attacks["linear"], linear)
    assert group["best_actual"]["psnr_db"] >= linear - TOLERANCE_DB
    assert linear < ceiling  # noise costs the attacker something on top of the autoencoder's loss
    # The floor is per scaled latent element (look gain 1), and an honest release passes it.
    assert group["floor"]["look_gain"] == 1.0 and group["noise_check"]["less_noisy_than_declared"] == 0


def test_an_exact_latent_split_inversion_reaches_the_autoencoders_ceiling(autoencoders: tuple[Path, Path],
                                                                          tmp_path: Path) -> None:
    """Without DP a split gradient gives eps exactly, hence z0: the audit's figure is decode(z0) against x0."""
    ae = load_autoencoder(autoencoders[0])
    run = tmp_path / "run"
    cut = 200
    x0, z0, labels = _client(run, ae, cut=cut, contribution={"dp_clip": None, "dp_noise_multiplier": 0.0})
    gen = torch.Generator().manual_seed(1)
    lines, seq, batch = [], 0, 4
    d = z0[0].numel()
    for step in range(3):
        pick = list(range(step * batch, (step + 1) * batch))
        t = torch.randint(cut + 1, 1001, (batch,), generator=gen)
        ab = AB[t].view(-1, 1, 1, 1)
        eps = torch.randn((batch, *z0.shape[1:]), generator=gen, dtype=torch.float64)
        z_t = (ab.sqrt() * z0[pick].double() + (1 - ab).sqrt() * eps).float()
        eps_hat = torch.randn(z_t.shape, generator=gen)
        grad = ((2 / d) * (eps_hat.double() - eps) / batch).float()
        lines += split_step_lines(seq, CLIENT, step, z_t, t, [labels[i] for i in pick], eps_hat, grad)
        seq += 3
    write_transcript(run, lines)
    (group,) = _audit(run, "--autoencoder", str(autoencoders[0]))["groups"]
    inversion = {a["attack"]: a for a in group["attacks"]}["split_inversion"]
    ceiling = _psnr(_decoded(ae, z0), x0.numpy())
    assert abs(inversion["psnr_db"] - ceiling) < TOLERANCE_DB, (inversion, ceiling)
    assert inversion["psnr_db_latent"] > 100  # z0 itself, to float rounding
    assert (run / "audit_grid.png").is_file()


def test_the_audit_refuses_an_autoencoder_the_clients_did_not_join_with(autoencoders: tuple[Path, Path],
                                                                        tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    ae = load_autoencoder(autoencoders[0])
    run = tmp_path / "run"
    _, z0, labels = _client(run, ae)
    write_transcript(run, _releases(z0, labels, 0))
    assert audit_main([str(run), "--features", "none", "--autoencoder", str(autoencoders[1])]) != 0
    said = capsys.readouterr().err
    assert "joined with the autoencoder" in said and "pass the run's own --autoencoder" in said
    assert audit_main([str(run), "--features", "none"]) != 0  # a bare transcript folder names no autoencoder
    assert "ran in latent space: pass the run's autoencoder folder as --autoencoder" in capsys.readouterr().err


@pytest.mark.slow  # ~1 min on 2 cores: CI runs it in `make test-faults`
def test_a_latent_simulation_runs_audited_end_to_end(autoencoders: tuple[Path, Path], tmp_path: Path) -> None:
    """collafuse-sim --autoencoder --audit: real server and client processes in latent space, decoded grids, and an
    audit scored in pixels (the sim passes its --autoencoder to the audit)."""
    digits = write_digits(tmp_path / "digits", count=40)
    summary = sim.run(SimSettings(
        out=tmp_path / "sim", dataset=str(digits), autoencoder=autoencoders[0], audit=True, audit_features="pixels",
        clients=2, steps=2, client_steps=2, batch_size=8, samples_per_class=1, inference_steps=5,
        server_preset="tiny", timeout=300,
    ))
    assert summary["audit"]["unexpected_tensors"] == 0
    audit = json.loads((tmp_path / "sim" / "audit.json").read_text())
    assert {g["client_id"] for g in audit["groups"]} == {"client-0", "client-1"}
    for group in audit["groups"]:
        assert group["latent"]["pixel_shape"] == [1, 16, 16]
        assert group["noise_check"]["less_noisy_than_declared"] == 0 and not group["raw_findings"]
        assert group["best_actual"]["psnr_db"] < 30  # one noisy look at cut 200, decoded
    for k in range(2):
        samples = np.load(tmp_path / "sim" / "clients" / f"client-{k}" / "samples" / "samples.npy")
        assert samples.shape[1:] == (1, 16, 16)
        assert (tmp_path / "sim" / "grids" / f"client-{k}.png").is_file()
