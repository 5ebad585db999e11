"""64x64 colour images with no download: random crops of the two photographs scikit-learn ships
(``load_sample_images``: a Chinese temple and a flower, 427x640 RGB), one class per photograph.

They are not a benchmark dataset: they give the latent path (``--autoencoder``) three-channel images larger
than digits on a machine that may download nothing. Each crop is a square of a random side between
``min_fraction`` and ``max_fraction`` of the photograph's height, at a random place, resized (Lanczos) to
``size`` and flipped left-right half of the time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from collafuse.common.data import save_png

CLASSES = ("china", "flower")


def photo_crops(size: int = 64, per_class: int = 300, seed: int = 0, min_fraction: float = 0.25,
                max_fraction: float = 0.6) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 3, size, size) in [-1, 1], labels (N,)): ``per_class`` crops of each photograph."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images  # china.jpg, flower.jpg: uint8 (427, 640, 3)
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label, photo in enumerate(photos):
        height, width = photo.shape[:2]
        for _ in range(per_class):
            side = int(rng.uniform(min_fraction, max_fraction) * height)
            top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
            crop = Image.fromarray(photo[top:top + side, left:left + side]).resize((size, size), Image.Resampling.LANCZOS)
            array = np.asarray(crop, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0
            images.append(array[:, :, ::-1] if rng.random() < 0.5 else array)
            labels.append(label)
    return np.ascontiguousarray(np.stack(images)), np.array(labels, dtype=np.int64)


def export_photo_crops(out: Path, size: int = 64, per_class: int = 300, seed: int = 0) -> Path:
    """Write the crops as ``out/<china|flower>/<index>.png``."""
    images, labels = photo_crops(size, per_class, seed)
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        save_png(image, out / CLASSES[label] / f"{i:05d}.png")
    return out
