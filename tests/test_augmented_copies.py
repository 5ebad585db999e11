"""Copies under common augmentations are one image (issue 15, client/image_identity.py).

Flipped, rotated, shifted, cropped-and-rescaled and lightly noised copies have other pixels than their original;
released with fresh noise each, a server that aligns them (it can undo a flip or a shift as well as anyone) averages
the noise away: 11 copies of a digit took one release at cut 200 from 11.6 dB to 21.0 dB. The client now searches the
alignments itself (8 orientations, shifts of up to 3 pixels, crops of 13-15 of 16 pixels scaled back up, either way
round) and releases such a group once.

Measured on scikit-learn's 1,797 digits at 16x16 grey (all distinct images; every pair searched, 28 dB):
false positives 2 of 1,797 images (0.11 %: three digits of the set that are alike to 28.5-30 dB, the closest pair of
which was already treated as one image in place); every copy below is caught (the weakest: 8/255 noise, 30 dB;
zoom-outs 33 dB; PIL crops 36 dB). The all-pairs search over the 1,797 takes about 11 s on two cores.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from client_fake_server import FakeServer, FakeServicer, FakeState
from PIL import Image

from collafuse.client.image_identity import (
    NEAR_DUPLICATE_PSNR_DB,
    ImageIdentity,
    aligned_mse,
    find_copies,
    perceptual_hash,
    psnr_db,
)
from collafuse.client.lifecycle import ClientLifecycle
from collafuse.client.protocols.ambient import ReleaseReport
from collafuse.common.codec import decode
from collafuse.common.config import ClientSettings
from collafuse.common.diffusion import release
from collafuse.common.schedule import ScheduleConfig
from collafuse.evaluation.data.digits import digits_arrays

torch.set_num_threads(1)
SCHEDULE = ScheduleConfig()  # T = 1000
CUT = 200
Pixels = np.ndarray  # (16, 16) uint8


def _shift(dy: int, dx: int) -> Callable[[Pixels], Pixels]:
    def move(p: Pixels) -> Pixels:
        padded = np.pad(p, 4, mode="edge")
        return padded[4 - dy:4 - dy + 16, 4 - dx:4 - dx + 16]
    return move


def _crop(size: int, oy: int, ox: int) -> Callable[[Pixels], Pixels]:
    def crop(p: Pixels) -> Pixels:
        return np.asarray(Image.fromarray(p).crop((ox, oy, ox + size, oy + size)).resize((16, 16), Image.Resampling.BICUBIC))
    return crop


def _noise(std: float, seed: int) -> Callable[[Pixels], Pixels]:
    def noisy(p: Pixels) -> Pixels:
        rng = np.random.default_rng(seed)
        return np.clip(p + rng.normal(0, std, p.shape), 0, 255).round().astype(np.uint8)
    return noisy


def _zoom_out(size: int) -> Callable[[Pixels], Pixels]:
    def zoom(p: Pixels) -> Pixels:
        canvas = Image.new("L", (16, 16), 0)
        canvas.paste(Image.fromarray(p).resize((size, size), Image.Resampling.BICUBIC), ((16 - size) // 2,) * 2)
        return np.asarray(canvas)
    return zoom


def _jpeg(quality: int) -> Callable[[Pixels], Pixels]:
    def jpeg(p: Pixels) -> Pixels:
        buffer = io.BytesIO()
        Image.fromarray(p).save(buffer, "JPEG", quality=quality)
        return np.asarray(Image.open(buffer).convert("L"))
    return jpeg


# The eleven: the 7 other flips and rotations, small shifts, a crop scaled back up, light noise.
ELEVEN: dict[str, Callable[[Pixels], Pixels]] = {
    "rot90": lambda p: np.rot90(p, 1), "rot180": lambda p: np.rot90(p, 2), "rot270": lambda p: np.rot90(p, 3),
    "flip_lr": np.fliplr, "flip_ud": np.flipud, "transpose": lambda p: p.T, "transverse": lambda p: np.rot90(p, 2).T,
    "shift_1px": _shift(0, 1), "shift_-2_1": _shift(-2, 1), "crop14": _crop(14, 1, 1), "noise4": _noise(4.0, 0),
}
MORE: dict[str, Callable[[Pixels], Pixels]] = {
    "shift_3_0": _shift(3, 0), "shift_0_-3": _shift(0, -3), "shift_2_2": _shift(2, 2), "crop15": _crop(15, 0, 1),
    "crop13": _crop(13, 1, 2), "crop14_corner": _crop(14, 0, 2), "zoom_out14": _zoom_out(14), "noise8": _noise(8.0, 1),
    "jpeg75": _jpeg(75), "brighter8": lambda p: np.clip(p.astype(int) + 8, 0, 255).astype(np.uint8),
    "flip_shift_noise": lambda p: _noise(4.0, 2)(_shift(1, -1)(np.fliplr(p))),
    "rot_crop": lambda p: _crop(14, 1, 0)(np.rot90(p, 2)),
}


def _digits() -> tuple[np.ndarray, np.ndarray]:
    images, labels = digits_arrays(16)
    return np.clip((images[:, 0] + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8), labels


def _tensor(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(pixels, dtype=np.float32)).reshape(-1, 1, 16, 16) / 127.5 - 1


def _ids(images: torch.Tensor) -> list[ImageIdentity]:
    return [ImageIdentity(f"key{i}", h) for i, h in enumerate(perceptual_hash(images))]


class KeepingServicer(FakeServicer):
    """A curious server: keeps every release it is sent (its transcript), as FakeServicer does."""


def _released(server: FakeServer) -> dict[str, torch.Tensor]:
    return {item.image_key: decode(item.x_cut, what="x_cut") for chunk in server.servicer.transcript for item in chunk.items}


def test_an_image_and_its_eleven_augmented_copies_go_out_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pixels, _ = _digits()
    target = pixels[0]
    others = [pixels[i] for i in (1, 2, 3, 4)]  # distinct digits: they must still go out
    for folder in ("0", "1"):
        (tmp_path / "data" / folder).mkdir(parents=True)
    for name, pixels_of in [("original", target), *((n, f(target)) for n, f in ELEVEN.items())]:
        Image.fromarray(np.ascontiguousarray(pixels_of)).save(tmp_path / "data" / "0" / f"{name}.png")
    for k, p in enumerate(others):
        Image.fromarray(p).save(tmp_path / "data" / "1" / f"other{k}.png")
    state = FakeState(schedule=SCHEDULE, image_shape=(1, 16, 16), classes=tuple(str(c) for c in range(10)))
    with FakeServer(servicer=KeepingServicer(state)) as server:
        settings = ClientSettings(data=tmp_path / "data", server=server.target, workdir=tmp_path / "work", cut=CUT,
                                  retries=2, rpc_timeout=10, device="cpu")
        with ClientLifecycle(settings) as client:
            report = client.contribute()
        received = _released(server)
    assert isinstance(report, ReleaseReport)
    assert (report.images, report.copies, report.sent) == (16, 11, 5)
    assert caplog.text.count("not releasing 0/") == 11
    group = {"original": target, **{n: f(target) for n, f in ELEVEN.items()}}
    with ClientLifecycle(settings) as client:
        keys = dict(zip(group, client.ledger.image_keys(_tensor(np.stack(list(group.values()))))))
        other_keys = set(client.ledger.image_keys(_tensor(np.stack(others))))
    sent = [name for name, key in keys.items() if key in received]
    assert len(sent) == 1 and set(received) == {keys[sent[0]]} | other_keys  # the group once, the four others
    # What reached the server of the group, aligned (a server undoes each augmentation exactly) and averaged: one
    # release, so averaging gains nothing over the one honest look.
    ab = float(SCHEDULE.alphas_cumprod()[CUT])
    x0 = _tensor(group[sent[0]])[0].double()
    looks = [received[keys[name]].double() / math.sqrt(ab) for name in sent]
    one = psnr_db(looks[0].clamp(-1, 1), x0)
    assert psnr_db(torch.stack(looks).mean(0).clamp(-1, 1), x0) - one < 1.0
    # The old path: all twelve released with fresh noise, undone and averaged (the crop left out): about +10 dB.
    names = [n for n in group if n != "crop14"]
    noisy = release(_tensor(np.stack([group[n] for n in names])), list(range(1, len(names) + 1)), CUT,
                    SCHEDULE.alphas_cumprod())
    undone = np.stack([_undo(n, x[0].double().numpy()) for n, x in zip(names, noisy)])
    averaged = torch.from_numpy(np.nanmean(undone, axis=0))[None] / math.sqrt(ab)
    truth = _tensor(target)[0].double()
    alone = psnr_db((noisy[0].double() / math.sqrt(ab)).clamp(-1, 1), truth)
    assert psnr_db(averaged.clamp(-1, 1), truth) - alone > 8.0


def _undo(name: str, x: np.ndarray) -> np.ndarray:
    """A server's exact inverse of each augmentation (NaN where a shift brought in no pixel of the original)."""
    inverse: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        "original": lambda a: a, "rot90": lambda a: np.rot90(a, -1), "rot180": lambda a: np.rot90(a, 2),
        "rot270": lambda a: np.rot90(a, 1), "flip_lr": np.fliplr, "flip_ud": np.flipud, "transpose": lambda a: a.T,
        "transverse": lambda a: np.rot90(a.T, 2), "noise4": lambda a: a,
    }
    if name in inverse:
        return inverse[name](x).astype(np.float64)
    dy, dx = {"shift_1px": (0, 1), "shift_-2_1": (-2, 1)}[name]
    out = np.full_like(x, np.nan, dtype=np.float64)
    out[max(0, -dy):16 + min(0, -dy), max(0, -dx):16 + min(0, -dx)] = x[max(0, dy):16 + min(0, dy), max(0, dx):16 + min(0, dx)]
    return out


def test_every_common_augmentation_is_caught_and_distinct_images_are_not() -> None:
    """40 digits, then a copy of each under every augmentation above: each copy is found, each original kept."""
    pixels, _ = _digits()
    originals = pixels[np.random.default_rng(0).permutation(len(pixels))[:40]]
    kinds = {**ELEVEN, **MORE}
    for name, augment in kinds.items():
        batch = _tensor(np.concatenate([originals, np.stack([augment(p) for p in originals])]))
        copies = find_copies(_ids(batch), batch, {})
        assert sorted(copies) == list(range(40, 80)), (name, sorted(set(range(40, 80)) - set(copies)))
        assert all(copies[40 + i].of == f"image key{i}…" for i in range(40)), name


def test_the_search_bound_drops_nothing_within_the_threshold() -> None:
    """The block-mean lower bounds only skip pairs that cannot reach the threshold: same result as the full search."""
    pixels, _ = _digits()
    some = pixels[:24]
    batch = _tensor(np.concatenate([some, [f(some[0]) for f in ELEVEN.values()], [_crop(13, 1, 2)(some[1])]]))
    full, fast = aligned_mse(batch), aligned_mse(batch, NEAR_DUPLICATE_PSNR_DB)
    bound = 4.0 / 10 ** (NEAR_DUPLICATE_PSNR_DB / 10)
    within = full <= bound
    assert int(within.sum()) >= 2 * 13 and torch.equal(within, torch.isfinite(fast))
    assert torch.allclose(fast[within], full[within], rtol=1e-4, atol=1e-7)


def test_false_positives_on_distinct_digits_subset() -> None:
    pixels, _ = _digits()
    batch = _tensor(pixels[:400])
    copies = find_copies(_ids(batch), batch, {})
    assert len(copies) <= 2, {i: c.describe() for i, c in copies.items()}


@pytest.mark.slow
def test_false_positive_rate_on_all_1797_digits() -> None:
    """Every pair of the 1,797 distinct digits at 16x16 searched: at most 0.2 % flagged (measured: 2, 0.11 %)."""
    pixels, _ = _digits()
    batch = _tensor(pixels)
    copies = find_copies(_ids(batch), batch, {})
    assert len(copies) / len(batch) <= 0.002, {i: c.describe() for i, c in copies.items()}


def test_a_flipped_copy_of_an_image_released_earlier_is_caught_by_hash_alone() -> None:
    """The original has left the data folder; the ledger holds its hash, canonical over the 8 orientations."""
    pixels, _ = _digits()
    original = _tensor(pixels[7])
    for name in ("rot90", "flip_lr", "transverse", "noise4"):
        copy = _tensor(ELEVEN[name](pixels[7]))
        if name != "noise4":
            assert perceptual_hash(copy) == perceptual_hash(original), name
        found = find_copies(_ids(copy), copy, {"released-key": perceptual_hash(original)[0]})
        assert 0 in found and found[0].psnr_db is None and "released earlier" in found[0].of, name
