"""``collafuse-client``: the client lifecycle and its single steps as sub-commands.

    collafuse-client --data ./local --server HOST:PORT               # run: join, contribute, train, wait, generate
    collafuse-client contribute --data ./local --server HOST:PORT    # one step

Settings come from flags > ``COLLAFUSE_*`` env vars > ``--config`` file > defaults.
Expected problems (bad data, bad settings, unreachable server, a server refusal, a
ledger refusal) print one plain line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from collafuse.client.errors import ClientError
from collafuse.client.lifecycle import ClientLifecycle
from collafuse.common.config import ClientSettings
from collafuse.common.data import DataError
from collafuse.common.rpc import ServerUnreachable
from collafuse.common.runtime import run_cli, setup_logging, setup_torch
from collafuse.common.settings import ConfigError, SettingsFlags

EXPECTED_ERRORS: tuple[type[BaseException], ...] = (DataError, ConfigError, ServerUnreachable, ClientError)

COMMANDS: dict[str, str] = {
    "run": "the full lifecycle: register, contribute, train locally, wait for the server, generate (default)",
    "register": "join the server and check its image spec, schedule and classes against this client",
    "contribute": "send what --protocol trains the server with: ambient uploads x_cut of every image not yet "
                  "released (recorded in the ledger); split runs split steps until the server or the budget stops it",
    "release": "the ambient protocol's contribute (kept for scripts that call it)",
    "train": "train the local model on t in [1, cut] (resumes; offline once registered)",
    "generate": "server half of the sampling chain over gRPC, client half locally; writes samples/",
    "forget": "ask the server to drop every release of this client",
    "status": "the server's trainer and clients, with this client's ledger summary (JSON on stdout)",
    "ledger": "this client's release ledger summary (JSON on stdout; offline)",
    "reset": "forget the pinned server fingerprint to join a changed server; releases stay recorded (needs --yes)",
}


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, SettingsFlags[ClientSettings]]]:
    """The parser, and per sub-command the settings flags it carries (every command takes them all)."""
    parser = argparse.ArgumentParser(
        prog="collafuse-client",
        description="CollaFuse client: private images stay here; only x_cut (noised at the cut) is released.",
        epilog="Without a sub-command, `run` is assumed.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    flags: dict[str, SettingsFlags[ClientSettings]] = {}
    for name, help_text in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        if name == "reset":
            command.add_argument("--yes", action="store_true", help="confirm the reset")
        flags[name] = SettingsFlags(ClientSettings, command)
    return parser, flags


def _with_default_command(argv: Sequence[str]) -> list[str]:
    args = list(argv)
    if not args or (args[0] not in COMMANDS and args[0] not in ("-h", "--help")):
        args.insert(0, "run")
    return args


def _emit(data: object) -> None:
    # The result of status / ledger is the command's output proper (JSON for people and scripts).
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


def main(argv: Sequence[str] | None = None) -> int:
    parser, flags = build_parser()
    args = parser.parse_args(_with_default_command(sys.argv[1:] if argv is None else argv))
    command = args.command
    confirmed = bool(vars(args).pop("yes", False))
    del args.command
    # Logging first, so a settings error is reported like every other expected error.
    setup_logging("INFO", "client")

    def body() -> int:
        settings = flags[command].load(args)
        setup_logging(settings.log_level, "client")
        setup_torch(settings.threads)
        if command == "reset" and not confirmed:
            raise ClientError(
                "reset lets this client join a server whose setup (image spec, schedule, classes) changed; "
                "releases, the pinned schedule and the noise floor stay; pass --yes to confirm"
            )
        with ClientLifecycle(settings) as client:
            if command == "run":
                client.run()
            elif command == "register":
                client.register()
            elif command == "contribute":
                client.contribute()
            elif command == "release":
                if settings.protocol != "ambient":
                    raise ClientError(f"release is the ambient protocol's step; with --protocol {settings.protocol} use "
                                      "contribute")
                client.contribute()
            elif command == "train":
                client.train()
            elif command == "generate":
                client.generate()
            elif command == "forget":
                client.forget()
            elif command == "status":
                _emit(client.status())
            elif command == "ledger":
                _emit({"client_id": client.client_id, **client.ledger.summary()})
            elif command == "reset":
                client.reset()
        return 0

    return run_cli(body, EXPECTED_ERRORS)


if __name__ == "__main__":
    sys.exit(main())
