"""Pictures people look at: sample grids (server hand-off row above client-finished row) and curves."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8."""
    array = images.detach().cpu().float().clamp(-1, 1).numpy()
    return ((array + 1.0) * 127.5 + 0.5).astype(np.uint8).transpose(0, 2, 3, 1)


# Columns per band of a wrapped grid: about 1,100 px wide at the usual ~64 px tiles.
MAX_COLUMNS = 16


def band_columns(col_titles: Sequence[str] | None, n: int, max_columns: int = MAX_COLUMNS) -> list[range]:
    """Split n columns into bands of at most ``max_columns``, starting a band where the title changes.

    Runs of one title (one class's samples) are packed whole into a band while they fit; a run longer
    than a band is cut into near-equal pieces, so 30 samples of a class make two bands of 15.
    """
    max_columns = max(1, max_columns)
    titles = list(col_titles or [])[:n]
    titles += [""] * (n - len(titles))
    runs: list[range] = []  # consecutive columns with one title
    start = 0
    for i in range(1, n + 1):
        if i == n or titles[i] != titles[start]:
            runs.append(range(start, i))
            start = i
    pieces: list[range] = []
    for run in runs:
        parts = -(-len(run) // max_columns)
        size = -(-len(run) // parts)
        pieces += [range(s, min(run.stop, s + size)) for s in range(run.start, run.stop, size)]
    bands: list[range] = []
    for piece in pieces:
        if bands and len(bands[-1]) + len(piece) <= max_columns:
            bands[-1] = range(bands[-1].start, piece.stop)
        else:
            bands.append(piece)
    return bands


def grid(
    rows: Sequence[torch.Tensor],
    scale: int | None = None,
    pad: int = 2,
    row_titles: Sequence[str] | None = None,
    col_titles: Sequence[str] | None = None,
    max_columns: int | None = MAX_COLUMNS,
) -> Image.Image:
    """Rows of images (each (N, C, H, W)) tiled into one picture, upscaled for viewing.

    With more than ``max_columns`` images per row the grid wraps into bands, each band holding every row
    (e.g. the server's hand-off row above the client's finished row) for a few label columns; a column's
    title is written where its label starts within a band. ``max_columns=None`` keeps one band.
    """
    tiles = [to_uint8(r) for r in rows]
    n = max(t.shape[0] for t in tiles)
    h, w, c = tiles[0].shape[1:]
    scale = scale or max(1, 64 // h)  # tiles of about 64 px, whatever the image size
    th, tw = h * scale, w * scale
    bands = band_columns(col_titles, n, max_columns) if max_columns else [range(n)]
    columns = max((len(b) for b in bands), default=0)
    left = 70 if row_titles else 0
    top = 14 if col_titles else 0
    band_height = top + len(tiles) * (th + pad) + pad
    gap = 3 * pad  # between bands
    canvas = Image.new("RGB", (left + columns * (tw + pad) + pad, len(bands) * (band_height + gap) - gap), "white")
    draw = ImageDraw.Draw(canvas)
    for b, band in enumerate(bands):
        y0 = b * (band_height + gap)
        for r, row in enumerate(tiles):
            y = y0 + top + pad + r * (th + pad)
            if row_titles:
                draw.text((4, y + th // 2 - 5), row_titles[r], fill="black")
            for k, i in enumerate(band):
                if i >= row.shape[0]:
                    continue
                img = row[i]
                tile = Image.fromarray(img[..., 0] if c == 1 else img).convert("RGB").resize((tw, th), Image.Resampling.NEAREST)
                canvas.paste(tile, (left + pad + k * (tw + pad), y))
        if col_titles:
            for k, i in enumerate(band):
                if i < len(col_titles) and (k == 0 or col_titles[i] != col_titles[i - 1]):
                    draw.text((left + pad + k * (tw + pad) + 2, y0 + 1), col_titles[i], fill="black")
    return canvas


def save_grid(path: Path, rows: Sequence[torch.Tensor], **kwargs: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    grid(rows, **kwargs).save(path)
    return path


def save_curves(path: Path, curves: Mapping[str, Sequence[tuple[float, float]]], title: str, xlabel: str = "step", ylabel: str = "loss") -> Path:
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
