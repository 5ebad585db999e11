"""Partitioning a labelled dataset across clients (docs/design.md §9): IID, contiguous class groups, or Dirichlet
label skew."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np

from collafuse.common.data import DataError, scan_image_folder

PartitionScheme = Literal["iid", "classes", "dirichlet"]
SCHEMES: tuple[PartitionScheme, ...] = ("iid", "classes", "dirichlet")


def partition(labels: np.ndarray, num_clients: int, scheme: PartitionScheme, seed: int = 0, alpha: float = 0.5) -> list[np.ndarray]:
    """Split indices across clients: IID, by contiguous class groups, or Dirichlet(alpha) per class."""
    if num_clients < 1:
        raise DataError("need at least one client")
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    if scheme == "iid":
        if num_clients > len(labels):
            # array_split would hand the surplus clients empty shards, which fail later as a missing --data folder.
            raise DataError(f"{num_clients} clients but only {len(labels)} images: every client needs at least one "
                            f"image; use at most {len(labels)} clients or a larger dataset")
        return [np.sort(part) for part in np.array_split(rng.permutation(len(labels)), num_clients)]
    classes = np.unique(labels)
    if scheme == "classes":
        if num_clients > len(classes):
            raise DataError(f"{num_clients} clients cannot each get a class group of {len(classes)} classes; use iid or dirichlet")
        groups = np.array_split(classes, num_clients)
        return [np.sort(np.flatnonzero(np.isin(labels, g))) for g in groups]
    if scheme == "dirichlet":
        if alpha <= 0:
            raise DataError("the Dirichlet alpha must be positive")
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].extend(chunk.tolist())
        empty = [k for k, p in enumerate(parts) if not p]
        if empty:
            raise DataError(f"Dirichlet(alpha={alpha}) left clients {empty} without data; raise --alpha or use fewer clients")
        return [np.sort(np.asarray(p)) for p in parts]
    raise DataError(f"unknown partition {scheme!r}: use iid, classes or dirichlet")


def write_shards(root: Path, out: Path, num_clients: int, scheme: PartitionScheme, seed: int = 0, alpha: float = 0.5) -> list[Path]:
    """Partition an image folder with class sub-folders into ``out/client-<k>/<class>/...`` (hard links or copies)."""
    found = scan_image_folder(root)
    names = sorted({c for _, c in found})
    labels = np.array([names.index(c) for _, c in found])
    shards = []
    for k, indices in enumerate(partition(labels, num_clients, scheme, seed, alpha)):
        shard = out / f"client-{k}"
        for i in indices:
            src, cls = found[i]
            dst = shard / cls / src.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            if not dst.exists():
                try:
                    dst.hardlink_to(src)
                except OSError:
                    dst.write_bytes(src.read_bytes())
        shards.append(shard)
    return shards
