"""Image folders (docs/design.md §9): loading and saving images; the digits and partitioning are in
evaluation.data.

A data folder is either one sub-folder per class (``<root>/<class>/*.png``) or
flat image files with an optional ``labels.csv`` (``filename,label``). Images are
converted to the served spec (channels, size) and scaled to [-1, 1].
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
UNLABELED = "_unlabeled"


class DataError(ValueError):
    """A data folder cannot be used; the message says what is wrong and what to do."""


@dataclass
class ImageDataset:
    """Images in [-1, 1] (N, C, H, W), their class names, and their paths relative to the root."""

    images: torch.Tensor
    class_names: list[str]
    paths: list[str]

    def __len__(self) -> int:
        return len(self.paths)


def load_image(path: Path, channels: int, size: int | None) -> np.ndarray:
    """One image as float32 (C, size, size) in [-1, 1]; ``size=None`` keeps the image's own size."""
    try:
        with Image.open(path) as opened:
            img = opened.convert("L" if channels == 1 else "RGB")
            if size is not None and img.size != (size, size):
                img = img.resize((size, size), Image.Resampling.BICUBIC)
            array = np.asarray(img, dtype=np.float32)
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"cannot read image {path}: {exc}. Remove or replace the file.") from exc
    if array.ndim == 2:
        array = array[None]
    else:
        array = array.transpose(2, 0, 1)
    return array / 127.5 - 1.0


def _discover(root: Path) -> list[tuple[Path, str]]:
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if subdirs:
        found = []
        for sub in subdirs:
            files = sorted(p for p in sub.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            found += [(p, sub.name) for p in files]
        return found
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    labels_csv = root / "labels.csv"
    labels: dict[str, str] = {}
    if labels_csv.is_file():
        with labels_csv.open(newline="") as fh:
            for row in csv.reader(fh):
                if len(row) >= 2 and row[0] != "filename":
                    labels[row[0].strip()] = row[1].strip()
    return [(p, labels.get(p.name, UNLABELED)) for p in files]


def scan_image_folder(root: Path) -> list[tuple[Path, str]]:
    """(path, class name) of every image under ``root``, checked like ``load_image_folder`` but no pixels read.

    Lets a client name its classes (e.g. to register) before it knows the image spec to load at.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"data folder {root} does not exist: pass --data with a folder of images (one sub-folder per class)")
    if not root.is_dir():
        raise DataError(f"--data {root} is a file, not a folder of images")
    found = _discover(root)
    if not found:
        raise DataError(
            f"data folder {root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); "
            f"put them in one sub-folder per class, e.g. {root}/3/img001.png"
        )
    return found


def load_image_folder(root: Path, channels: int, size: int | None) -> ImageDataset:
    """Load every image under ``root`` converted to (channels, size, size); ``size=None`` keeps their own size."""
    root = Path(root)
    found = scan_image_folder(root)
    arrays = [load_image(p, channels, size) for p, _ in found]
    shapes = sorted({a.shape[1:] for a in arrays})
    if len(shapes) > 1:
        raise DataError(f"images under {root} have different sizes {shapes[:4]}; pass a size to resize them on load")
    images = np.stack(arrays)
    return ImageDataset(
        images=torch.from_numpy(images),
        class_names=[c for _, c in found],
        paths=[str(p.relative_to(root)) for p, _ in found],
    )


def save_png(image: np.ndarray | torch.Tensor, path: Path) -> None:
    """Write one (C, H, W) image in [-1, 1] as PNG."""
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else image
    pixels = np.clip((array + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0)).save(path)
