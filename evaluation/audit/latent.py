"""The audit of a run in latent space (``--autoencoder``, issue 18): the run's autoencoder, the client's images at its
pixel spec and their latents (the truth the attacks estimate), and the decoded views the scores and pictures use.

The autoencoder is the one the clients announced they joined with (each client's cached server setup names its
identity): the audit refuses another one, since its decoded scores would say nothing about this run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from collafuse.client.joining import CACHED_SERVER_FILE
from collafuse.common.autoencoder import (
    AutoencoderError,
    AutoencoderIdentity,
    FrozenAutoencoder,
    bounded_latents,
    load_autoencoder,
)
from collafuse.common.data import DataError, ImageDataset, load_image_folder
from collafuse.common.files import read_json
from collafuse.evaluation.audit.space import LatentSpace

log = logging.getLogger(__name__)

Shape = tuple[int, int, int]


class LatentAuditError(ValueError):
    """The latent run cannot be audited as asked; the message says what to pass."""


def announced_identity(client_dir: Path) -> AutoencoderIdentity | None:
    """The autoencoder a client joined with (its cached server setup), None for a pixel-space client."""
    announced = read_json(client_dir / CACHED_SERVER_FILE).get("autoencoder")
    return AutoencoderIdentity(**announced) if announced else None


def run_autoencoder_path(run_dir: Path) -> Path | None:
    """The --autoencoder a collafuse-sim run was made with (its metrics.json), if it says."""
    settings = read_json(run_dir / "metrics.json").get("settings") or {}
    value = settings.get("autoencoder")
    return Path(value) if value else None


@dataclass
class LatentImages:
    """A client's images at the autoencoder's pixel spec and their latents, row for row."""

    data: ImageDataset  # images: the latents (what the attacks estimate); paths and class names as loaded
    pixels: torch.Tensor
    space: LatentSpace


class LatentAudit:
    """The run's autoencoder and the latent spec it serves."""

    def __init__(self, autoencoder: FrozenAutoencoder, latent_shape: Shape) -> None:
        self.autoencoder = autoencoder
        self.latent_shape = latent_shape
        channels, height, width = latent_shape
        factor = autoencoder.downsample
        self.pixel_shape: Shape = (autoencoder.in_channels, height * factor, width * factor)
        if autoencoder.latent_shape(self.pixel_shape) != latent_shape:
            raise LatentAuditError(f"the payloads are {channels}x{height}x{width} latents, which the autoencoder "
                                   f"{autoencoder.identity.describe()} does not make: pass the run's --autoencoder")

    @classmethod
    def open(cls, path: Path | None, announced: dict[str, AutoencoderIdentity], latent_shape: Shape) -> LatentAudit:
        """Load ``path`` and check it is the autoencoder every latent client announced."""
        if path is None:
            raise LatentAuditError(f"{', '.join(sorted(announced))} ran in latent space: pass the run's autoencoder "
                                   "folder as --autoencoder (the run folder's metrics.json does not name one)")
        try:
            autoencoder = load_autoencoder(path)
        except AutoencoderError as exc:
            raise LatentAuditError(f"--autoencoder: {exc}") from exc
        for client, identity in sorted(announced.items()):
            if identity != autoencoder.identity:
                raise LatentAuditError(f"{client} joined with the autoencoder {identity.describe()}, not "
                                       f"{autoencoder.identity.describe()} at {path}: pass the run's own --autoencoder")
        log.info("auditing latent payloads through %s: scores are of decoded estimates against x0 in pixels",
                 autoencoder.identity.describe())
        return cls(autoencoder, latent_shape)

    def load(self, shard: Path) -> LatentImages:
        """A client's images at the pixel spec its latents were encoded from, and those latents."""
        try:
            loaded = load_image_folder(shard, self.pixel_shape[0], self.pixel_shape[1])
        except DataError as exc:
            raise LatentAuditError(f"cannot load the images at {shard}: {exc}") from exc
        pixels = loaded.images.float()
        latents = bounded_latents(self.autoencoder.encode_batched(pixels))  # as the client releases from
        data = ImageDataset(images=latents, class_names=loaded.class_names, paths=loaded.paths)
        return LatentImages(data, pixels, LatentSpace(self.autoencoder, latents, pixels))

    def decoded(self, sets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Latent image sets as the images they decode to (what the disclosure and the pictures compare)."""
        return {name: self.autoencoder.decode_batched(images.float()) for name, images in sets.items()}

    def describe(self) -> dict[str, Any]:
        return {"autoencoder": self.autoencoder.identity.describe(), "latent_shape": list(self.latent_shape),
                "pixel_shape": list(self.pixel_shape),
                "scored": "every estimate decoded through the autoencoder, against x0 in pixels"}
