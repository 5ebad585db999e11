"""Helpers of the ``collafuse-eval`` tests: small image folders and running the CLI in-process."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from collafuse.common.data import save_png
from collafuse.evaluation.data.digits import digits_arrays
from collafuse.evaluation.metrics.cli import main


def make_eval_folders(root: Path) -> Path:
    """real/<class>/ (12 digits at 16x16), fake/ (8 noise images), single/ (1 image), empty/."""
    images, labels = digits_arrays(16)
    for i in range(12):
        save_png(images[i], root / "real" / str(labels[i]) / f"{i}.png")
    rng = np.random.default_rng(0)
    for i in range(8):
        save_png(np.clip(rng.normal(0, 0.5, (1, 16, 16)), -1, 1), root / "fake" / f"{i}_{i % 10}.png")
    save_png(images[0], root / "single" / "0.png")
    (root / "empty").mkdir()
    return root


def run_eval(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any] | None, str]:
    """Exit code, the JSON object printed on stdout (None when nothing was), and stderr."""
    code = main(args + ["--no-progress"])
    captured = capsys.readouterr()
    return code, (json.loads(captured.out) if captured.out.strip() else None), captured.err
