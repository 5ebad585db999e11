"""The server in latent space (``--autoencoder``): the settings serve the autoencoder's latent spec, and the
fingerprint and the Register reply carry the autoencoder's identity (common/autoencoder.py).

The server never encodes or decodes: it trains on, samples and stores latents only. It loads the autoencoder to
know its latent shape and identity, which it announces so that a client with another autoencoder refuses.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from collafuse.common.autoencoder import (
    AutoencoderError,
    AutoencoderIdentity,
    latent_fingerprint,
    load_autoencoder,
)
from collafuse.common.config import ServerSettings
from collafuse.common.schedule import fingerprint as schedule_fingerprint
from collafuse.server.errors import StartupError
from collafuse.v1 import collafuse_pb2

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServedSetup:
    """What the server serves: its settings (image_shape the latent's with an autoencoder), the autoencoder's
    identity (None: pixel space) and the fingerprint over both."""

    settings: ServerSettings
    autoencoder: AutoencoderIdentity | None
    fingerprint: str


def served_setup(settings: ServerSettings) -> ServedSetup:
    """``settings`` (after ``for_dataset``) with the autoencoder applied; a bad autoencoder is a StartupError."""
    identity: AutoencoderIdentity | None = None
    if settings.autoencoder is not None:
        try:
            ae = load_autoencoder(settings.autoencoder)
            latent = ae.latent_shape(settings.pixel_shape)
        except AutoencoderError as exc:
            raise StartupError(f"--autoencoder: {exc}") from exc
        identity = ae.identity
        settings = settings.with_served_shape(latent)
        log.info("serving latents %dx%dx%d of %dx%dx%d images through the autoencoder %s", *latent,
                 *settings.pixel_shape, identity.describe())
    pixel = schedule_fingerprint(settings.schedule(), settings.image_shape, list(settings.classes))
    return ServedSetup(settings, identity, latent_fingerprint(pixel, identity))


def autoencoder_spec(identity: AutoencoderIdentity | None) -> collafuse_pb2.AutoencoderSpec | None:
    """The Register reply's announcement of the autoencoder (None in pixel space: the field stays unset)."""
    if identity is None:
        return None
    return collafuse_pb2.AutoencoderSpec(class_name=identity.class_name, config_json=identity.config_json,
                                         weights_sha256=identity.weights_sha256)
