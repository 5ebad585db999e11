"""Pictures people look at: sample grids (server hand-off row above client-finished row) and curves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8."""
    array = images.detach().cpu().float().clamp(-1, 1).numpy()
    return ((array + 1.0) * 127.5 + 0.5).astype(np.uint8).transpose(0, 2, 3, 1)


def grid(rows: Sequence[torch.Tensor], scale: int | None = None, pad: int = 2, row_titles: Sequence[str] | None = None, col_titles: Sequence[str] | None = None) -> Image.Image:
    """Rows of images (each (N, C, H, W)) tiled into one picture, upscaled for viewing."""
    tiles = [to_uint8(r) for r in rows]
    n = max(t.shape[0] for t in tiles)
    h, w, c = tiles[0].shape[1:]
    scale = scale or max(1, 64 // h)  # tiles of about 64 px, whatever the image size
    th, tw = h * scale, w * scale
    left = 70 if row_titles else 0
    top = 14 if col_titles else 0
    canvas = Image.new("RGB", (left + n * (tw + pad) + pad, top + len(tiles) * (th + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(tiles):
        y = top + pad + r * (th + pad)
        if row_titles:
            draw.text((4, y + th // 2 - 5), row_titles[r], fill="black")
        for i, img in enumerate(row):
            tile = Image.fromarray(img[..., 0] if c == 1 else img).convert("RGB").resize((tw, th), Image.Resampling.NEAREST)
            canvas.paste(tile, (left + pad + i * (tw + pad), y))
    if col_titles:
        for i, title in enumerate(col_titles[:n]):
            draw.text((left + pad + i * (tw + pad) + 2, 1), title, fill="black")
    return canvas


def save_grid(path: Path, rows: Sequence[torch.Tensor], **kwargs: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    grid(rows, **kwargs).save(path)  # type: ignore[arg-type]
    return path


def save_curves(path: Path, curves: dict[str, Sequence[tuple[float, float]]], title: str, xlabel: str = "step", ylabel: str = "loss") -> Path:
    """Line plot of named (x, y) series, written as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for name, points in curves.items():
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, label=name)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if curves:
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
