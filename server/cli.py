"""``collafuse-server``: serve the shared denoiser until SIGINT/SIGTERM, then stop gracefully.

``collafuse-server checkpoints list|rollback --store DIR``: the operator's view of the checkpoints a server
keeps (``--keep-checkpoints``), and a rollback to one of them while no server runs on the store.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
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


CHECKPOINTS_COMMAND = "checkpoints"


def checkpoints_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="collafuse-server checkpoints",
        description="List the checkpoints a server keeps (--keep-checkpoints), or roll back to one of them. "
        "A rollback needs the server stopped; what it replaces moves to <store>/checkpoints-discarded.",
    )
    actions = parser.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="the kept checkpoints, newest first")
    listing.add_argument("--store", type=Path, default=ServerSettings.model_fields["store"].default,
                         help="the server's --store")
    listing.add_argument("--check", action="store_true", help="also load each one and say whether its weights "
                         "and optimizer state are finite (slower)")
    back = actions.add_parser("rollback", help="make a kept checkpoint the latest (the server resumes from it)")
    back.add_argument("--store", type=Path, default=ServerSettings.model_fields["store"].default,
                      help="the server's --store")
    back.add_argument("--step", type=int, required=True, help="the step of the kept checkpoint to go back to")
    return parser


def checkpoints(argv: Sequence[str]) -> int:
    """``collafuse-server checkpoints ...``: list or roll back (prints to stdout)."""
    args = checkpoints_parser().parse_args(list(argv))
    from collafuse.common import checkpoint  # torch and diffusers: only once the arguments are good
    from collafuse.server.app import LOCK_FILE
    from collafuse.server.trainer import CHECKPOINTS

    store = Path(args.store)
    root = store / CHECKPOINTS
    if args.action == "list":
        found = checkpoint.list_checkpoints(root)
        if not found:
            sys.stdout.write(f"no checkpoints under {root}\n")
            return 0
        for info in found:
            saved = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.saved_at))
            line = f"step {info.step:>9}  {'latest' if info.latest else 'kept  '}  {saved}  {info.folder}"
            if args.check:
                import torch

                finite = checkpoint.is_finite(checkpoint.read(info.folder, torch.device("cpu")))
                line += "  finite" if finite else "  NOT FINITE"
            sys.stdout.write(line + "\n")
        return 0
    if not store.is_dir():
        raise StartupError(f"{store} is not a server store: pass the server's --store")
    with open(store / LOCK_FILE, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StartupError(f"a collafuse-server is running on {store}: stop it before rolling back") from None
        try:
            target = checkpoint.rollback(root, args.step)
        except checkpoint.CheckpointError as exc:
            raise StartupError(str(exc)) from None
    sys.stdout.write(f"{target} is now step {args.step}; start the server to resume from it\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging("INFO", "server")
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == [CHECKPOINTS_COMMAND]:
        return run_cli(lambda: checkpoints(args[1:]), expected=(ConfigError, StartupError))
    return run_cli(lambda: serve(argv), expected=(ConfigError, StartupError))


if __name__ == "__main__":
    raise SystemExit(main())
