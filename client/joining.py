"""Joining a server: Register, the checks on its reply, and the reply cached for offline steps.

The client is the guardian of its setup (docs/design.md §7): the server's fingerprint is pinned
in the ledger on first use, and a server whose fingerprint, cut range or image size
does not fit is refused before any image is loaded.
"""

from __future__ import annotations

import logging
from pathlib import Path

import grpc

from collafuse.client.connection import ServerConnection, ServerInfo
from collafuse.client.errors import ClientError, ServerFingerprintChanged
from collafuse.client.ledger import Ledger
from collafuse.client.noise_floor import check_schedule
from collafuse.common.config import ClientSettings
from collafuse.common.files import read_json, write_json_atomic
from collafuse.common.schedule import validate_cut
from collafuse.common.settings import ConfigError

log = logging.getLogger(__name__)

# The server's Register reply, cached in the client's workdir so train/generate can start offline.
# (Not the server's own server.json in its store, which says where a running server listens.)
CACHED_SERVER_FILE = "server.json"

FINGERPRINT_ADVICE = (
    "The local model and releases were made for the old setup. Point --server at the original "
    "server, or start over: use a fresh --workdir, or run `collafuse-client forget` and then "
    "`collafuse-client reset --yes` in this one."
)


def register(
    connection: ServerConnection, ledger: Ledger, settings: ClientSettings, client_id: str, classes: list[str],
    workdir: Path,
) -> ServerInfo:
    """Join the server; check its fingerprint, cut range and image size against ours; pin and cache the reply."""
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
    if expected and info.fingerprint != expected:
        raise ServerFingerprintChanged(
            f"the server at {s.server} now has fingerprint {info.fingerprint[:12]}…, but this client joined "
            f"with {expected[:12]}… (its image spec, schedule or classes changed). {FINGERPRINT_ADVICE}"
        )
    try:
        validate_cut(s.cut, info.schedule.num_train_timesteps)
    except ValueError as exc:
        raise ConfigError(f"--cut: {exc}") from exc
    # The server's schedule is an input, never an order: checked against this client's noise floor.
    check_schedule(ledger, info.schedule, s.cut, info.server_id, s.max_release_alpha_bar)
    channels, height, width = info.image_shape
    if s.image_size is not None and s.image_size != height:
        raise ConfigError(
            f"--image-size {s.image_size} does not match the server, which serves {height}x{width} images "
            f"with {channels} channel(s); drop --image-size (images are converted to the server's size on "
            "load) or start the server with the size you need"
        )
    ledger.set_fingerprint(info.fingerprint, s.server)
    write_json_atomic(workdir / CACHED_SERVER_FILE, info.to_json())
    return info


def cached_server_info(workdir: Path, fingerprint: str, cut: int) -> ServerInfo | None:
    """The cached reply when it belongs to the pinned fingerprint and serves ``cut``; else None."""
    cached = read_json(workdir / CACHED_SERVER_FILE)
    if not cached or cached.get("fingerprint") != fingerprint:
        return None
    try:
        info = ServerInfo.from_json(cached)
        validate_cut(cut, info.schedule.num_train_timesteps)
    except (KeyError, TypeError, ValueError):
        return None
    log.info("using the server setup cached in %s (fingerprint %s…)", CACHED_SERVER_FILE, info.fingerprint[:12])
    return info
