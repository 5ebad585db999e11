"""The privacy audit is at least as strong as the attacks known against the client (issue 15's four).

Each test records a transcript that carries one attack, as an older or misconfigured client would have let it
happen, runs ``collafuse-audit`` on it, and computes the attack itself here, independently of the audit's code
(numpy, the known transforms, the attacker's own bookkeeping). The audit's figure (its best reconstruction on what
actually reached the server) must be at least the attack's, less 0.1 dB:

1. split rows of one image sent in many steps, linked and combined by precision (x_t looks and gradient looks);
2. an inflated image spec, taken back to the native pixels by least squares;
3. augmented copies (flips, rotations, shifts, light noise) released separately, undone and averaged;
4. payloads checked against the client's own floor, not the server's schedule (tiny betas served).

An honest single look gives the baseline: x_cut / sqrt(ab) for a release, and linking gains nothing when every
image was sent once. 12 digits at 16x16 grey; no server model (the attacks here need none).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from transcript_support import split_step_lines, transcript_line, write_transcript

from collafuse.client.dp import split_send_mu2
from collafuse.client.ledger import Ledger
from collafuse.client.privacy_ledger import PrivacyLedger, Send
from collafuse.common.codec import encode
from collafuse.common.data import load_image_folder, save_png
from collafuse.common.schedule import ScheduleConfig
from collafuse.evaluation.audit.cli import main as audit_main
from collafuse.evaluation.data.digits import digits_arrays
from collafuse.v1 import collafuse_pb2

torch.set_num_threads(1)
SCHEDULE = ScheduleConfig()  # the client's reference and an honest server's schedule
AB = SCHEDULE.alphas_cumprod().double()
TINY = ScheduleConfig(beta_start=3e-8, beta_end=3e-8)  # a server that serves almost no noise
CLIENT = "client-0"
CUT = 200
TOLERANCE_DB = 0.1


# ---- recording a run ------------------------------------------------------------------------------------------


def _shard(run: Path) -> Path:
    return run / "data" / "shards" / CLIENT


def _twelve_digits(run: Path) -> tuple[list[str], np.ndarray]:
    """12 digits (one of each class, two more) as 16x16 grey PNGs in the client's shard; their labels."""
    images, labels = digits_arrays(16)
    picked = [int(np.nonzero(labels == c)[0][k]) for k, c in enumerate([*range(10), 0, 1])]
    for i in picked:
        save_png(images[i], _shard(run) / str(labels[i]) / f"d{i:04d}.png")
    return [f"d{i:04d}" for i in picked], labels[picked]


def _release_lines(x_cut: torch.Tensor, labels: list[int], cut: int) -> list[str]:
    chunk = collafuse_pb2.ReleaseChunk(client_id=CLIENT, cut=cut, last=True, total_items=len(labels))
    for i, (row, label) in enumerate(zip(x_cut, labels)):
        chunk.items.add(image_key=f"key-{i}", label=int(label), x_cut=encode(row.float().contiguous()))
    return [transcript_line(1, "Release", chunk)]


def _audit(run: Path, *extra: str) -> dict[str, Any]:
    assert audit_main([str(run), "--features", "none", "--log-level", "WARNING", *extra]) == 0
    return json.loads((run / "audit.json").read_text())


def _noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _psnr(estimate: np.ndarray, truth: np.ndarray) -> float:
    """PSNR of the pooled MSE (the audit's single number for a set), estimates clipped to [-1, 1]."""
    mse = float(np.mean((np.clip(estimate, -1, 1) - truth) ** 2))
    return 10 * math.log10(4.0 / mse)


def _attacks(group: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {a["attack"]: a for a in group["attacks"]}


def _figure(group: dict[str, Any]) -> float:
    """The audit's figure: its best reconstruction on what actually reached the server."""
    return float(group["best_actual"]["psnr_db"])


# ---- the honest baseline --------------------------------------------------------------------------------------


def test_an_honest_single_release_gives_the_baseline(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _, labels = _twelve_digits(run)
    x0 = load_image_folder(_shard(run), 1, 16).images.double()
    ab = float(AB[CUT])
    x_cut = math.sqrt(ab) * x0 + math.sqrt(1 - ab) * _noise(tuple(x0.shape), 0)
    write_transcript(run, _release_lines(x_cut, sorted(labels.tolist()), CUT))
    (group,) = _audit(run)["groups"]
    baseline = _psnr((x_cut / math.sqrt(ab)).numpy(), x0.numpy())
    assert abs(_figure(group) - baseline) < TOLERANCE_DB, (group["best_actual"], baseline)
    assert group["copies"]["groups"] == 0 and "native" not in group
    assert group["noise_check"]["less_noisy_than_declared"] == 0 and not group["noise_check"]["group_less_noisy"]
    assert group["floor"]["look_gain"] == 1.0 and group["floor"]["alpha_bar_per_element"] == pytest.approx(ab)


# ---- 1. split rows linked across steps ------------------------------------------------------------------------


CLIP, SIGMA, BATCH = 0.1, 0.5, 4


def _split_run(run: Path, steps: int, cut: int, seed: int = 0, once: bool = False) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """A split client (DP sigma 0.5, C 0.1) sending its 12 images ``steps`` times 4 a step against a server that steers
    eps_hat so that each gradient row is a direct look at x0 (tests/test_split_exposure.py's linking attacker). The
    server's own estimate (told which image every row is, precision-weighted, gradient looks taken as unclipped) and
    the truth come back, with the number of rows per image. The client records each send in its ledger, as
    client/protocols/split.py does (image key and t per row). ``once``: no image is sent twice."""
    _twelve_digits(run)
    data = load_image_folder(_shard(run), 1, 16)
    x0 = data.images.double()
    ledger = Ledger(run / "clients" / CLIENT)
    keys = ledger.image_keys(data.images)
    record = PrivacyLedger(ledger.path)
    y = torch.tensor([int(c) for c in data.class_names])  # the server's classes are "0".."9": index = digit
    n, d = x0.shape[0], x0[0].numel()
    gen = torch.Generator().manual_seed(seed)
    weighted = torch.zeros_like(x0)
    precision = torch.zeros(n, dtype=torch.float64)
    rows_per_image = torch.zeros(n, dtype=torch.long)
    lines: list[str] = []
    seq = 0
    order = torch.randperm(n, generator=gen)
    for step in range(steps):
        pick = order[step * BATCH:(step + 1) * BATCH] if once else torch.randperm(n, generator=gen)[:BATCH]
        t = torch.randint(cut + 1, SCHEDULE.num_train_timesteps + 1, (BATCH,), generator=gen)
        ab = AB[t].view(-1, 1, 1, 1)
        odds = ab / (1 - ab)
        eps = torch.randn((BATCH, *x0.shape[1:]), generator=gen, dtype=torch.float64)
        x_t = (ab.sqrt() * x0[pick] + (1 - ab).sqrt() * eps).float()
        current = torch.where(precision[pick].view(-1, 1, 1, 1) > 0,
                              weighted[pick] / precision[pick].clamp_min(1e-300).view(-1, 1, 1, 1), torch.zeros_like(x0[pick]))
        eps_hat = (x_t.double() / (1 - ab).sqrt() - odds.sqrt() * current).float()
        # The client: per-image rows (2/d)(eps_hat - eps), clipped to C, noised with sigma C, sent as rows / N.
        rows = (2 / d) * (eps_hat.double() - eps)
        norms = rows.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        rows = rows * torch.clamp(CLIP / norms, max=1.0) + SIGMA * CLIP * torch.randn(rows.shape, generator=gen, dtype=torch.float64)
        grad = (rows / BATCH).float()
        # The attacker: the x_t look and the gradient look of each row, by their precisions.
        for j, i in enumerate(pick.tolist()):
            a = float(ab[j])
            o = a / (1 - a)
            weighted[i] += o * x_t[j].double() / math.sqrt(a)
            precision[i] += o
            look = current[j] + grad[j].double() * BATCH * d / (2 * math.sqrt(o))
            p = o * (2 / (d * SIGMA * CLIP)) ** 2
            weighted[i] += p * look
            precision[i] += p
            rows_per_image[i] += 1
        record.record_step(server="srv", protocol="split", sample_rate=BATCH / n, delta=1e-5, sends=[
            Send(keys[i], int(ti), split_send_mu2(float(AB[ti]), d, CLIP, SIGMA)) for i, ti in zip(pick.tolist(), t.tolist())])
        lines += split_step_lines(seq, CLIENT, step, x_t, t, y[pick].tolist(), eps_hat, grad)
        seq += 3
    record.close()
    ledger.close()
    write_transcript(run, lines)
    (run / "clients" / CLIENT / "metrics.json").write_text(json.dumps(
        {"cut": cut, "contribution": {"dp_clip": CLIP, "dp_noise_multiplier": SIGMA}}))
    sent = rows_per_image > 0
    estimate = (weighted / precision.clamp_min(1e-300).view(-1, 1, 1, 1))[sent]
    return estimate.numpy(), x0[sent].numpy(), rows_per_image


@pytest.mark.parametrize("cut", [100, 200])
def test_split_rows_linked_across_steps(tmp_path: Path, cut: int) -> None:
    estimate, truth, looks = _split_run(tmp_path / "run", steps=30, cut=cut)
    attack = _psnr(estimate, truth)
    (group,) = _audit(tmp_path / "run")["groups"]
    attacks = _attacks(group)
    assert group["protocol"] == "split" and group["match"]["distinct_images"] == int((looks > 0).sum())
    assert _figure(group) >= attack - TOLERANCE_DB, (group["best_actual"], attack)
    assert attacks["linked_by_image"]["psnr_db"] >= attack - TOLERANCE_DB
    # Linking is what it takes: no single row comes close (so an audit that does not link fails above).
    per_row = max(a["psnr_db"] for a in group["attacks"] if not a.get("per_image"))
    assert attack > per_row + 1.0, (attack, per_row)
    # From the wire alone (no key travels with a split row) the server links most of it too.
    assert group["match"]["method"].startswith("the client's ledger")
    # From the wire alone (no key travels with a split row) the server links enough of it to gain too.
    assert attacks["linked_by_content"]["psnr_db"] > per_row + 1.0, attacks["linked_by_content"]


def test_split_linking_gains_nothing_when_each_image_is_sent_once(tmp_path: Path) -> None:
    """The client's default cap (one send's worth per image): 3 steps of 4 send each of the 12 images once at most."""
    _split_run(tmp_path / "run", steps=3, cut=CUT, seed=3, once=True)
    (group,) = _audit(tmp_path / "run")["groups"]
    attacks = _attacks(group)
    assert attacks["linked_by_image"]["max_rows_per_image"] == 1
    assert abs(attacks["linked_by_image"]["psnr_db"] - attacks["row_combined"]["psnr_db"]) < TOLERANCE_DB


# ---- 2. an inflated image spec ----------------------------------------------------------------------------------


def _resize(native: int, served: int) -> np.ndarray:
    """(served, native): PIL's bicubic resize of each unit line (the attacker knows the client's loader)."""
    lines = Image.fromarray(np.eye(native, dtype=np.float32), mode="F").resize((served, native), Image.Resampling.BICUBIC)
    return np.asarray(lines, dtype=np.float64).T


@pytest.mark.parametrize("served", [(3, 16, 16), (1, 64, 64), (3, 128, 128)])
def test_an_inflated_spec_is_audited_at_native_resolution(tmp_path: Path, served: tuple[int, int, int]) -> None:
    run = tmp_path / "run"
    _, labels = _twelve_digits(run)
    native = load_image_folder(_shard(run), 1, None).images.double().numpy()
    # The old client converted its images to the served spec and released them at the cut.
    images = load_image_folder(_shard(run), served[0], served[1]).images.double()
    ab = float(AB[CUT])
    x_cut = math.sqrt(ab) * images + math.sqrt(1 - ab) * _noise(tuple(images.shape), 1)
    write_transcript(run, _release_lines(x_cut, sorted(labels.tolist()), CUT))
    # The attack: least squares back to 16x16 grey (channel mean, a pseudo-inverse per side).
    y = x_cut.numpy().mean(axis=1) / math.sqrt(ab)
    inverse = np.linalg.pinv(_resize(16, served[1]))
    attack = _psnr(np.einsum("ij,njk,lk->nil", inverse, y, inverse)[:, None], native)
    one_look = _psnr(native + math.sqrt((1 - ab) / ab) * _noise(native.shape, 2).numpy(), native)
    assert attack > one_look + 3.0  # the attack is real: each native pixel is seen 3 to 193 times
    (group,) = _audit(run)["groups"]
    assert group["native"]["native_shape"] == [1, 16, 16] and group["native"]["look_gain"] > 2.5
    assert _figure(group) >= attack - TOLERANCE_DB, (group["best_actual"], attack)
    assert _attacks(group)["linear_native"]["psnr_db"] >= attack - TOLERANCE_DB
    # Held against the client's floor per native pixel, such payloads carry less noise than it allows.
    assert group["noise_check"]["less_noisy_than_declared"] >= 10 or group["noise_check"]["group_less_noisy"]


# ---- 3. augmented copies ----------------------------------------------------------------------------------------

Pixels = np.ndarray  # (16, 16), float in [-1, 1]


def _shifted(p: Pixels, dy: int, dx: int) -> Pixels:
    """out[y, x] = p[y - dy, x - dx], the edge repeated (an augmentation)."""
    padded = np.pad(p, 4, mode="edge")
    return padded[4 - dy:4 - dy + 16, 4 - dx:4 - dx + 16]


# name -> (augmentation, its inverse onto the original's frame, NaN where the copy has no pixel of it)
def _moved(dy: int, dx: int) -> Callable[[Pixels], Pixels]:
    def undo(a: Pixels) -> Pixels:
        out = np.full_like(a, np.nan)
        out[max(0, -dy):16 + min(0, -dy), max(0, -dx):16 + min(0, -dx)] = a[max(0, dy):16 + min(0, dy), max(0, dx):16 + min(0, dx)]
        return out
    return undo


COPIES: dict[str, tuple[Callable[[Pixels], Pixels], Callable[[Pixels], Pixels]]] = {
    "original": (lambda p: p, lambda a: a),
    "rot90": (lambda p: np.rot90(p, 1), lambda a: np.rot90(a, -1)),
    "rot180": (lambda p: np.rot90(p, 2), lambda a: np.rot90(a, 2)),
    "rot270": (lambda p: np.rot90(p, 3), lambda a: np.rot90(a, 1)),
    "flip_lr": (np.fliplr, np.fliplr),
    "flip_ud": (np.flipud, np.flipud),
    "transpose": (lambda p: p.T, lambda a: a.T),
    "transverse": (lambda p: np.rot90(p, 2).T, lambda a: np.rot90(a.T, 2)),
    "shift_0_1": (lambda p: _shifted(p, 0, 1), _moved(0, 1)),
    "shift_-2_1": (lambda p: _shifted(p, -2, 1), _moved(-2, 1)),
    "noise4": (lambda p: np.clip(p + np.random.default_rng(0).normal(0, 4 / 127.5, p.shape), -1, 1), lambda a: a),
}


def _into(name: str, a: Pixels) -> Pixels:
    """A look in the original's frame moved into copy ``name``'s frame (NaN stays NaN, nothing is made up)."""
    augment = COPIES[name][0]
    if name.startswith("shift"):
        dy, dx = (int(v) for v in name.split("_")[1:])
        out = np.full_like(a, np.nan)
        out[max(0, dy):16 + min(0, dy), max(0, dx):16 + min(0, dx)] = a[max(0, -dy):16 + min(0, -dy), max(0, -dx):16 + min(0, -dx)]
        return out
    return np.asarray(augment(a), dtype=np.float64)


def test_augmented_copies_are_aligned_and_averaged(tmp_path: Path) -> None:
    run = tmp_path / "run"
    images, labels = digits_arrays(16)
    quantized = np.round((images[:, 0] + 1) * 127.5) / 127.5 - 1
    target = quantized[0]
    names = list(COPIES)
    # 8-bit copies, as files are: an image and its eleven copies, and four other digits.
    copies = [np.round((COPIES[n][0](target) + 1) * 127.5) / 127.5 - 1 for n in names]
    others = [quantized[i] for i in (1, 2, 3, 4)]
    for k, pixels in enumerate(copies):
        save_png(pixels[None], _shard(run) / "0" / f"a{k:02d}_{names[k]}.png")
    for k, pixels in enumerate(others):
        save_png(pixels[None], _shard(run) / str(labels[1 + k]) / f"b{k}.png")
    data = load_image_folder(_shard(run), 1, 16)
    x0 = data.images.double()
    assert np.allclose(x0[:len(names), 0].numpy(), np.stack(copies), atol=1e-6)  # files in this order
    ab = float(AB[CUT])
    x_cut = math.sqrt(ab) * x0 + math.sqrt(1 - ab) * _noise(tuple(x0.shape), 4)  # each released, fresh noise
    write_transcript(run, _release_lines(x_cut, [int(c) for c in data.class_names], CUT))
    # The attack: every copy undone onto the original, moved into each copy's frame, averaged where defined.
    looks = x_cut[:, 0].numpy() / math.sqrt(ab)
    in_original = np.stack([COPIES[n][1](looks[k]) for k, n in enumerate(names)])
    estimates = [np.nanmean(np.stack([looks[k]] + [_into(n, a) for j, a in enumerate(in_original) if j != k]), axis=0)
                 for k, n in enumerate(names)]
    estimates += [looks[k] for k in range(len(names), len(looks))]
    attack = _psnr(np.stack(estimates)[:, None], x0.numpy())
    alone = _psnr(looks[:, None], x0.numpy())
    assert attack > alone + 3.0, (attack, alone)  # (the four other digits, one look each, pooled in)
    (group,) = _audit(run)["groups"]
    copies_entry = _attacks(group)["copies_aligned_mean"]
    assert _figure(group) >= attack - TOLERANCE_DB, (group["best_actual"], attack)
    assert copies_entry["psnr_db"] >= attack - TOLERANCE_DB, (copies_entry, attack)
    assert group["copies"]["largest_group"] == len(names), group["copies"]
    assert abs(_attacks(group)["linear"]["psnr_db"] - alone) < TOLERANCE_DB


# ---- 4. the client's own floor, not the server's schedule --------------------------------------------------------


@pytest.mark.parametrize("with_ledger", [True, False])
def test_payloads_are_checked_against_the_clients_own_floor(tmp_path: Path, with_ledger: bool) -> None:
    """An old client obeyed a server that served tiny betas: its "cut 200" is an almost clean image. Honest to the
    server's schedule, far below the client's floor (cut 200 under its reference schedule)."""
    run = tmp_path / "run"
    _, labels = _twelve_digits(run)
    x0 = load_image_folder(_shard(run), 1, 16).images.double()
    served = float(TINY.alphas_cumprod()[CUT])
    x_cut = math.sqrt(served) * x0 + math.sqrt(1 - served) * _noise(tuple(x0.shape), 5)
    write_transcript(run, _release_lines(x_cut, sorted(labels.tolist()), CUT))
    if with_ledger:
        with Ledger(run / "clients" / CLIENT) as ledger:  # it pinned the first schedule it met
            ledger.pin_schedule(TINY, served, f"cut {CUT} under the first schedule accepted", "srv")
    attack = _psnr((x_cut / math.sqrt(served)).numpy(), x0.numpy())
    (group,) = _audit(run)["groups"]
    check = group["noise_check"]
    assert check["less_noisy_than_declared"] == 12 and check["group_less_noisy"], check
    assert check["against"] == "the client's own floor per element"
    assert group["floor"]["alpha_bar_per_native_pixel"] == pytest.approx(float(AB[CUT]), rel=1e-4)
    if with_ledger:
        # The attack undoes the level the server's schedule gave (the client pinned it); against that level nothing
        # is flagged: that is the check the floor replaces.
        assert group["schedule_source"] == "client ledger (pinned)"
        assert group["level_check"]["less_noisy_than_declared"] == 0
        assert _figure(group) >= attack - TOLERANCE_DB and attack > 40, (group["best_actual"], attack)
    else:
        # Without a ledger the audit takes the client's floor settings as given; the client's own word that it
        # accepts such a level (--max-release-alpha-bar) clears the payloads.
        (accepted,) = _audit(run, "--max-release-alpha-bar", "0.99999")["groups"]
        assert accepted["noise_check"]["less_noisy_than_declared"] == 0, accepted["noise_check"]


def test_a_short_split_run_with_no_low_t_row_is_audited_and_drawn(tmp_path: Path) -> None:
    """One step of four rows may draw no t in the low band the grid shows first: the audit still completes and
    draws the run's rows (it crashed on an empty grid)."""
    from collafuse.evaluation.audit.split import LOW_BAND

    cut, T = 200, SCHEDULE.num_train_timesteps
    band = cut + max(1, round(LOW_BAND * (T - cut)))
    for seed in range(40):  # the first seed whose four rows all lie above the band
        run = tmp_path / f"run{seed}"
        _split_run(run, steps=1, cut=cut, seed=seed)
        (group,) = _audit(run)["groups"]
        if group["t"]["min"] > band:
            break
    else:
        pytest.fail("no seed drew four rows above the low band")
    assert (run / "audit_grid.png").stat().st_size > 0 and group["images"] == BATCH
