"""Least squares back to the client's native pixels: what a server gets from a spec larger than the data's.

A client converts each image to the served spec on load (common/data.py::load_image: PIL's convert to L or RGB,
then a bicubic resize to the served side). The conversion is linear, served = A native with A = M (x) R_h (x) R_w:
M the channel map (grey -> RGB repeats the grey value 3 times; RGB -> L is PIL's luma 0.299/0.587/0.114) and R_h,
R_w PIL's bicubic resize of a line (found by resizing each unit line, as common/image_spec.py does). A release
y = sqrt(ab) A x + sqrt(1 - ab) eps has white noise, so the best linear unbiased estimate of the native x is least
squares: x_hat = pinv(A) y / sqrt(ab), and pinv(A) = pinv(M) (x) pinv(R_h) (x) pinv(R_w) (the channel mean for a
repeated grey image, one pseudo-inverse per side). Every native pixel seen g times over (``look_gain``) gets g
looks' worth of noise averaged away; this is the attack tests/test_hostile_server.py runs against the client.

The truth is the client's own files read at their native size (``load_image`` with no resize).
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from collafuse.common.data import DataError, load_image
from collafuse.common.image_spec import look_gain, native_shape

Shape = tuple[int, int, int]
LUMA = (0.299, 0.587, 0.114)  # PIL's RGB -> L (ITU-R 601-2)


@functools.lru_cache(maxsize=64)
def resize_matrix(native: int, served: int) -> np.ndarray:
    """(served, native): PIL's bicubic resize of a line of ``native`` pixels to ``served`` (identity when equal)."""
    if native == served:
        return np.eye(native)
    lines = Image.fromarray(np.eye(native, dtype=np.float32), mode="F").resize((served, native), Image.Resampling.BICUBIC)
    out = np.asarray(lines, dtype=np.float64).T.copy()
    out.setflags(write=False)
    return out


def channel_matrix(native: int, served: int) -> np.ndarray:
    """(served, native): how a pixel's channels become the served ones (PIL's convert)."""
    if native == served:
        return np.eye(native)
    if native == 1:
        return np.ones((served, 1))
    if served == 1 and native == 3:
        return np.asarray([LUMA])
    raise ValueError(f"no conversion from {native} to {served} channels")


@dataclass(frozen=True)
class NativeOperator:
    """The conversion of one native shape to the served one, and its least-squares inverse."""

    native: Shape
    served: Shape

    @property
    def gain(self) -> float:
        return look_gain(self.native, self.served)

    @property
    def identity(self) -> bool:
        return self.native == self.served

    @functools.cached_property
    def _inverses(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        (c, h, w), (sc, sh, sw) = self.native, self.served
        return (torch.from_numpy(np.linalg.pinv(channel_matrix(c, sc))),
                torch.from_numpy(np.linalg.pinv(resize_matrix(h, sh))),
                torch.from_numpy(np.linalg.pinv(resize_matrix(w, sw))))

    def forward(self, native: torch.Tensor) -> torch.Tensor:
        """(N, *native) -> (N, *served), linear (no 8-bit rounding): A x."""
        (c, h, w), (sc, sh, sw) = self.native, self.served
        m = torch.from_numpy(channel_matrix(c, sc))
        rh, rw = torch.from_numpy(resize_matrix(h, sh)), torch.from_numpy(resize_matrix(w, sw))
        return torch.einsum("sc,ij,ncjk,lk->nsil", m, rh, native.to(torch.float64), rw)

    def lsq(self, served: torch.Tensor) -> torch.Tensor:
        """(N, *served) -> (N, *native): argmin_x |A x - y| for each image y (unclamped, float64)."""
        if tuple(served.shape[1:]) != self.served:
            raise ValueError(f"expected served images of shape {self.served}, got {tuple(served.shape[1:])}")
        m, rh, rw = self._inverses
        return torch.einsum("cs,ij,nsjk,lk->ncil", m, rh, served.to(torch.float64), rw)


@dataclass
class NativeImages:
    """The client's images at their own size, for the rows of one audit: the most common native shape among them
    (``rows``: which rows have it; images of other shapes are left out of the native attacks, and said so)."""

    operator: NativeOperator
    rows: torch.Tensor  # (k,) indices into the audited rows
    images: torch.Tensor  # (k, *native) in [-1, 1]
    others: int  # audited rows whose image has another native shape

    def describe(self) -> dict[str, object]:
        return {"native_shape": list(self.operator.native), "served_shape": list(self.operator.served),
                "look_gain": self.operator.gain, "images": len(self.rows), "other_native_shapes": self.others,
                "method": "least squares through the client's conversion (channel map, PIL bicubic resize per side)"}


def native_shapes(root: Path, paths: Sequence[str], served_channels: int) -> list[Shape]:
    """The native (channels, height, width) of each file (grey files and colour files with equal bands: 1 channel)."""
    return [native_shape(Path(root) / p, check_bands=served_channels > 1) for p in paths]


def native_images(root: Path, paths: Sequence[str], shapes: Sequence[Shape], index: Sequence[int],
                  served: Shape) -> NativeImages | None:
    """The native truth for audited rows (``index``: each row's image, into ``paths``), or None when the audited
    images are served at their own shape (nothing to gain) or their conversion has no linear model here."""
    if not index:
        return None
    row_shapes = [shapes[i] for i in index]
    shape, _ = Counter(row_shapes).most_common(1)[0]
    if shape == tuple(served):
        return None
    try:
        channel_matrix(shape[0], served[0])
    except ValueError:
        return None
    rows = [k for k, s in enumerate(row_shapes) if s == shape]
    try:
        loaded = {i: torch.from_numpy(load_image(Path(root) / paths[i], shape[0], None)) for i in {index[k] for k in rows}}
    except DataError:
        return None
    images = torch.stack([loaded[index[k]] for k in rows]).float()
    return NativeImages(NativeOperator(shape, tuple(served)), torch.tensor(rows, dtype=torch.long), images,  # type: ignore[arg-type]
                        len(row_shapes) - len(rows))
