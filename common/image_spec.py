"""The image spec (side, channels) an image folder implies, rounded to a side the models can take.

A foreign folder is served at its own size rather than squeezed into a default: the
server (``collafuse-server --dataset``) and the simulation (``collafuse-sim --dataset``)
call ``infer_image_spec`` when no ``--image-size`` / ``--channels`` is given, and log
``ImageSpec.reason``.
"""

from __future__ import annotations

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
