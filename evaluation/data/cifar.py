"""CIFAR-10 from its official python batches (pickles, read with a restricted unpickler) or binary batches."""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from collafuse.common.data import DataError

log = logging.getLogger(__name__)

CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_CIFAR_RECORD = 1 + 3 * 32 * 32
_TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
_TEST_BATCHES = ["test_batch"]
# Exactly the globals a CIFAR-10 python batch needs (numpy arrays, bytes); anything else is refused.
_PICKLE_ALLOWED = {
    ("_codecs", "encode"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
}


class _CifarUnpickler(pickle.Unpickler):
    """The official CIFAR-10 python batches are pickles (made by Python 2), so pickle is the only way to read
    them. We read them only from a local, trusted copy of that dataset, with ``encoding='bytes'`` for the
    Python-2 strings, and still refuse any global beyond the numpy-array reconstruction the format needs."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _PICKLE_ALLOWED:
            raise DataError(f"refusing {module}.{name} inside a CIFAR-10 pickle; is this the official dataset file?")
        return super().find_class(module, name)


def _unpickle(path: Path) -> Any:
    try:
        with path.open("rb") as handle:
            return _CifarUnpickler(handle, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise DataError(f"{path} is not a readable CIFAR-10 python batch: {exc}") from exc


def _field(batch: dict[Any, Any], name: str) -> Any:
    for key in (name.encode(), name):
        if key in batch:
            return batch[key]
    return None


@dataclass
class ImageArrays:
    """uint8 images (N, H, W, C), integer labels, class names and a unique stem per image."""

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    ids: list[str]


def _cifar_root(src: Path) -> tuple[Path, str]:
    if not src.is_dir():
        raise DataError(f"CIFAR-10 folder {src} does not exist; pass the folder with data_batch_1 ... or data_batch_1.bin ...")
    for folder in (src, src / "cifar-10-batches-py", src / "cifar-10-batches-bin"):
        if (folder / "data_batch_1").is_file() or (folder / "test_batch").is_file():
            return folder, "python"
        if (folder / "data_batch_1.bin").is_file() or (folder / "test_batch.bin").is_file():
            return folder, "binary"
    raise DataError(f"{src} holds no CIFAR-10 batches: expected data_batch_1..5 and test_batch (python version, with "
                    "batches.meta) or data_batch_1.bin..5.bin and test_batch.bin (binary version)")


def _cifar_names(folder: Path, fmt: str) -> list[str]:
    if fmt == "python":
        meta_path = folder / "batches.meta"
        if not meta_path.is_file():
            raise DataError(f"{meta_path} is missing; the python CIFAR-10 folder needs batches.meta for the class names")
        meta = _unpickle(meta_path)
        names = _field(meta, "label_names") if isinstance(meta, dict) else None
        if not isinstance(names, list) or not names:
            raise DataError(f"{meta_path} has no label_names list; is it CIFAR-10's batches.meta?")
        return [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    meta_txt = folder / "batches.meta.txt"
    if not meta_txt.is_file():
        log.warning("%s is missing; using the standard CIFAR-10 class names", meta_txt)
        return list(CIFAR10_NAMES)
    names = [line.strip() for line in meta_txt.read_text().splitlines() if line.strip()]
    if not names:
        raise DataError(f"{meta_txt} lists no class names")
    return names


def _read_python_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(path)
    if not isinstance(batch, dict):
        raise DataError(f"{path} is not a CIFAR-10 batch (expected a dict with data and labels)")
    data, labels = _field(batch, "data"), _field(batch, "labels")
    if data is None or labels is None:
        raise DataError(f"{path} lacks the data or labels entry of a CIFAR-10 batch")
    data = np.asarray(data)
    if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8:
        raise DataError(f"{path}: data is {data.dtype}{data.shape}, expected uint8 (N, 3072)")
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (len(data),):
        raise DataError(f"{path}: {len(labels)} labels for {len(data)} images")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def _read_binary_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % _CIFAR_RECORD:
        raise DataError(f"{path}: {raw.size} bytes is not a whole number of CIFAR-10 records "
                        f"(1 label byte + 3072 pixel bytes = {_CIFAR_RECORD} bytes each)")
    records = raw.reshape(-1, _CIFAR_RECORD)
    return records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), records[:, 0].astype(np.int64)


def read_cifar10(src: Path, split: str = "train") -> ImageArrays:
    """CIFAR-10 from its python or binary batches; ``split`` is train, test or all."""
    folder, fmt = _cifar_root(src)
    names = {"train": _TRAIN_BATCHES, "test": _TEST_BATCHES, "all": _TRAIN_BATCHES + _TEST_BATCHES}.get(split)
    if names is None:
        raise DataError(f"unknown CIFAR-10 split {split!r}: use train, test or all")
    suffix = ".bin" if fmt == "binary" else ""
    present = [n for n in names if (folder / f"{n}{suffix}").is_file()]
    missing = [f"{n}{suffix}" for n in names if n not in present]
    if not present:
        raise DataError(f"{folder} has none of the {split} batches {', '.join(missing)}")
    if missing:
        log.warning("%s: missing %s; using the batches that are there", folder, ", ".join(missing))
    class_names = _cifar_names(folder, fmt)
    reader = _read_binary_batch if fmt == "binary" else _read_python_batch
    images, labels, ids = [], [], []
    for name in present:
        batch_images, batch_labels = reader(folder / f"{name}{suffix}")
        if batch_labels.size and (batch_labels.min() < 0 or batch_labels.max() >= len(class_names)):
            raise DataError(f"{folder / (name + suffix)}: label {int(batch_labels.max())} outside the {len(class_names)} classes")
        images.append(batch_images)
        labels.append(batch_labels)
        tag = "test" if name == "test_batch" else f"train{name[-1]}"
        ids += [f"{tag}_{i:05d}" for i in range(len(batch_labels))]
    log.info("CIFAR-10 (%s format, %s): %d images", fmt, split, len(ids))
    return ImageArrays(np.concatenate(images), np.concatenate(labels), class_names, ids)


def take_per_class(labels: np.ndarray, per_class: int) -> np.ndarray:
    """Indices of the first ``per_class`` images of each class (all when 0)."""
    if per_class <= 0:
        return np.arange(len(labels))
    keep = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in np.unique(labels)])
    return np.sort(keep)
