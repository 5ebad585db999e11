"""``collafuse-data``: turn datasets a user already has into per-client image folders (docs/design.md §9).

Every command that makes clients writes ``OUT/client-<k>/<class>/<image>.png`` — each
``client-<k>`` is a ``--data`` folder for ``collafuse-client`` — plus ``OUT/manifest.json``
(what went where), and prints that manifest as one JSON object on stdout.

    collafuse-data digits OUT [--size 16]
    collafuse-data photos OUT [--size 64] [--per-class 300]
    collafuse-data partition SRC OUT --clients N --scheme iid|classes|dirichlet [--alpha A] [--seed S]
    collafuse-data folder SRC OUT --clients N --scheme ... [--size S] [--channels 1|3]
    collafuse-data cifar10 SRC OUT --clients N --scheme ... [--split train|test|all] [--per-class K]
    collafuse-data celeba SRC OUT --attributes Male Eyeglasses ... [--class-attribute Smiling|all] [--crop 140 --size 64]

``cifar10`` reads the official python batches (``data_batch_1`` … ``data_batch_5``,
``test_batch``, ``batches.meta``) or the binary ones (``data_batch_1.bin`` …,
``test_batch.bin``, ``batches.meta.txt``). ``celeba`` reads ``img_align_celeba/`` and
``list_attr_celeba.txt`` (or Kaggle's ``list_attr_celeba.csv``) and makes one client per
attribute group, like the paper's attribute-defined clients.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from collafuse.common.data import DataError, load_image, save_png, scan_image_folder
from collafuse.common.runtime import run_cli, setup_logging
from collafuse.evaluation.data.celeba import (
    assign_groups,
    celeba_image,
    celeba_paths,
    group_masks,
    read_celeba_attributes,
)
from collafuse.evaluation.data.cifar import read_cifar10, take_per_class
from collafuse.evaluation.data.digits import export_digits
from collafuse.evaluation.data.partition import SCHEMES, partition, write_shards
from collafuse.evaluation.data.photos import export_photo_crops
from collafuse.evaluation.data.shards import prepare_out, scan_source, summarise, write_clients

log = logging.getLogger("collafuse.data")


def cmd_digits(args: argparse.Namespace) -> dict[str, Any]:
    if args.size < 1:
        raise DataError("--size must be positive")
    export_digits(args.out, args.size)
    classes = Counter(c for _, c in scan_image_folder(args.out))
    return {"dataset": "digits", "out": str(args.out), "size": args.size, "images": sum(classes.values()),
            "classes": dict(sorted(classes.items(), key=lambda kv: int(kv[0])))}


def _scheme_info(args: argparse.Namespace) -> dict[str, Any]:
    return {"clients_requested": args.clients, "scheme": args.scheme, "seed": args.seed,
            **({"alpha": args.alpha} if args.scheme == "dirichlet" else {})}


def cmd_photos(args: argparse.Namespace) -> dict[str, Any]:
    if args.size < 8 or args.per_class < 1:
        raise DataError("--size must be at least 8 and --per-class at least 1")
    export_photo_crops(args.out, args.size, args.per_class, args.seed)
    classes = Counter(c for _, c in scan_image_folder(args.out))
    return {"dataset": "photos", "out": str(args.out), "size": args.size, "channels": 3,
            "images": sum(classes.values()), "classes": dict(sorted(classes.items()))}


def cmd_partition(args: argparse.Namespace) -> dict[str, Any]:
    scan_source(args.src)
    prepare_out(args.out, args.overwrite, args.src)
    write_shards(args.src, args.out, args.clients, args.scheme, args.seed, args.alpha)
    return summarise(args.out, {"dataset": "folder", "src": str(args.src), **_scheme_info(args)})


def cmd_folder(args: argparse.Namespace) -> dict[str, Any]:
    if args.size is None and args.channels is None:
        return cmd_partition(args)
    found = scan_source(args.src)
    prepare_out(args.out, args.overwrite, args.src)
    names = sorted({c for _, c in found})
    labels = np.array([names.index(c) for _, c in found])
    parts = partition(labels, args.clients, args.scheme, args.seed, args.alpha)
    channels = args.channels or 3

    def write(k: int, i: int) -> None:
        path, cls = found[i]
        save_png(load_image(path, channels, args.size), args.out / f"client-{k}" / cls / f"{path.stem}.png")

    for k, indices in enumerate(parts):
        for i in tqdm(indices, desc=f"client-{k}", unit="img", leave=False):
            write(k, int(i))
    return summarise(args.out, {"dataset": "folder", "src": str(args.src), "size": args.size, "channels": channels,
                                **_scheme_info(args)})


def cmd_cifar10(args: argparse.Namespace) -> dict[str, Any]:
    data = read_cifar10(args.src, args.split)
    keep = take_per_class(data.labels, args.per_class)
    prepare_out(args.out, args.overwrite)
    parts = [keep[p] for p in partition(data.labels[keep], args.clients, args.scheme, args.seed, args.alpha)]
    write_clients(
        args.out, parts,
        image_of=lambda i: Image.fromarray(data.images[i]),
        class_of=lambda i: data.class_names[data.labels[i]],
        name_of=lambda i: data.ids[i],
        desc="cifar10",
    )
    return summarise(args.out, {"dataset": "cifar10", "src": str(args.src), "split": args.split,
                                "per_class": args.per_class, **_scheme_info(args)})


def cmd_celeba(args: argparse.Namespace) -> dict[str, Any]:
    attr_path, image_dir = celeba_paths(args.src)
    attrs = read_celeba_attributes(attr_path)
    masks = group_masks(attrs, args.attributes)
    group = assign_groups(masks, args.assign)
    class_column = None
    if args.class_attribute.lower() != "all":
        lookup = {n.lower(): i for i, n in enumerate(attrs.names)}
        if args.class_attribute.lower() not in lookup:
            raise DataError(f"unknown --class-attribute {args.class_attribute!r}; use all or one of {', '.join(attrs.names)}")
        class_column = lookup[args.class_attribute.lower()]
        class_name = attrs.names[class_column]
    rng = np.random.default_rng(args.seed)
    parts = []
    for g, spec in enumerate(args.attributes):
        members = np.flatnonzero(group == g)
        if len(members) == 0:
            raise DataError(f"attribute group {spec!r} got no images (--assign {args.assign}); "
                            "choose other attributes or --assign first")
        if args.per_client and len(members) > args.per_client:
            members = np.sort(rng.choice(members, args.per_client, replace=False))
        parts.append(members)
    missing = [attrs.files[i] for p in parts for i in p if not (image_dir / attrs.files[i]).is_file()]
    if missing and not args.skip_missing:
        raise DataError(f"{len(missing)} images listed in {attr_path.name} are not in {image_dir} (e.g. {missing[0]}); "
                        "pass --skip-missing to leave them out")
    if missing:
        log.warning("leaving out %d images missing from %s", len(missing), image_dir)
        absent = set(missing)
        parts = [np.array([i for i in p if attrs.files[i] not in absent], dtype=np.int64) for p in parts]
    prepare_out(args.out, args.overwrite, args.src)

    def class_of(i: int) -> str:
        if class_column is None:
            return "all"
        return class_name if attrs.values[i, class_column] == 1 else f"not_{class_name}"

    write_clients(
        args.out, parts,
        image_of=lambda i: celeba_image(image_dir / attrs.files[i], args.crop, args.size),
        class_of=class_of,
        name_of=lambda i: Path(attrs.files[i]).stem,
        desc="celeba",
    )
    groups = [{"client": f"client-{g}", "group": spec, "matching": int(masks[g].sum()), "kept": len(parts[g])}
              for g, spec in enumerate(args.attributes)]
    return summarise(args.out, {"dataset": "celeba", "src": str(args.src), "groups": groups, "assign": args.assign,
                                "class_attribute": args.class_attribute, "crop": args.crop, "size": args.size,
                                "per_client": args.per_client, "seed": args.seed})


def _client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clients", type=int, required=True, help="number of clients")
    parser.add_argument("--scheme", choices=SCHEMES, default="iid",
                        help="iid; classes (contiguous class groups); dirichlet (label skew, see --alpha) [default: iid]")
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration; smaller = more skewed [default: 0.5]")
    _output_options(parser)


def _output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace client-* folders already in OUT")
    parser.add_argument("--log-level", default="INFO")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="collafuse-data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    digits = sub.add_parser("digits", help="export scikit-learn's digits as OUT/<digit>/<index>.png")
    digits.add_argument("out", type=Path)
    digits.add_argument("--size", type=int, default=16, help="image side (the originals are 8x8) [default: 16]")
    digits.add_argument("--log-level", default="INFO")

    photos = sub.add_parser("photos", help="64x64 colour crops of scikit-learn's two sample photographs "
                            "(OUT/china, OUT/flower): larger images for the latent path, no download")
    photos.add_argument("out", type=Path)
    photos.add_argument("--size", type=int, default=64, help="image side [default: 64]")
    photos.add_argument("--per-class", type=int, default=300, help="crops of each photograph [default: 300]")
    photos.add_argument("--seed", type=int, default=0)
    photos.add_argument("--log-level", default="INFO")

    part = sub.add_parser("partition", help="split a class-folder image folder across clients (hard links)")
    part.add_argument("src", type=Path)
    part.add_argument("out", type=Path)
    _client_options(part)

    folder = sub.add_parser("folder", help="like partition, optionally converting to --size / --channels")
    folder.add_argument("src", type=Path)
    folder.add_argument("out", type=Path)
    folder.add_argument("--size", type=int, default=None, help="resize to SIZE x SIZE")
    folder.add_argument("--channels", type=int, choices=[1, 3], default=None, help="1 grey, 3 RGB")
    _client_options(folder)

    cifar = sub.add_parser("cifar10", help="CIFAR-10 python or binary batches -> per-client folders")
    cifar.add_argument("src", type=Path, help="folder with data_batch_* (or its parent)")
    cifar.add_argument("out", type=Path)
    cifar.add_argument("--split", choices=["train", "test", "all"], default="train")
    cifar.add_argument("--per-class", type=int, default=0, help="keep the first K images of each class; 0 keeps all")
    _client_options(cifar)

    celeba = sub.add_parser("celeba", help="CelebA aligned images -> one client per attribute group")
    celeba.add_argument("src", type=Path, help="folder with img_align_celeba/ and list_attr_celeba.txt")
    celeba.add_argument("out", type=Path)
    celeba.add_argument("--attributes", nargs="+", required=True, metavar="GROUP",
                        help="one client per group; a group is ATTR or ATTR,ATTR,... (all must hold); "
                             "prefix ~ for 'not' (quote it: '~Male')")
    celeba.add_argument("--assign", choices=["exclusive", "first"], default="exclusive",
                        help="exclusive: images in exactly one group; first: the first group that matches [default: exclusive]")
    celeba.add_argument("--class-attribute", default="all",
                        help="class sub-folders by this attribute (<attr> / not_<attr>), or all: one class [default: all]")
    celeba.add_argument("--crop", type=int, default=140, help="centre crop side before resizing; 0: none [default: 140]")
    celeba.add_argument("--size", type=int, default=64, help="output side; 0 keeps the crop's size [default: 64]")
    celeba.add_argument("--per-client", type=int, default=0, help="at most K images per client (random); 0: all")
    celeba.add_argument("--skip-missing", action="store_true", help="leave out listed images that are not on disk")
    _output_options(celeba)
    return parser


COMMANDS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "digits": cmd_digits,
    "photos": cmd_photos,
    "partition": cmd_partition,
    "folder": cmd_folder,
    "cifar10": cmd_cifar10,
    "celeba": cmd_celeba,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, "data")

    def body() -> int:
        if getattr(args, "clients", 1) < 1:
            raise DataError("--clients must be at least 1")
        result = COMMANDS[args.command](args)
        sys.stdout.write(json.dumps(result) + "\n")
        return 0

    return run_cli(body, (DataError,))


if __name__ == "__main__":
    sys.exit(main())
