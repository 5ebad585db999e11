"""The image spec (side, channels) an image folder implies, rounded to a side the models can take; and how many
noisy looks per native pixel a served spec gives (``look_gain``, for the client's floor: client/noise_floor.py).

A foreign folder is served at its own size rather than squeezed into a default: the
server (``collafuse-server --dataset``) and the simulation (``collafuse-sim --dataset``)
call ``infer_image_spec`` when no ``--image-size`` / ``--channels`` is given, and log
``ImageSpec.reason``.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from collafuse.common.data import UNLABELED, DataError, scan_image_folder
from collafuse.common.models import PRESETS

GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "F"})
MIN_SIDE, MAX_SIDE = 4, 1024  # ServerSettings.image_size's bounds
SAMPLE_IMAGES = 64  # enough to see the folder's size and colour; reading every image of a large set is slow


@dataclass(frozen=True)
class ImageSpec:
    """An image folder's spec: square side, channels (1 grey, 3 RGB), class names, and why."""

    side: int
    channels: int
    classes: list[str]
    reason: str


def side_multiple(presets: list[str]) -> int:
    """The image side must be divisible by 2^(levels-1) for every UNet preset that will see it."""
    unknown = sorted(p for p in presets if p not in PRESETS)
    if unknown:
        raise ValueError(f"unknown model presets {unknown}: choose from {sorted(PRESETS)}")
    return max(2 ** (len(PRESETS[p]["block_out_channels"]) - 1) for p in presets)


def valid_side(side: int, multiple: int) -> int:
    """The nearest side in [MIN_SIDE, MAX_SIDE] divisible by ``multiple`` (ties round up)."""
    low = MIN_SIDE + (-MIN_SIDE) % multiple
    nearest = int(multiple * np.floor(side / multiple + 0.5))
    return max(low, min(nearest, MAX_SIDE - MAX_SIDE % multiple))


def _is_grey(image: Image.Image) -> bool:
    if image.mode in GREY_MODES:
        return True
    # Colour files whose bands are all equal (common for exported grey images) are grey.
    rgb = np.asarray(image.convert("RGB"))
    return bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())


def infer_image_spec(root: Path, presets: list[str]) -> ImageSpec:
    """Side and channels of the images under ``root`` (the most common size, grey unless any sampled
    image has colour), the side rounded to one every preset in ``presets`` can take."""
    found = scan_image_folder(root)
    step = max(1, len(found) // SAMPLE_IMAGES)
    sampled = [path for path, _ in found[::step]][:SAMPLE_IMAGES]
    sizes: Counter[tuple[int, int]] = Counter()
    grey = True
    for path in sampled:
        try:
            with Image.open(path) as image:
                sizes[image.size] += 1
                grey = grey and _is_grey(image)
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"cannot read image {path}: {exc}. Remove or replace the file.") from exc
    (width, height), count = sizes.most_common(1)[0]
    own = max(width, height)
    multiple = side_multiple(presets)
    side = valid_side(own, multiple)
    parts = [f"{count} of {len(sampled)} sampled images under {root} are {width}x{height}"]
    if len(sizes) > 1:
        parts.append(f"others ({', '.join(f'{w}x{h}' for (w, h), _ in sizes.most_common()[1:4])}) are resized")
    if width != height:
        parts.append(f"non-square images are resized to {own}x{own}")
    if side != own:
        parts.append(f"side {own} rounded to {side}: models {sorted(set(presets))} need a side divisible by "
                     f"{multiple} within [{MIN_SIDE}, {MAX_SIDE}]")
    parts.append("all grey: 1 channel" if grey else "colour found: 3 channels (RGB)")
    classes = sorted({name for _, name in found if name != UNLABELED})
    return ImageSpec(side=side, channels=1 if grey else 3, classes=classes, reason="; ".join(parts))


# ---- one look per native pixel (docs/design.md §7) -------------------------------------------------------------
#
# A client converts its images to the spec a server serves (common/data.py::load_image: PIL's convert to L or RGB,
# then a bicubic resize to the served side). That conversion is linear: served = A @ native. A release
# y = sqrt(ab) A x + sqrt(1 - ab) eps then tells the server, along the direction v of native pixel space, what
# lambda(v) = |A v|^2 honest looks at level ab would: least squares back to the native pixels has error covariance
# (1 - ab) / ab (A^T A)^-1. Replicating grey into RGB gives every native pixel 3 looks, a 4x upsample about 4 per
# side. ``look_gain`` is the largest eigenvalue of A^T A, the most looks any native direction gets; the client
# scales its per-native-pixel noise floor by it (client/noise_floor.py), so that no direction is seen better than
# by one honest release at the floor.


@functools.lru_cache(maxsize=256)
def resize_gain(native: int, served: int) -> float:
    """The largest eigenvalue of A^T A, A the bicubic resize (PIL's, as images are loaded) of a line of ``native``
    pixels to ``served``: about served / native when enlarging, at most that when shrinking; 1 when equal."""
    if native == served:
        return 1.0
    if native < 1 or served < 1:
        raise ValueError(f"image sides must be positive, got {native} -> {served}")
    basis = np.eye(native, dtype=np.float32)  # row i: the unit line e_i; resizing the width alone maps each row
    resized = Image.fromarray(basis, mode="F").resize((served, native), Image.Resampling.BICUBIC)
    matrix = np.asarray(resized, dtype=np.float64)  # (native, served): row i = A e_i
    return float(np.linalg.eigvalsh(matrix @ matrix.T).max())


def channel_gain(native_channels: int, served_channels: int) -> float:
    """Looks per native channel value: a grey image served as RGB is sent 3 times; any other conversion at most once
    (colour to grey is one weighted sum per pixel, counted as 1 to stay on the safe side)."""
    return float(served_channels) if native_channels == 1 and served_channels > 1 else 1.0


def look_gain(native: tuple[int, int, int], served: tuple[int, int, int]) -> float:
    """The most honest looks any direction of an image of ``native`` (channels, height, width) gets when it is
    converted to ``served``: the largest eigenvalue of A^T A for the conversion A; at least 1."""
    (c, h, w), (sc, sh, sw) = native, served
    return max(1.0, channel_gain(c, sc) * resize_gain(h, sh) * resize_gain(w, sw))


def native_shape(path: Path, check_bands: bool = True) -> tuple[int, int, int]:
    """(channels, height, width) of an image file as it is stored: 1 channel for grey modes and for colour files
    whose bands are all equal (their content is grey; ``check_bands=False`` skips that decode and says 3)."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            grey = image.mode in GREY_MODES or (check_bands and _is_grey(image))
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"cannot read image {path}: {exc}. Remove or replace the file.") from exc
    return (1 if grey else 3, height, width)
