"""Copies of one image that reached the server, aligned and averaged (client/image_identity.py, docs/design.md §7).

Released with fresh noise each, copies of an image let the server average the noise away: the same image released
again (at another level, after a forget, under another key), and augmented copies, which a server undoes as well as
anyone (a flip or rotation, a shift). For every payload the audit finds the other payloads of the same client that
are copies of its image, undoes each one's transform and takes the inverse-variance mean of the aligned linear looks
x / sqrt(ab) (precision ab / (1 - ab) per pixel; a shifted copy only where it has pixels), in the payload's own frame.

Which payloads are copies, and the transform of each, are found on the client's own images (the audit's truth):
candidates are the pairs the client's own copy search links (``aligned_mse`` at ``NEAR_DUPLICATE_PSNR_DB``: flips,
rotations, shifts, crops), and each candidate's transform is the best of the 8 flips and rotations times every
shift of up to ``max_shift`` pixels at the served side, matched on the images. A copy that no such transform aligns
to ``NEAR_DUPLICATE_PSNR_DB`` (a crop scaled back up) is left out of the mean. With exact transforms this is an
upper bound on a server that searches them on its noisy looks.

Two payloads of the very same image at two levels are also solved as if their noise were one (``two_level``): exact
when a client reused the noise, noisier than one look when it did not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from collafuse.client.image_identity import COMPARE_SIDE, MAX_SHIFT, NEAR_DUPLICATE_PSNR_DB, aligned_mse
from collafuse.evaluation.audit.attacks import two_level

MAX_SEARCH = 3e7  # transforms x elements compared per pair at most (the shift range shrinks for large images)


def max_shift(shape: tuple[int, ...]) -> int:
    """The client's shift range (MAX_SHIFT at COMPARE_SIDE) at the served side, bounded so that a pair's search
    stays below MAX_SEARCH comparisons."""
    side = max(shape[-2:])
    d = math.prod(shape)
    shift = math.ceil(MAX_SHIFT * side / COMPARE_SIDE)
    while shift > 0 and 8 * (2 * shift + 1) ** 2 * d > MAX_SEARCH:
        shift -= 1
    return shift


def orient(image: torch.Tensor, g: int) -> torch.Tensor:
    """The g-th of the 8 flips and rotations of (C, H, W) (client/image_identity.py's order: rot90^(g//2), then a
    left-right flip for odd g)."""
    turned = torch.rot90(image, g // 2, dims=(-2, -1))
    return turned.flip(-1) if g % 2 else turned


def _orientations(shape: tuple[int, ...]) -> list[int]:
    # A non-square image keeps its shape only under the identity, the flips and the half turn.
    return list(range(8)) if shape[-1] == shape[-2] else [0, 1, 4, 5]


def shifted(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """out[y, x] = image[y + dy, x + dx], NaN where that falls outside."""
    _, h, w = image.shape
    out = torch.full_like(image, math.nan)
    out[:, max(0, -dy):h + min(0, -dy), max(0, -dx):w + min(0, -dx)] = \
        image[:, max(0, dy):h + min(0, dy), max(0, dx):w + min(0, dx)]
    return out


@dataclass(frozen=True)
class Transform:
    orientation: int
    dy: int
    dx: int
    mse: float

    @property
    def psnr_db(self) -> float:
        return math.inf if self.mse <= 0 else 10 * math.log10(4.0 / self.mse)

    def apply(self, image: torch.Tensor) -> torch.Tensor:
        return shifted(orient(image, self.orientation), self.dy, self.dx)


def best_transform(reference: torch.Tensor, moving: torch.Tensor, shift: int) -> Transform:
    """The flip/rotation and shift that brings ``moving`` closest to ``reference`` (MSE where both are defined,
    at least half the image overlapping)."""
    ref = reference.to(torch.float32)
    _, h, w = ref.shape
    best = Transform(0, 0, 0, math.inf)
    offsets = [(dy, dx) for dy in range(-shift, shift + 1) for dx in range(-shift, shift + 1)
               if (h - abs(dy)) * (w - abs(dx)) * 2 >= h * w]
    for g in _orientations(tuple(ref.shape)):
        turned = orient(moving.to(torch.float32), g)
        stack = torch.stack([shifted(turned, dy, dx) for dy, dx in offsets])
        mse = torch.nanmean((stack - ref).pow(2).flatten(1), dim=1)
        k = int(torch.argmin(mse))
        if float(mse[k]) < best.mse:
            best = Transform(g, offsets[k][0], offsets[k][1], float(mse[k]))
    return best


@dataclass
class CopyAverage:
    """Per payload: the aligned inverse-variance mean of every copy of its image that reached the server."""

    estimate: torch.Tensor  # (n, C, H, W) float64, unclamped; a payload without copies keeps its own look
    looks: torch.Tensor  # (n,) payloads averaged into each row (1: no copy)
    two_level: torch.Tensor | None  # (n, C, H, W): the two-level solve where a payload has a same-image partner
    groups: list[list[int]] = field(default_factory=list)  # payload indices per copy group (>= 2)
    transforms: dict[str, int] = field(default_factory=dict)  # how many aligned pairs needed which kind of transform

    def summary(self) -> dict[str, Any]:
        return {
            "groups": len(self.groups), "payloads_in_groups": sum(len(g) for g in self.groups),
            "largest_group": max((len(g) for g in self.groups), default=1),
            "max_looks_averaged": int(self.looks.max()) if len(self.looks) else 0,
            "aligned_pairs": self.transforms,
            "method": "copies found on the client's images (its own search, client/image_identity.py), each aligned by "
                      "the best of 8 flips/rotations x shifts, looks x/sqrt(ab) averaged by precision ab/(1-ab)",
        }


def _kind(t: Transform) -> str:
    if t.orientation == 0 and t.dy == 0 and t.dx == 0:
        return "same frame"
    if t.dy == 0 and t.dx == 0:
        return "flip/rotation"
    return "shift" if t.orientation == 0 else "flip/rotation + shift"


def aligned_average(payloads: torch.Tensor, alpha_bar: torch.Tensor, x0: torch.Tensor,
                    min_psnr_db: float = NEAR_DUPLICATE_PSNR_DB) -> CopyAverage:
    """``payloads`` (n, C, H, W) released at ``alpha_bar`` (n,) in (0, 1), of the client's images ``x0`` (rows matched)."""
    n = payloads.shape[0]
    ab = alpha_bar.to(torch.float64).reshape(n)
    looks = payloads.to(torch.float64) / ab.sqrt().view(n, 1, 1, 1)
    precision = ab / (1 - ab)
    estimate = looks.clone()
    counts = torch.ones(n, dtype=torch.long)
    if n < 2:
        return CopyAverage(estimate, counts, None)
    shift = max_shift(tuple(payloads.shape[1:]))
    candidates = aligned_mse(x0.float(), min_psnr_db)
    # Groups: union of candidate pairs that an exact transform aligns.
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    pairs: dict[tuple[int, int], Transform] = {}
    upper = torch.ones(n, n, dtype=torch.bool).triu(diagonal=1)
    for i, j in torch.nonzero(torch.isfinite(candidates) & upper).tolist():
        t = best_transform(x0[i], x0[j], shift)
        if t.psnr_db >= min_psnr_db:
            pairs[(i, j)] = t
            parent[root(j)] = root(i)
    members: dict[int, list[int]] = {}
    for i in range(n):
        members.setdefault(root(i), []).append(i)
    groups = [m for m in members.values() if len(m) > 1]
    kinds: dict[str, int] = {}
    pair_two_level = torch.full_like(looks, math.nan)
    for group in groups:
        for r in group:
            num = looks[r] * precision[r]
            den = torch.full_like(looks[r], float(precision[r]))
            for j in group:
                if j == r:
                    continue
                t = pairs.get((r, j)) or best_transform(x0[r], x0[j], shift)
                if (r, j) not in pairs:
                    pairs[(r, j)] = t
                if t.psnr_db < min_psnr_db:
                    continue
                kinds[_kind(t)] = kinds.get(_kind(t), 0) + 1
                aligned = t.apply(looks[j])
                defined = ~torch.isnan(aligned)
                num = num + torch.where(defined, aligned * precision[j], torch.zeros_like(aligned))
                den = den + defined.to(torch.float64) * precision[j]
                counts[r] += 1
                if t.mse == 0 and not math.isclose(float(ab[r]), float(ab[j])) and bool(torch.isnan(pair_two_level[r]).all()):
                    pair_two_level[r] = two_level(payloads[r], float(ab[r]), payloads[j], float(ab[j]))
            estimate[r] = num / den
    solved = ~torch.isnan(pair_two_level.flatten(1)).all(dim=1)
    two = torch.where(solved.view(n, 1, 1, 1), pair_two_level, looks) if bool(solved.any()) else None
    return CopyAverage(estimate, counts, two, groups, kinds)
