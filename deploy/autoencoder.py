"""``collafuse-autoencoder``: make the shared autoencoder of CollaFuse in latent space (``--autoencoder``).

    collafuse-autoencoder train --data DIR --out DIR [--steps N] [--image-size S] [--latent-channels C]
    collafuse-autoencoder inspect PATH

``train`` fits a small ``AutoencoderKL`` on an image folder its operator may share (public data, never a
client's private folder) and writes a diffusers folder (common/autoencoder_train.py); ``inspect`` loads any
autoencoder folder as the server and the client would and prints its identity. Both print one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from collafuse.common.autoencoder import AutoencoderError, load_autoencoder
from collafuse.common.autoencoder_train import AutoencoderTrainOptions, train_autoencoder
from collafuse.common.data import DataError
from collafuse.common.runtime import run_cli, setup_logging
from collafuse.common.settings import ConfigError, describe_validation_error

# Flags of `train` that map onto AutoencoderTrainOptions fields (the rest of the fields keep their defaults).
TRAIN_FLAGS: dict[str, type] = {"steps": int, "image_size": int, "channels": int, "latent_channels": int,
                                "batch_size": int, "lr": float, "kl_weight": float, "seed": int, "device": str}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="collafuse-autoencoder", description=__doc__.split("\n\n")[0])
    parser.add_argument("--log-level", default="INFO")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a small AutoencoderKL on a shareable image folder")
    train.add_argument("--data", type=Path, required=True, help="image folder (public data, never a client's own)")
    train.add_argument("--out", type=Path, required=True, help="folder to save_pretrained the autoencoder to")
    for name, kind in TRAIN_FLAGS.items():
        field = AutoencoderTrainOptions.model_fields[name]
        train.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None,
                           help=f"{field.description} (default {field.default})")
    inspect = commands.add_parser("inspect", help="load an autoencoder folder and print its identity")
    inspect.add_argument("path", type=Path)
    return parser


def train_options(args: argparse.Namespace) -> AutoencoderTrainOptions:
    given = {name: getattr(args, name) for name in TRAIN_FLAGS if getattr(args, name) is not None}
    try:
        return AutoencoderTrainOptions.model_validate(given)
    except ValidationError as exc:
        raise ConfigError(f"invalid options: {describe_validation_error(exc)}") from exc


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.command == "train":
        result = train_autoencoder(args.data, args.out, train_options(args))
        return {**asdict(result), "out": str(result.out)}
    ae = load_autoencoder(args.path)
    identity = ae.identity
    return {"class_name": identity.class_name, "weights_sha256": identity.weights_sha256,
            "identity": identity.digest(), "scaling_factor": ae.scaling_factor, "shift_factor": ae.shift_factor,
            "config": json.loads(identity.config_json)}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(None if argv is None else list(argv))
    setup_logging(args.log_level, "autoencoder")

    def body() -> int:
        sys.stdout.write(json.dumps(run(args), default=str) + "\n")
        return 0

    return run_cli(body, (AutoencoderError, DataError, ConfigError))


if __name__ == "__main__":
    raise SystemExit(main())
