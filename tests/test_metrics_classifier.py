"""Conditional accuracy: a pixel classifier trained on the real digits labels generated samples."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from collafuse.common.data import ImageDataset, load_image_folder, save_png
from collafuse.evaluation.data.digits import digits_arrays
from collafuse.evaluation.metrics.classifier import conditional_accuracy, requested_labels, train_on_real
from collafuse.evaluation.metrics.cli import main
from collafuse.evaluation.metrics.errors import MetricsError


def _dataset(images: np.ndarray, labels: np.ndarray) -> ImageDataset:
    return ImageDataset(torch.from_numpy(images), [str(v) for v in labels], [f"{i}.png" for i in range(len(labels))])


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    return digits_arrays(16)


def test_real_heldout_digits_are_labelled_well_and_noise_is_not(digits: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = digits
    classifier, heldout = train_on_real(_dataset(images[:1400], labels[:1400]))
    assert heldout > 0.9
    real = conditional_accuracy(classifier, images[1400:], [str(v) for v in labels[1400:]], heldout)
    assert real.accuracy > 0.9 and real.n == len(images) - 1400
    assert set(real.per_class) == {str(d) for d in range(10)}
    assert all(entry["n"] > 0 for entry in real.per_class.values())
    rng = np.random.default_rng(0)
    noise = np.clip(rng.normal(0, 0.6, size=(300, 1, 16, 16)), -1, 1).astype(np.float32)
    asked = [str(v) for v in rng.integers(0, 10, size=300)]
    assert conditional_accuracy(classifier, noise, asked, heldout).accuracy < 0.3


def test_requested_labels_from_names_folders_or_csv(tmp_path: Path) -> None:
    blank = np.zeros((1, 8, 8), np.float32)
    save_png(blank, tmp_path / "flat" / "0000_7.png")
    save_png(blank, tmp_path / "flat" / "0001_cat.png")
    assert requested_labels(load_image_folder(tmp_path / "flat", 1, None)) == ["7", "cat"]
    save_png(blank, tmp_path / "nested" / "3" / "x.png")
    assert requested_labels(load_image_folder(tmp_path / "nested", 1, None)) == ["3"]
    save_png(blank, tmp_path / "unnamed" / "sample.png")
    with pytest.raises(MetricsError, match=r"<index>_<class>\.png"):
        requested_labels(load_image_folder(tmp_path / "unnamed", 1, None))


def test_unknown_requested_class_is_an_error(digits: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = digits
    classifier, heldout = train_on_real(_dataset(images[:300], labels[:300]))
    with pytest.raises(MetricsError, match=r"\['11'\]"):
        conditional_accuracy(classifier, images[:1], ["11"], heldout)


def test_accuracy_cli_prints_json(digits: tuple[np.ndarray, np.ndarray], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images, labels = digits
    for i in range(1500):
        save_png(images[i], tmp_path / "real" / str(labels[i]) / f"{i}.png")
    for i in range(1500, len(images)):
        save_png(images[i], tmp_path / "fake" / f"{i:04d}_{labels[i]}.png")
    assert main(["accuracy", str(tmp_path / "real"), str(tmp_path / "fake")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["metric"] == "accuracy" and result["n_fake"] == len(images) - 1500 and result["n_real"] == 1500
    assert result["accuracy"] > 0.9 and result["real_heldout_accuracy"] > 0.9
    assert result["image_shape"] == [1, 16, 16]
    assert main(["accuracy", str(tmp_path / "real"), str(tmp_path / "missing")]) == 2
