"""Feature extraction over image folders or tensors, batched, with progress bars and an on-disk cache.

Features are cached by content: the key is a SHA-256 of the extractor's name (which encodes
its weights and preprocessing), the load options, and the images' bytes (the files' bytes
in folder order, or a tensor's float32 bytes and shape). Re-evaluating the same real folder
against many generated folders extracts its features once. The cache lives in
``$COLLAFUSE_CACHE_DIR`` or ``~/.cache/collafuse/features``; entries are plain ``.npy``
arrays (loaded without pickle), written atomically.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from tqdm import tqdm

from collafuse.common.data import load_image, scan_image_folder

log = logging.getLogger(__name__)

_KEY_VERSION = "collafuse-features-v1"


class FeatureExtractor(Protocol):
    """Images in [-1, 1] (N, C, H, W) -> (N, d) features; ``name`` identifies weights and preprocessing."""

    name: str
    num_features: int

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


def default_cache_dir() -> Path:
    configured = os.environ.get("COLLAFUSE_CACHE_DIR")
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "collafuse" / "features"


class FeatureCache:
    """``<root>/<key>.npy`` feature arrays; ``enabled=False`` turns it into a no-op."""

    def __init__(self, root: Path | None = None, enabled: bool = True) -> None:
        self.root = Path(root) if root is not None else default_cache_dir()
        self.enabled = enabled

    def path(self, key: str) -> Path:
        return self.root / f"{key}.npy"

    def load(self, key: str, rows: int) -> np.ndarray | None:
        if not self.enabled:
            return None
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            features = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable feature cache entry %s: %s", path, exc)
            return None
        if features.ndim != 2 or features.shape[0] != rows:
            log.warning("ignoring feature cache entry %s of shape %s (expected %d rows)", path, features.shape, rows)
            return None
        log.info("features from cache %s", path)
        return features

    def save(self, key: str, features: np.ndarray) -> None:
        if not self.enabled:
            return
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.root, suffix=".tmp", delete=False) as handle:
                np.save(handle, features, allow_pickle=False)
            os.replace(handle.name, self.path(key))
        except OSError as exc:
            log.warning("could not write the feature cache in %s (%s); continuing without it", self.root, exc)


def cache_key(extractor_name: str, content_digest: str, options: str = "") -> str:
    return hashlib.sha256(f"{_KEY_VERSION}|{extractor_name}|{options}|{content_digest}".encode()).hexdigest()


def files_digest(paths: Sequence[Path]) -> str:
    """SHA-256 over the files' bytes, in order, each prefixed by its length."""
    digest = hashlib.sha256()
    for path in paths:
        data = path.read_bytes()
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def tensor_digest(images: torch.Tensor) -> str:
    array = images.detach().to("cpu", torch.float32).contiguous().numpy()
    digest = hashlib.sha256(repr(tuple(array.shape)).encode())
    digest.update(array.tobytes())
    return digest.hexdigest()


def _run_batch(extractor: FeatureExtractor, arrays: Sequence[np.ndarray]) -> np.ndarray:
    """Features of a batch of (C, H, W) arrays; images of different sizes run in separate groups."""
    out = np.empty((len(arrays), extractor.num_features), dtype=np.float32)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, array in enumerate(arrays):
        groups.setdefault(array.shape, []).append(i)
    for indices in groups.values():
        batch = torch.from_numpy(np.stack([arrays[i] for i in indices]))
        out[indices] = extractor(batch).detach().to("cpu", torch.float32).numpy()
    return out


def _batches(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


@dataclass
class TensorFeatures:
    features: np.ndarray
    from_cache: bool


def tensor_features(
    extractor: FeatureExtractor,
    images: torch.Tensor,
    batch_size: int = 32,
    cache: FeatureCache | None = None,
    progress: bool = True,
    desc: str = "features",
) -> TensorFeatures:
    """(N, d) float32 features of an image tensor in [-1, 1], cached by the tensor's content."""
    cache = cache or FeatureCache(enabled=False)
    key = cache_key(extractor.name, tensor_digest(images))
    cached = cache.load(key, len(images))
    if cached is not None:
        return TensorFeatures(cached, from_cache=True)
    out = np.empty((len(images), extractor.num_features), dtype=np.float32)
    with tqdm(total=len(images), desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for part in _batches(len(images), batch_size):
            out[part] = extractor(images[part]).detach().to("cpu", torch.float32).numpy()
            bar.update(part.stop - part.start)
    cache.save(key, out)
    return TensorFeatures(out, from_cache=False)


@dataclass
class FolderFeatures:
    """Features of every image of a folder, in ``scan_image_folder`` order."""

    features: np.ndarray
    paths: list[Path]
    class_names: list[str]
    from_cache: bool

    def __len__(self) -> int:
        return len(self.paths)


def folder_features(
    extractor: FeatureExtractor,
    root: Path,
    batch_size: int = 32,
    size: int | None = None,
    cache: FeatureCache | None = None,
    progress: bool = True,
) -> FolderFeatures:
    """Features of the images under ``root`` (each at its own size unless ``size`` is given), cached by content."""
    cache = cache or FeatureCache(enabled=False)
    found = scan_image_folder(Path(root))
    paths = [p for p, _ in found]
    names = [c for _, c in found]
    key = cache_key(extractor.name, files_digest(paths), f"rgb,size={size}")
    cached = cache.load(key, len(paths))
    if cached is not None:
        return FolderFeatures(cached, paths, names, from_cache=True)
    out = np.empty((len(paths), extractor.num_features), dtype=np.float32)
    with tqdm(total=len(paths), desc=f"features {Path(root).name}", unit="img", disable=not progress, leave=False) as bar:
        for part in _batches(len(paths), batch_size):
            out[part] = _run_batch(extractor, [load_image(p, 3, size) for p in paths[part]])
            bar.update(part.stop - part.start)
    cache.save(key, out)
    return FolderFeatures(out, paths, names, from_cache=False)
