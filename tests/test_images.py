"""Sample grids people can look at: wide requests wrap into bands, hand-off row above finished row."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from collafuse.common.images import MAX_COLUMNS, band_columns, grid, save_grid, to_uint8

SIZE = 8
TILE = 64 + 2  # 8 px images upscaled 8x, plus the padding
LEFT = 70  # the row titles' margin


def _rows(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return torch.rand(n, 1, SIZE, SIZE) * 2 - 1, torch.rand(n, 1, SIZE, SIZE) * 2 - 1


def _tile(picture: Image.Image, band: int, row: int, column: int, band_height: int) -> np.ndarray:
    """The 8x8 image shown at (band, row, column), read back by sampling each upscaled pixel's centre."""
    x0 = LEFT + 2 + column * TILE
    y0 = band * (band_height + 6) + 14 + 2 + row * TILE
    pixels = np.asarray(picture)[y0 + 4 : y0 + 64 : 8, x0 + 4 : x0 + 64 : 8, 0]
    return pixels


def test_band_columns_keep_labels_together() -> None:
    titles = [c for c in "abcd" for _ in range(30)]
    bands = band_columns(titles, 120)
    assert [len(b) for b in bands] == [15] * 8  # each class's 30 samples in two bands of 15
    assert all(len({titles[i] for i in b}) == 1 for b in bands)
    few = [c for c in "0123" for _ in range(3)]
    assert band_columns(few, 12) == [range(12)]  # fits in one band: no wrapping
    assert [len(b) for b in band_columns([c for c in "0123456789" for _ in range(5)], 50)] == [15, 15, 15, 5]
    assert band_columns(None, 40, 16) == [range(14), range(14, 28), range(28, 40)]


def test_wide_grid_wraps_with_the_hand_off_row_above_the_finished_row() -> None:
    x_cut, x0 = _rows(120)  # 4 classes x 30 samples: one row was 7,992 px wide
    titles = [c for c in "abcd" for _ in range(30)]
    picture = grid([x_cut, x0], row_titles=["server t=200", "client t=0"], col_titles=titles)
    assert picture.width <= LEFT + MAX_COLUMNS * TILE + 2 and picture.width == LEFT + 15 * TILE + 2
    band_height = 14 + 2 * TILE + 2
    assert picture.height == 8 * (band_height + 6) - 6
    for band, first in ((0, 0), (3, 45), (7, 105)):
        for row, images in ((0, x_cut), (1, x0)):
            expected = to_uint8(images[first : first + 1])[0, ..., 0]
            assert np.array_equal(_tile(picture, band, row, 0, band_height), expected), (band, row)
        expected_last = to_uint8(x0[first + 14 : first + 15])[0, ..., 0]
        assert np.array_equal(_tile(picture, band, 1, 14, band_height), expected_last)


def test_small_grid_is_one_band(tmp_path: Path) -> None:
    x_cut, x0 = _rows(8)
    path = save_grid(tmp_path / "grid.png", [x_cut, x0], row_titles=["a", "b"], col_titles=list("00112233"))
    picture = Image.open(path)
    assert picture.size == (LEFT + 8 * TILE + 2, 14 + 2 * TILE + 2)
