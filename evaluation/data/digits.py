"""The bundled digits (scikit-learn's 8x8 digits, no download): arrays, or exported as a class-folder image folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from collafuse.common.data import save_png


def digits_arrays(size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits (1,797, 10 classes) upscaled to ``size``, in [-1, 1]."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    raw = (bunch.images / 16.0 * 255.0).astype(np.uint8)
    out = np.stack([
        np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)
        for img in raw
    ])
    return out[:, None] / 127.5 - 1.0, bunch.target.astype(np.int64)


def export_digits(out: Path, size: int = 16) -> Path:
    """Write the digits as ``out/<digit>/<index>.png``; a no-op when already complete."""
    images, labels = digits_arrays(size)
    marker = out / ".complete"
    if marker.is_file() and marker.read_text() == f"{len(labels)}:{size}":
        return out
    for i, (img, label) in enumerate(zip(images, labels)):
        save_png(img, out / str(label) / f"{i:04d}.png")
    marker.write_text(f"{len(labels)}:{size}")
    return out
