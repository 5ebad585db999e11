"""The client in latent space (``--autoencoder``, issue 18): its images are encoded here, through the shared
frozen autoencoder, before anything is released; x0 never leaves. The server serves the latent's spec; the client
loads its images at the autoencoder's pixel spec, checks the scale of its own encoded data
(common/autoencoder.py::check_latent_scale: the noise floor applies to the scaled latents) and decodes its samples.
"""

from __future__ import annotations

import logging

from collafuse.client.errors import ClientError
from collafuse.client.local_data import LocalData
from collafuse.common.autoencoder import (
    LATENT_BOUND,
    AutoencoderError,
    FrozenAutoencoder,
    bounded_latents,
    check_latent_scale,
)
from collafuse.common.data import ImageDataset

log = logging.getLogger(__name__)

Shape = tuple[int, int, int]


def pixel_shape(ae: FrozenAutoencoder, latent: Shape) -> Shape:
    """The image spec whose latent is the served ``latent`` spec (what the client loads its images at)."""
    channels, height, width = latent
    if channels != ae.latent_channels:
        raise ClientError(f"the server serves {channels}-channel latents, but this client's autoencoder makes "
                          f"{ae.latent_channels}-channel ones: use the server's autoencoder")
    shape = (ae.in_channels, height * ae.downsample, width * ae.downsample)
    if ae.latent_shape(shape) != latent:
        raise ClientError(f"no image spec of this client's autoencoder has the served latent spec {latent}")
    return shape


def encode_local_data(data: LocalData, ae: FrozenAutoencoder) -> LocalData:
    """``data`` (images at the autoencoder's pixel spec) with its images replaced by their scaled latents, after
    checking that the latents' scale is about unit (a refusal names why), clamped to +-LATENT_BOUND (the range DP
    accounting assumes). Nothing leaves the client here."""
    images = data.dataset.images
    latents = ae.encode_batched(images)
    try:
        std = check_latent_scale(latents, f"your {len(images)} image(s) under {data.root}")
    except AutoencoderError as exc:
        raise ClientError(f"--autoencoder refused: {exc}") from exc
    outside = float((latents.abs() > LATENT_BOUND).float().mean())
    latents = bounded_latents(latents)  # the range DP accounting assumes (client/dp.py)
    log.info("encoded %d image(s) %s -> latents %s (std %.3f, within the unit-scale tolerance; %.3f%% of elements "
             "clamped to +-%g)", len(images), "x".join(map(str, images.shape[1:])), "x".join(map(str, latents.shape[1:])),
             std, 100 * outside, LATENT_BOUND)
    dataset = ImageDataset(images=latents, class_names=data.dataset.class_names, paths=data.dataset.paths)
    return LocalData(data.root, dataset, data.labels, pixels=images)
