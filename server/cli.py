"""``collafuse-server``: serve the shared denoiser until SIGINT/SIGTERM, then stop gracefully."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from collections.abc import Sequence
from types import FrameType

from collafuse.common.config import ServerSettings
from collafuse.common.runtime import run_cli, setup_logging, setup_torch
from collafuse.common.settings import ConfigError, SettingsFlags
from collafuse.server.errors import StartupError

log = logging.getLogger("collafuse.server")

GRACE_S = 5.0


def build_parser() -> tuple[argparse.ArgumentParser, SettingsFlags[ServerSettings]]:
    parser = argparse.ArgumentParser(
        prog="collafuse-server",
        description="CollaFuse server: hosts the shared high-noise denoiser, stores clients' x_cut releases, "
        "trains in the background and runs the server half of collaborative sampling over gRPC.",
    )
    return parser, SettingsFlags(ServerSettings, parser)


def serve(argv: Sequence[str] | None = None) -> int:
    parser, flags = build_parser()
    settings = flags.load(parser.parse_args(argv))
    setup_logging(settings.log_level, "server")
    setup_torch(settings.threads)
    # Imported here so that --help and configuration errors answer without loading torch models.
    from collafuse.server import distributed
    from collafuse.server.app import build_server

    world = distributed.World.from_env()  # torchrun --nproc-per-node N: data-parallel training
    if world.distributed:
        device = distributed.start(world, settings)
        if world.rank > 0:  # no gRPC, no store: a replica that trains in lockstep with rank 0
            try:
                distributed.follow(settings, world, device)
            finally:
                distributed.shutdown()
            return 0

    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s", signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    server = build_server(settings, start_trainer=not world.distributed, data_parallel=world.size)
    try:
        if world.distributed:
            distributed.lead(server.trainer, world)
            server.trainer.start()
        log.info("CollaFuse server listening on %s:%d (device %s)", settings.host, server.port, server.device)
        served = server.settings  # with the spec of --dataset filled in
        log.info("store %s, %d classes, images %dx%dx%d", served.store, len(served.classes),
                 served.channels, served.image_size, served.image_size)
        while not stop.wait(1.0):
            pass
    finally:
        server.stop(GRACE_S)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        distributed.shutdown()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging("INFO", "server")
    return run_cli(lambda: serve(argv), expected=(ConfigError, StartupError))


if __name__ == "__main__":
    raise SystemExit(main())
