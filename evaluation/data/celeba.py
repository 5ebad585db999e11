"""CelebA: the attribute list (official text or Kaggle CSV), attribute groups as clients, and the centre crop."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from collafuse.common.data import DataError


@dataclass
class CelebaAttributes:
    names: list[str]
    files: list[str]
    values: np.ndarray  # (N, A) int8 of +1 / -1


def read_celeba_attributes(path: Path) -> CelebaAttributes:
    """``list_attr_celeba.txt`` (count line, names line, ``file ±1 ...`` rows) or Kaggle's CSV."""
    if not path.is_file():
        raise DataError(f"attribute file {path} does not exist")
    if path.suffix == ".csv":
        with path.open(newline="") as handle:
            rows = list(csv.reader(handle))
        if not rows or len(rows[0]) < 2:
            raise DataError(f"{path}: expected a header 'image_id,<attribute>,...'")
        names, body, first_line = [n.strip() for n in rows[0][1:]], rows[1:], 2
    else:
        lines = path.read_text().splitlines()
        if len(lines) < 2:
            raise DataError(f"{path}: expected a count line and an attribute-name line before the rows")
        try:
            count = int(lines[0].strip())
        except ValueError as exc:
            raise DataError(f"{path} line 1: expected the image count, found {lines[0][:40]!r}") from exc
        names = lines[1].split()
        body = [line.split() for line in lines[2:] if line.strip()]
        first_line = 3
        if count != len(body):
            raise DataError(f"{path}: line 1 says {count} images but {len(body)} rows follow")
    if not names:
        raise DataError(f"{path}: no attribute names in the header")
    files, values = [], np.empty((len(body), len(names)), dtype=np.int8)
    for i, row in enumerate(body):
        if len(row) != len(names) + 1:
            raise DataError(f"{path} line {first_line + i}: {len(row) - 1} values for {len(names)} attributes")
        try:
            parsed = [int(v) for v in row[1:]]
        except ValueError as exc:
            raise DataError(f"{path} line {first_line + i}: values must be 1 or -1 ({exc})") from exc
        if any(v not in (1, -1, 0) for v in parsed):
            raise DataError(f"{path} line {first_line + i}: values must be 1 or -1")
        files.append(row[0].strip())
        values[i] = [1 if v == 1 else -1 for v in parsed]
    return CelebaAttributes(names, files, values)


def celeba_paths(src: Path) -> tuple[Path, Path]:
    if not src.is_dir():
        raise DataError(f"CelebA folder {src} does not exist; pass the folder holding img_align_celeba/ and list_attr_celeba.txt")
    attr = next((p for p in (src / "list_attr_celeba.txt", src / "Anno" / "list_attr_celeba.txt",
                             src / "list_attr_celeba.csv") if p.is_file()), None)
    if attr is None:
        raise DataError(f"{src} has no list_attr_celeba.txt (looked in {src} and {src / 'Anno'})")
    images = next((p for p in (src / "img_align_celeba" / "img_align_celeba", src / "img_align_celeba",
                               src / "Img" / "img_align_celeba") if p.is_dir()), None)
    if images is None:
        raise DataError(f"{src} has no img_align_celeba/ folder of aligned images")
    return attr, images


def group_masks(attrs: CelebaAttributes, groups: Sequence[str]) -> np.ndarray:
    """(G, N) masks: group ``A,B,~C`` holds images with A and B and without C."""
    index = {n.lower(): i for i, n in enumerate(attrs.names)}
    masks = np.ones((len(groups), len(attrs.files)), dtype=bool)
    for g, spec in enumerate(groups):
        for term in filter(None, (t.strip() for t in spec.split(","))):
            negate = term.startswith("~")
            name = term.lstrip("~")
            if name.lower() not in index:
                raise DataError(f"unknown CelebA attribute {name!r}; known: {', '.join(attrs.names)}")
            column = attrs.values[:, index[name.lower()]] == 1
            masks[g] &= ~column if negate else column
    return masks


def assign_groups(masks: np.ndarray, mode: str) -> np.ndarray:
    """Group index per image (-1: none). ``exclusive``: images in exactly one group; ``first``: first match."""
    hits = masks.sum(axis=0)
    first = np.where(hits > 0, masks.argmax(axis=0), -1)
    if mode == "first":
        return first
    if mode == "exclusive":
        return np.where(hits == 1, first, -1)
    raise DataError(f"unknown --assign {mode!r}: use exclusive or first")


def celeba_image(path: Path, crop: int, size: int) -> Image.Image:
    """Centre crop to ``crop`` x ``crop`` (0: none), then resize to ``size`` x ``size`` (0: keep)."""
    try:
        with Image.open(path) as source:
            image = source.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from exc
    if crop:
        width, height = image.size
        if crop > min(width, height):
            raise DataError(f"--crop {crop} is larger than image {path} ({width}x{height})")
        left, top = (width - crop) // 2, (height - crop) // 2
        image = image.crop((left, top, left + crop, top + crop))
    if size and image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return image
