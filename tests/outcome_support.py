"""The collaborative outcome tests' setting: the bundled 8x8 digits as a client's data folder, a pixel classifier
that reads them, and an in-process server for them at T = 1000 (tests/test_guidance_outcome.py,
tests/test_init_from_server.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from server_support import start

from collafuse.common.data import save_png
from collafuse.evaluation.data.digits import digits_arrays
from collafuse.evaluation.metrics.classifier import PixelClassifier
from collafuse.server.app import CollaFuseServer


def digits_folder(root: Path) -> PixelClassifier:
    """Every bundled digit under ``root/<label>/``; returns a pixel classifier fitted on them."""
    images, targets = digits_arrays(8)
    for i, (image, label) in enumerate(zip(images, targets)):
        save_png(image, root / str(int(label)) / f"{i:04d}.png")
    return PixelClassifier().fit(images, [str(int(v)) for v in targets])


def digits_server(store: Path, **overrides: Any) -> CollaFuseServer:
    """A server for the ten digit classes at T = 1000 that trains 300 steps of batch 32 once releases arrive."""
    settings: dict[str, Any] = {"classes": [str(c) for c in range(10)], "num_train_timesteps": 1000, "max_steps": 300,
                                "batch_size": 32, "lr": 2e-3, "max_sample_images": 128, **overrides}
    return start(store, **settings)


def label_accuracy(classifier: PixelClassifier, samples: torch.Tensor, labels: list[int]) -> float:
    """The share of ``samples`` the classifier reads as their label."""
    return float((classifier.predict(samples.numpy()) == np.array([str(y) for y in labels])).mean())
