"""An image is its pixels (docs/design.md §7): the identity the ledger keys releases by, and near-duplicate
detection that holds under common augmentations.

A key comes from the released pixels (the decoded image at the server's size, quantised to 8 bits), never from
a file name or file bytes, so a renamed, moved, duplicated or losslessly re-encoded file is the same image and is
released once. Other copies have other pixels, and each release of a copy lets the server average its noise
away (the server can undo a flip or a shift as well as anyone). Two images are treated as one when, aligned,
they match to ``NEAR_DUPLICATE_PSNR_DB``; aligned means the best of

- the 8 flips and rotations (the dihedral group of the square) of one image, against
- the other shifted by up to ``MAX_SHIFT`` pixels (compared where both are defined), or a window of it of
  13 to 15 pixels of 16 (a crop) scaled back up (a small crop or rescale), either way round (a zoom-out is the
  original cropped from the copy);

compared in grey at ``COMPARE_SIDE`` x ``COMPARE_SIDE``. JPEG re-encodes, resizes from other resolutions, small
brightness shifts and light noise change few pixels, and the alignment search changes nothing for them.

``NEAR_DUPLICATE_PSNR_DB`` = 28 dB, measured on the bundled digits (1,797 distinct images, every pair searched;
tests/test_augmented_copies.py): 2 of them are flagged at 16x16 (0.11 %; three digits of the set alike to 28.5-30
dB) and 5 at their native 8x8 (0.28 %). Copies: flips, rotations and shifts match exactly, PIL crops of 13-15 of 16
pixels scaled back up >= 36 dB, torch bilinear ones >= 59 dB, zoom-outs to 14 pixels >= 33 dB, noise of 8/255 >= 30
dB, JPEG at quality 75 and +8/255 brightness caught too. The search is over all pairs (O(n^2); lower bounds from
block means skip most of it): about 11 s for the 1,797 on two CPU cores.

Against an image known only from the ledger (released earlier, no longer in the data folder) only its 64-bit
perceptual hash is there: a DCT hash of the image in its canonical orientation (the least of its 8 orientations'
hashes), so a flipped or rotated copy has the very same hash; within ``NEAR_DUPLICATE_BITS`` is a copy. Cautious
(a hash is coarse for tiny images: 13.5 % of the distinct digits have another within 6 bits), in place only for
shifts and crops, and said in the log. Hashes in ledgers written before hashes were canonical are compared as they
are (a flipped copy of such an image is caught only while the image is in --data).
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
COMPARE_SIDE = 16  # images are compared in grey at this side
MAX_SHIFT = 3  # pixels (at COMPARE_SIDE) either way
WINDOWS = (15, 14, 13)  # crops (at COMPARE_SIDE) scaled back up: magnifications 1.07 to 1.23
_CHUNK = 64  # reference images per block of the all-pairs search


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
        if self.psnr_db is not None:
            match = "identical" if math.isinf(self.psnr_db) else f"{self.psnr_db:.1f} dB"
            return (f"a near-duplicate of {self.of} ({match} once flipped, rotated, shifted or cropped to match it best; "
                    "a server can align them as well)")
        return (f"a near-duplicate of {self.of} (perceptual hash {self.bits}/64 bits apart, by hash alone: it is no "
                "longer in --data)")


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


def dihedral(images: torch.Tensor) -> torch.Tensor:
    """The 8 flips and rotations of square images (..., H, W): shape (8, ..., H, W), the identity first."""
    out = []
    for k in range(4):
        turned = torch.rot90(images, k, dims=(-2, -1))
        out += [turned, turned.flip(-1)]
    return torch.stack(out)


def perceptual_hash(images: torch.Tensor) -> list[int]:
    """pHash of each (C, H, W) image in its canonical orientation: 64 bits, one per low DCT frequency above the
    block's median, the least of the image's 8 orientations' hashes (so a flip or rotation hashes the same)."""
    if len(images) == 0:
        return []
    grey = quantize(images).double().mean(dim=1, keepdim=True)
    resized = F.interpolate(grey, size=(HASH_SIDE, HASH_SIDE), mode="bilinear", align_corners=False)[:, 0]
    weights = 1 << np.arange(HASH_BLOCK * HASH_BLOCK, dtype=np.uint64)
    per_orientation = []
    for turned in dihedral(resized):
        low = (_DCT @ turned @ _DCT.T)[:, :HASH_BLOCK, :HASH_BLOCK].reshape(len(images), -1)
        # The DC term (mean brightness) is left out of the median, as in pHash.
        bits = (low > low[:, 1:].median(dim=1, keepdim=True).values).numpy()
        per_orientation.append((bits * weights).sum(axis=1, dtype=np.uint64))
    return [int(h) for h in np.stack(per_orientation).min(axis=0)]


def hamming(hashes: np.ndarray, value: int) -> np.ndarray:
    """Bits differing between each of ``hashes`` (uint64) and ``value``."""
    xor = np.bitwise_xor(hashes, np.uint64(value))
    return np.unpackbits(xor.view(np.uint8).reshape(-1, 8), axis=1).sum(axis=1)


def psnr_db(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR of two images in [-1, 1] (peak-to-peak 2)."""
    mse = float(((a.double() - b.double()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(4.0 / mse)


def _grey(images: torch.Tensor) -> torch.Tensor:
    """(n, C, H, W) in [-1, 1] -> (n, COMPARE_SIDE, COMPARE_SIDE) grey, from the 8-bit pixels that are released."""
    grey = (quantize(images).double() / 127.5 - 1).mean(dim=1, keepdim=True)
    if grey.shape[-2:] != (COMPARE_SIDE, COMPARE_SIDE):
        grey = F.interpolate(grey, size=(COMPARE_SIDE, COMPARE_SIDE), mode="area" if grey.shape[-1] > COMPARE_SIDE
                             else "bilinear", **({} if grey.shape[-1] > COMPARE_SIDE else {"align_corners": False}))
    return grey[:, 0]


@dataclass(frozen=True)
class _Templates:
    """What an image is compared against: each shift (with the mask where it is defined) and each crop scaled up."""

    masks: torch.Tensor  # (M, S*S): one mask per template group (a shift; the crops share the full mask)
    groups: list[torch.Tensor]  # per mask: (n, K, S*S) templates of every image, zero outside the mask


def _templates(grey: torch.Tensor) -> _Templates:
    n, side = grey.shape[0], COMPARE_SIDE
    masks, groups = [], []
    padded = F.pad(grey, (MAX_SHIFT,) * 4)
    for dy in range(-MAX_SHIFT, MAX_SHIFT + 1):
        for dx in range(-MAX_SHIFT, MAX_SHIFT + 1):
            shifted = padded[:, MAX_SHIFT - dy:MAX_SHIFT - dy + side, MAX_SHIFT - dx:MAX_SHIFT - dx + side]
            mask = torch.zeros(side, side, dtype=torch.float64)
            mask[max(0, dy):side + min(0, dy), max(0, dx):side + min(0, dx)] = 1
            masks.append(mask.flatten())
            groups.append((shifted * mask).reshape(n, 1, -1))
    crops = []
    for w in WINDOWS:
        for oy in range(side - w + 1):
            for ox in range(side - w + 1):
                window = grey[:, None, oy:oy + w, ox:ox + w]
                for mode in ("bicubic", "bilinear"):  # the two usual ways back up (PIL's and torch's defaults)
                    crops.append(F.interpolate(window, size=(side, side), mode=mode, align_corners=False).reshape(n, -1))
    masks.append(torch.ones(side * side, dtype=torch.float64))
    groups.append(torch.stack(crops, dim=1))
    return _Templates(torch.stack(masks), groups)


def aligned_mse(images: torch.Tensor, threshold_db: float | None = None) -> torch.Tensor:
    """(n, n) matrix, symmetric: the least mean squared error of images i and j over the alignments of the module
    docstring (8 orientations of one, shifts and crops of the other, either way round), in [-1, 1] units.

    ``threshold_db``: only errors that reach it are computed exactly; the rest are reported as infinite. Lower
    bounds from 4x4 and then 2x2 block means (never above the error) decide which, which keeps the all-pairs
    search affordable.
    """
    n = len(images)
    out = torch.full((n, n), math.inf, dtype=torch.float64)
    if n < 2:
        return out
    grey = _grey(images).float()
    turned = dihedral(grey).permute(1, 0, 2, 3).reshape(n * 8, -1)  # queries: image i in orientation g at 8i + g
    templates = _templates(grey)
    bound = math.inf if threshold_db is None else 4.0 / 10 ** (threshold_db / 10)
    flat = out.view(-1)
    for mask, group in zip(templates.masks.float(), templates.groups):
        q = turned * mask  # (8n, D)
        area = float(mask.sum())
        coarse = [_Blocks(q, mask, 4), _Blocks(q, mask, 2)]
        for start in range(0, n, _CHUNK):
            t = group[start:start + _CHUNK].float()  # (r, K, D)
            r, k, col = coarse[0].candidates(t, bound, area)  # all (template, query) pairs whose bound passes
            if math.isfinite(bound):
                r, k, col = coarse[1].refine(t, r, k, col, bound, area)
            if len(r) == 0:
                continue
            mse = (t[r, k] - q[col]).pow(2).sum(-1) / area
            index = (r + start) * n + torch.div(col, 8, rounding_mode="floor")
            flat.scatter_reduce_(0, index, mse.double(), reduce="amin")
    out = torch.minimum(out, out.T)  # either way round
    out.fill_diagonal_(math.inf)
    out[out > bound] = math.inf
    return out


class _Blocks:
    """A lower bound of the masked squared error from sums over b x b blocks (Cauchy-Schwarz per block)."""

    def __init__(self, q: torch.Tensor, mask: torch.Tensor, block: int) -> None:
        self.block = block
        self.count = self.pool(mask[None])[0].clamp_min(1e-12)
        self.q = self.pool(q)
        self.q_sq = (self.q.pow(2) / self.count).sum(-1)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        side, b = COMPARE_SIDE, self.block
        return F.avg_pool2d(x.reshape(-1, 1, side, side), b).reshape(*x.shape[:-1], -1) * (b * b)

    def candidates(self, t: torch.Tensor, bound: float, area: float) -> tuple[torch.Tensor, ...]:
        """(ref, template, query) index triples whose bound is within ``bound`` (all of them when it is infinite)."""
        r, k = t.shape[:2]
        if math.isinf(bound):
            rows, col = torch.meshgrid(torch.arange(r * k), torch.arange(self.q.shape[0]), indexing="ij")
            rows, col = rows.flatten(), col.flatten()
        else:
            pooled = self.pool(t).reshape(r * k, -1)
            # |a - q|^2 / count summed over blocks, compared without forming it: q_sq - 2 a.q/count <= limit - a_sq.
            scores = torch.addmm(self.q_sq[None], pooled / self.count, self.q.T, alpha=-2)
            limit = (bound * (1 + 1e-4) + 1e-6) * area - (pooled.pow(2) / self.count).sum(-1)
            rows, col = (scores <= limit[:, None]).nonzero(as_tuple=True)
        return torch.div(rows, k, rounding_mode="floor"), rows % k, col

    def refine(self, t: torch.Tensor, r: torch.Tensor, k: torch.Tensor, col: torch.Tensor, bound: float,
               area: float) -> tuple[torch.Tensor, ...]:
        pooled = self.pool(t)[r, k]
        low = ((pooled - self.q[col]).pow(2) / self.count).sum(-1) / area
        keep = low <= bound * (1 + 1e-4) + 1e-6
        return r[keep], k[keep], col[keep]


def find_copies(
    ids: Sequence[ImageIdentity], images: torch.Tensor, released: Mapping[str, int]
) -> dict[int, Copy]:
    """Index -> ``Copy`` for every image that must not be released because another one stands for it.

    ``released`` maps each key the ledger has seen leave (any server, any level, acknowledged or
    not) to its hash. An image whose own key is there is left to the ledger's rules (same bytes
    again, or another level); the others are copies when they repeat an earlier image of ``ids``
    (same key), or are near-duplicates of a released image or of an earlier image of ``ids``
    (aligned, module docstring).
    """
    position: dict[str, int] = {}
    for i, ident in enumerate(ids):
        position.setdefault(ident.key, i)
    # Released images no longer in ``ids`` are known by their hash alone.
    old_keys = [k for k in released if k not in position]
    old_hashes = np.array([released[k] for k in old_keys], dtype=np.uint64)
    firsts = sorted(set(position.values()))
    mse = aligned_mse(images[firsts], NEAR_DUPLICATE_PSNR_DB) if len(firsts) > 1 else None
    row = {i: k for k, i in enumerate(firsts)}
    # A group of copies is one image however it is reached: a copy of a copy (a crop of a flipped image, say, next
    # to a shifted one) is a copy too. Each group stands for itself through its first image.
    group: dict[int, int] = {}  # image -> the image that stands for its group
    copies: dict[int, Copy] = {}
    for i, ident in enumerate(ids):
        first = position[ident.key]
        if first != i:
            copies[i] = Copy(ids[first].name(), 0, exact=True)
            continue
        found = None
        if mse is not None:
            earlier = [j for j in firsts if j < i]
            errors = mse[row[i], [row[j] for j in earlier]] if earlier else torch.empty(0)
            if len(errors) and math.isfinite(float(errors.min())):
                j = earlier[int(errors.argmin())]
                error = float(errors.min())
                quality = math.inf if error == 0 else 10 * math.log10(4.0 / error)
                stands = group[j]
                via = "" if stands == j else f", via {ids[j].name()}"
                found = Copy(ids[stands].name() + via, int(hamming(np.array([ids[j].phash], dtype=np.uint64), ident.phash)[0]),
                             exact=False, psnr_db=quality)
                group[i] = stands
        if ident.key in released:
            group.setdefault(i, i)
            continue  # released before: the ledger's rules decide (same bytes again, or another level)
        if found is None and len(old_hashes):
            distances = hamming(old_hashes, ident.phash)
            j = int(distances.argmin())
            if distances[j] <= NEAR_DUPLICATE_BITS:
                found = Copy(f"image {old_keys[j][:12]}… (released earlier)", int(distances[j]), exact=False)
        if found is None:
            group[i] = i
        else:
            group.setdefault(i, i)
            copies[i] = found
    return copies
