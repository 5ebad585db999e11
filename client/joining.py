"""Joining a server: Register, the checks on its reply, and the reply cached for offline steps.

The client is the guardian of its setup (docs/design.md §7). It recomputes the fingerprint of what the
server serves (schedule, image spec, classes) rather than trusting the string the server sends, pins it in
the ledger, and checks every join - the first one too - against its own noise floor and its data's native
spec (client/noise_floor.py, client/local_data.py) before any image is loaded.
"""

from __future__ import annotations

import logging
from pathlib import Path

import grpc
import torch

from collafuse.client.connection import ServerConnection, ServerInfo
from collafuse.client.errors import (
    AutoencoderMismatch,
    ClientError,
    InconsistentServerReply,
    ServerFingerprintChanged,
)
from collafuse.client.latent import pixel_shape
from collafuse.client.ledger import Ledger
from collafuse.client.local_data import LookGain, data_look_gain, describe_shape
from collafuse.client.noise_floor import check_schedule, floor_config
from collafuse.common.autoencoder import (
    AutoencoderError,
    AutoencoderIdentity,
    FrozenAutoencoder,
    identity_mismatch,
    latent_fingerprint,
    load_autoencoder,
)
from collafuse.common.config import ClientSettings
from collafuse.common.files import read_json, write_json_atomic
from collafuse.common.schedule import fingerprint, validate_cut
from collafuse.common.settings import ConfigError

log = logging.getLogger(__name__)

# The server's Register reply, cached in the client's workdir so train/generate can start offline.
# (Not the server's own server.json in its store, which says where a running server listens.)
CACHED_SERVER_FILE = "server.json"

# No fresh --workdir here: a new ledger would forget what was released (and a second release of every image
# with fresh noise is what averaging needs). A reset keeps the ledger, and the new setup meets every check.
FINGERPRINT_ADVICE = (
    "The local model was made for the old setup. Point --server at the original server, or, to join this one as "
    "it is now, run `collafuse-client reset --yes` and join again: your releases, reference schedule and noise "
    "floor stay in the ledger, and the new setup is checked against them as at a first contact (its schedule "
    "against your floor, its image spec against your data)."
)


def served_fingerprint(info: ServerInfo) -> str:
    """The fingerprint of what the server serves, recomputed here (common/schedule.py::fingerprint, with the
    announced autoencoder's identity folded in: common/autoencoder.py::latent_fingerprint)."""
    return latent_fingerprint(fingerprint(info.schedule, info.image_shape, info.class_names), info.autoencoder)


def own_autoencoder(settings: ClientSettings, device: torch.device | str = "cpu") -> FrozenAutoencoder | None:
    """This client's --autoencoder (None: pixel space)."""
    if settings.autoencoder is None:
        return None
    try:
        return load_autoencoder(settings.autoencoder, device)
    except AutoencoderError as exc:
        raise ConfigError(f"--autoencoder: {exc}") from exc


def check_autoencoder(info: ServerInfo, own: AutoencoderIdentity | None, server: str) -> None:
    """Refuse a server whose autoencoder is not this client's (or that runs in the other space)."""
    problem = identity_mismatch(own, info.autoencoder)
    if problem:
        raise AutoencoderMismatch(f"not joining {server}: {problem}")


def check_reply(info: ServerInfo, server: str) -> str:
    """The recomputed fingerprint, after checking that the server's own string is that one."""
    computed = served_fingerprint(info)
    if info.fingerprint != computed:
        raise InconsistentServerReply(
            f"the server at {server} says its fingerprint is {info.fingerprint[:12]}…, but the setup it serves "
            f"(schedule T={info.schedule.num_train_timesteps}, image spec {describe_shape(info.image_shape)}, "
            f"{len(info.class_names)} classes) has fingerprint {computed[:12]}…: its reply contradicts itself, so "
            "this client does not join it. Ask its operator to check the server"
        )
    return computed


def register(
    connection: ServerConnection, ledger: Ledger, settings: ClientSettings, client_id: str, classes: list[str],
    workdir: Path, *, autoencoder: FrozenAutoencoder | None = None,
) -> ServerInfo:
    """Join the server; check its reply, fingerprint, cut range, noise floor and image spec; pin and cache it."""
    s = settings
    expected = ledger.fingerprint
    try:
        info = connection.register(client_id, s.cut, s.protocol, classes, expected)
    except ClientError as exc:
        # The server answers FAILED_PRECONDITION for other order problems too (e.g. a new cut
        # while releases are held); only a fingerprint refusal gets the fingerprint advice.
        if exc.code == grpc.StatusCode.FAILED_PRECONDITION and expected and "fingerprint" in str(exc).lower():
            raise ServerFingerprintChanged(f"{exc}. {FINGERPRINT_ADVICE}", exc.code) from None
        raise
    computed = check_reply(info, s.server)
    ae = autoencoder if autoencoder is not None else own_autoencoder(s)
    check_autoencoder(info, ae.identity if ae is not None else None, s.server)
    if expected and computed != expected:
        raise ServerFingerprintChanged(
            f"the server at {s.server} now serves a setup with fingerprint {computed[:12]}… (image spec "
            f"{describe_shape(info.image_shape)}, schedule T={info.schedule.num_train_timesteps}, "
            f"{len(info.class_names)} classes), but this client joined one with {expected[:12]}…. {FINGERPRINT_ADVICE}"
        )
    try:
        validate_cut(s.cut, info.schedule.num_train_timesteps)
    except ValueError as exc:
        raise ConfigError(f"--cut: {exc}") from exc
    # The client's own floor settings, then the server's schedule and spec checked against them (an input, never an
    # order). The spec's look gain is recorded first, so that a later release without a join still applies it.
    ledger.set_floor_config(floor_config(s), info.server_id)
    # With an autoencoder the look gain is that of the pixel spec the images are encoded at (an upsampled native
    # pixel enters the encoder many times over), recorded for the served latent spec.
    looked_at = pixel_shape(ae, info.image_shape) if ae is not None else info.image_shape
    look = data_look_gain(s.data, looked_at) if s.data is not None else LookGain(1.0, looked_at)
    ledger.set_look_gain(info.image_shape, look.gain, info.server_id, look.describe())
    check_schedule(ledger, info.schedule, s.cut, info.server_id, look=look)
    channels, height, width = looked_at
    if s.image_size is not None and s.image_size != height:
        raise ConfigError(
            f"--image-size {s.image_size} does not match the server, which serves {height}x{width} images "
            f"with {channels} channel(s); drop --image-size (images are converted to the server's size on "
            "load) or start the server with the size you need"
        )
    ledger.set_fingerprint(computed, s.server)
    write_json_atomic(workdir / CACHED_SERVER_FILE, info.to_json())
    return info


def cached_server_info(workdir: Path, fingerprint: str, cut: int) -> ServerInfo | None:
    """The cached reply when it belongs to the pinned fingerprint (recomputed) and serves ``cut``; else None."""
    cached = read_json(workdir / CACHED_SERVER_FILE)
    if not cached or not fingerprint or cached.get("fingerprint") != fingerprint:
        return None
    try:
        info = ServerInfo.from_json(cached)
        validate_cut(cut, info.schedule.num_train_timesteps)
    except (KeyError, TypeError, ValueError):
        return None
    if served_fingerprint(info) != fingerprint:
        return None
    log.info("using the server setup cached in %s (fingerprint %s…)", CACHED_SERVER_FILE, info.fingerprint[:12])
    return info
