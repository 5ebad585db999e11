"""Conditional accuracy: does a generated sample show the class it was asked for?

A scikit-learn classifier (standardised pixels -> multinomial logistic regression) is
trained on the real images, its accuracy on a held-out part of the real data is reported
as the ceiling, and it then labels the generated samples; the accuracy is the share whose
predicted class is the requested one, overall and per requested class. On the digits a
pixel-level logistic regression is a strong probe (≈0.95 held out); on natural images it
is weak, which the held-out ceiling makes visible.

Generated samples name their requested class by sub-folder (``<fake>/<class>/*.png``), by
``labels.csv``, or by file name ``<index>_<class>.png``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from collafuse.common.data import UNLABELED, ImageDataset
from collafuse.evaluation.metrics.errors import MetricsError

log = logging.getLogger(__name__)

_NAMED = re.compile(r"^\d+_(?P<label>.+)$")


@dataclass
class ConditionalAccuracy:
    accuracy: float
    n: int
    real_heldout_accuracy: float
    per_class: dict[str, dict[str, float]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return {
            "accuracy": self.accuracy,
            "n_fake": self.n,
            "real_heldout_accuracy": self.real_heldout_accuracy,
            "per_class": self.per_class,
        }


def requested_labels(data: ImageDataset) -> list[str]:
    """The class each generated image was asked for: its folder, labels.csv entry, or ``<index>_<class>`` name."""
    labels = []
    for path, name in zip(data.paths, data.class_names):
        if name != UNLABELED:
            labels.append(name)
            continue
        match = _NAMED.match(Path(path).stem)
        if match is None:
            raise MetricsError(
                f"cannot tell which class generated image {path} was asked for: put samples in one sub-folder per "
                "class (<fake>/<class>/*.png), list them in labels.csv, or name them <index>_<class>.png"
            )
        labels.append(match.group("label"))
    return labels


def _flatten(images: np.ndarray) -> np.ndarray:
    return np.asarray(images, dtype=np.float32).reshape(len(images), -1)


class PixelClassifier:
    """Standardised pixels -> logistic regression, trained on real images of known classes."""

    def __init__(self, max_iter: int = 2000, c: float = 0.1, seed: int = 0) -> None:
        self.model: Pipeline = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter, random_state=seed))
        self.classes: list[str] = []

    def fit(self, images: np.ndarray, labels: list[str]) -> PixelClassifier:
        self.model.fit(_flatten(images), np.asarray(labels))
        self.classes = [str(c) for c in self.model.classes_]
        return self

    def predict(self, images: np.ndarray) -> np.ndarray:
        return np.asarray(self.model.predict(_flatten(images)))


def train_on_real(real: ImageDataset, holdout: float = 0.2, max_train: int = 0, seed: int = 0) -> tuple[PixelClassifier, float]:
    """Fit on the real images (stratified split); returns the classifier and its held-out accuracy."""
    labels = np.asarray(real.class_names)
    classes, counts = np.unique(labels, return_counts=True)
    if UNLABELED in classes:
        raise MetricsError("the real folder has unlabeled images; conditional accuracy needs one sub-folder per class")
    if len(classes) < 2:
        raise MetricsError(f"the real folder has {len(classes)} class(es); a classifier needs at least 2")
    if counts.min() < 2:
        raise MetricsError(f"class {classes[counts.argmin()]!r} has a single real image; need at least 2 per class")
    images = real.images.numpy()
    indices = np.arange(len(labels))
    if max_train and len(indices) > max_train / (1 - holdout):
        keep = int(max_train / (1 - holdout))
        indices, _ = train_test_split(indices, train_size=keep, stratify=labels, random_state=seed)
    test_size = max(holdout, len(classes) / len(indices))
    train, test = train_test_split(indices, test_size=test_size, stratify=labels[indices], random_state=seed)
    classifier = PixelClassifier(seed=seed).fit(images[train], labels[train].tolist())
    heldout = float((classifier.predict(images[test]) == labels[test]).mean())
    log.info("pixel classifier: %d real training images, held-out accuracy %.3f", len(train), heldout)
    return classifier, heldout


def conditional_accuracy(classifier: PixelClassifier, images: np.ndarray, requested: list[str], real_heldout: float) -> ConditionalAccuracy:
    """Share of generated images that the classifier labels with their requested class, overall and per class."""
    unknown = sorted(set(requested) - set(classifier.classes))
    if unknown:
        raise MetricsError(f"generated images ask for classes {unknown} that the real folder lacks (it has {classifier.classes})")
    wanted = np.asarray(requested)
    hits = classifier.predict(images) == wanted
    per_class = {
        name: {"n": int((wanted == name).sum()), "accuracy": float(hits[wanted == name].mean())}
        for name in sorted(set(requested))
    }
    return ConditionalAccuracy(float(hits.mean()), len(wanted), real_heldout, per_class)
