"""The client's images as the server serves them: converted to its spec, labels in its class order; and what the
images are natively, so that a served spec never shows the server a native pixel more than once (docs/design.md §7)."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from collafuse.client.connection import ServerInfo
from collafuse.common.data import UNLABELED, DataError, ImageDataset, load_image_folder, scan_image_folder
from collafuse.common.image_spec import look_gain, native_shape

log = logging.getLogger(__name__)

Shape = tuple[int, int, int]


@dataclass
class LocalData:
    """The client's images converted to the server's spec, with labels in the server's class order."""

    root: Path
    dataset: ImageDataset
    labels: torch.Tensor
    # --autoencoder: the images (at the autoencoder's pixel spec) that ``dataset.images``, their latents, encode
    pixels: torch.Tensor | None = None


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


def load_local_data(root: Path, info: ServerInfo, shape: Shape | None = None) -> LocalData:
    """The images under ``root`` at the served spec (or at ``shape``: with --autoencoder, the pixel spec whose
    latent the server serves), labels in the server's class order."""
    channels, size, _ = shape or info.image_shape
    dataset = load_image_folder(root, channels, size)
    labels = map_labels(dataset.class_names, info.class_names, root)
    log.info("loaded %d image(s) of %d class(es) from %s", len(dataset), len(set(dataset.class_names)), root)
    return LocalData(root, dataset, labels)


# ---- the data's native spec -----------------------------------------------------------------------------------


def describe_shape(shape: Sequence[int]) -> str:
    c, h, w = shape
    return f"{c}x{h}x{w} ({'grey' if c == 1 else 'colour'})"


@dataclass(frozen=True)
class LookGain:
    """How many honest looks at one release the served spec gives the most exposed native pixel direction of the
    client's data (common/image_spec.py::look_gain): 1 when the server serves the data's own spec (or a smaller one)."""

    gain: float
    served: Shape
    native: Shape | None = None  # the native shape that gives ``gain`` (None: the data is not known)
    example: str | None = None  # one image of that shape
    images: int = 0  # images of that shape

    @property
    def inflated(self) -> bool:
        return self.gain > 1.0

    def describe(self) -> str:
        if self.native is None or not self.inflated:
            return f"the server serves {describe_shape(self.served)}, no larger than your images"
        many = f"{self.images} image(s), e.g. {self.example}," if self.example else f"{self.images} image(s)"
        return (
            f"the server serves {describe_shape(self.served)} and {many} are {describe_shape(self.native)}: converted, "
            f"each native pixel reaches the server up to {self.gain:.3g} times over, with independent noise "
            "(replicated channels, upsampled pixels)"
        )


def native_shapes(root: Path, served_channels: int = 3) -> dict[Shape, list[str]]:
    """Native (channels, height, width) -> the images (paths relative to ``root``) stored so. Reads every file's
    header; with an RGB spec served, also the bands of colour files (a grey image saved as RGB is grey)."""
    root = Path(root)
    shapes: dict[Shape, list[str]] = defaultdict(list)
    for path, _ in scan_image_folder(root):
        shapes[native_shape(path, check_bands=served_channels > 1)].append(str(path.relative_to(root)))
    return dict(shapes)


def data_look_gain(root: Path, served: Shape) -> LookGain:
    """The served spec's look gain over the client's images: the largest over their native shapes."""
    worst = LookGain(1.0, served)
    for shape, paths in sorted(native_shapes(root, served[0]).items()):
        gain = look_gain(shape, served)
        if worst.native is None or gain > worst.gain:
            worst = LookGain(gain, served, shape, paths[0], len(paths))
    return worst
