"""An image is its pixels (docs/design.md §7): the identity the ledger keys releases by, and near-duplicate
detection.

A key comes from the released pixels (the decoded image at the server's size, quantised to
8 bits), never from a file name or file bytes, so a renamed, moved, duplicated or losslessly
re-encoded file is the same image and is released once. A lossy copy (JPEG re-encode, a
resize from another resolution, a brightness shift) has other pixels: it is caught as a
*near-duplicate* by a 64-bit DCT perceptual hash of the released pixels, and is not released
either, because averaging the releases of two copies lowers their noise by about 3 dB.

Thresholds, measured on the bundled 8x8 digits at 16x16 (1,797 images; JPEG quality 50/75,
40->16 px resizes and +10/255 brightness shifts of 400 of them):

- ``NEAR_DUPLICATE_BITS`` = 6 of 64: every such copy hashes within 6 bits of its original.
  The hash alone is too coarse for tiny images (21 % of distinct digits have another digit
  within 6 bits), so where both images are at hand the pair must also match in pixels:
- ``NEAR_DUPLICATE_PSNR_DB`` = 28 dB: every copy above is >= 28.1 dB from its original; distinct
  digits' nearest neighbours are below 24.6 dB for 99 % of them (the closest pair: 30 dB, which
  is then treated as one image).

Against an image known only from the ledger (released earlier, no longer in the data folder)
only the hash is there to compare, so the 6-bit test alone decides: cautious, and said in the log.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

HASH_SIDE = 32  # images are resized to 32x32 before the DCT (pHash's usual size)
HASH_BLOCK = 8  # the 8x8 lowest frequencies give the 64 bits
NEAR_DUPLICATE_BITS = 6
NEAR_DUPLICATE_PSNR_DB = 28.0


@dataclass(frozen=True)
class ImageIdentity:
    """One image as the ledger knows it: its pixel key, perceptual hash and (for messages only) its path."""

    key: str
    phash: int
    path: str | None = None

    def name(self) -> str:
        return self.path or f"image {self.key[:12]}…"


@dataclass(frozen=True)
class Copy:
    """Why an image is not released: it is ``of`` (a path or key) again, at ``bits`` Hamming distance."""

    of: str
    bits: int
    exact: bool
    psnr_db: float | None = None  # None: compared by hash alone (the other image is known only from the ledger)

    def describe(self) -> str:
        if self.exact:
            return f"the same pixels as {self.of}"
        how = f", {self.psnr_db:.1f} dB" if self.psnr_db is not None else ", by hash alone: it is no longer in --data"
        return f"a near-duplicate of {self.of} (perceptual hash {self.bits}/64 bits apart{how})"


def quantize(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] as the 8-bit pixels they were decoded from (uint8, same shape)."""
    return ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def pixel_message(image: torch.Tensor) -> bytes:
    """The bytes an image key is an HMAC of: shape and 8-bit pixels of one (C, H, W) image."""
    pixels = quantize(image).contiguous()
    return ("x".join(map(str, pixels.shape)) + "\0").encode() + pixels.numpy().tobytes()


def _dct_matrix(n: int) -> torch.Tensor:
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None]
    m = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2 / n)
    m[0] /= math.sqrt(2)
    return m


_DCT = _dct_matrix(HASH_SIDE)


def perceptual_hash(images: torch.Tensor) -> list[int]:
    """pHash of each (C, H, W) image: 64 bits, one per low DCT frequency above the block's median."""
    if len(images) == 0:
        return []
    grey = quantize(images).double().mean(dim=1, keepdim=True)
    resized = F.interpolate(grey, size=(HASH_SIDE, HASH_SIDE), mode="bilinear", align_corners=False)[:, 0]
    low = (_DCT @ resized @ _DCT.T)[:, :HASH_BLOCK, :HASH_BLOCK].reshape(len(images), -1)
    # The DC term (mean brightness) is left out of the median, as in pHash.
    bits = low > low[:, 1:].median(dim=1, keepdim=True).values
    weights = 1 << np.arange(HASH_BLOCK * HASH_BLOCK, dtype=np.uint64)
    return [int((weights[row]).sum(dtype=np.uint64)) for row in bits.numpy()]


def hamming(hashes: np.ndarray, value: int) -> np.ndarray:
    """Bits differing between each of ``hashes`` (uint64) and ``value``."""
    xor = np.bitwise_xor(hashes, np.uint64(value))
    return np.unpackbits(xor.view(np.uint8).reshape(-1, 8), axis=1).sum(axis=1)


def psnr_db(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR of two images in [-1, 1] (peak-to-peak 2)."""
    mse = float(((a.double() - b.double()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(4.0 / mse)


def find_copies(
    ids: Sequence[ImageIdentity], images: torch.Tensor, released: Mapping[str, int]
) -> dict[int, Copy]:
    """Index -> ``Copy`` for every image that must not be released because another one stands for it.

    ``released`` maps each key the ledger has seen leave (any server, any level, acknowledged or
    not) to its hash. An image whose own key is there is left to the ledger's rules (same bytes
    again, or another level); the others are copies when they repeat an earlier image of ``ids``
    (same key), or are near-duplicates of a released image or of an earlier image of ``ids``.
    """
    position: dict[str, int] = {}
    for i, ident in enumerate(ids):
        position.setdefault(ident.key, i)
    # Released images no longer in ``ids`` are known by their hash alone.
    old_keys = [k for k in released if k not in position]
    old_hashes = np.array([released[k] for k in old_keys], dtype=np.uint64)
    kept: list[int] = []  # images of ``ids`` that stand for themselves (released before, or to be released)
    copies: dict[int, Copy] = {}
    for i, ident in enumerate(ids):
        first = position[ident.key]
        if first != i:
            copies[i] = Copy(ids[first].name(), 0, exact=True)
            continue
        if ident.key in released:
            kept.append(i)
            continue
        found = _near_in_batch(i, ids, images, kept)
        if found is None and len(old_hashes):
            distances = hamming(old_hashes, ident.phash)
            j = int(distances.argmin())
            if distances[j] <= NEAR_DUPLICATE_BITS:
                found = Copy(f"image {old_keys[j][:12]}… (released earlier)", int(distances[j]), exact=False)
        if found is None:
            kept.append(i)
        else:
            copies[i] = found
    return copies


def _near_in_batch(i: int, ids: Sequence[ImageIdentity], images: torch.Tensor, kept: Sequence[int]) -> Copy | None:
    if not kept:
        return None
    distances = hamming(np.array([ids[j].phash for j in kept], dtype=np.uint64), ids[i].phash)
    for n in np.argsort(distances, kind="stable"):
        if distances[n] > NEAR_DUPLICATE_BITS:
            break
        j = kept[int(n)]
        quality = psnr_db(images[i], images[j])
        if quality >= NEAR_DUPLICATE_PSNR_DB:
            return Copy(ids[j].name(), int(distances[n]), exact=False, psnr_db=quality)
    return None
