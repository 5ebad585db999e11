"""The client's images as the server serves them: converted to its spec, labels in its class order."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from collafuse.client.connection import ServerInfo
from collafuse.common.data import UNLABELED, DataError, ImageDataset, load_image_folder

log = logging.getLogger(__name__)


@dataclass
class LocalData:
    """The client's images converted to the server's spec, with labels in the server's class order."""

    root: Path
    dataset: ImageDataset
    labels: torch.Tensor


def map_labels(class_names: list[str], served: list[str], root: Path) -> torch.Tensor:
    """Label indices in the server's list; unlabeled images get the null label len(served)."""
    unknown = sorted({c for c in class_names if c != UNLABELED and c not in served})
    if unknown:
        raise DataError(
            f"classes {unknown} in {root} are not served by the server (it serves {served}); rename or remove "
            "those folders, or start the server with --classes that include them"
        )
    index = {name: i for i, name in enumerate(served)}
    return torch.tensor([index.get(c, len(served)) for c in class_names], dtype=torch.long)


def load_local_data(root: Path, info: ServerInfo) -> LocalData:
    channels, size, _ = info.image_shape
    dataset = load_image_folder(root, channels, size)
    labels = map_labels(dataset.class_names, info.class_names, root)
    log.info("loaded %d image(s) of %d class(es) from %s", len(dataset), len(set(dataset.class_names)), root)
    return LocalData(root, dataset, labels)
