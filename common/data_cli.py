"""``collafuse-data``: turn datasets a user already has into per-client image folders (DESIGN 5).

Every command that makes clients writes ``OUT/client-<k>/<class>/<image>.png`` — each
``client-<k>`` is a ``--data`` folder for ``collafuse-client`` — plus ``OUT/manifest.json``
(what went where), and prints that manifest as one JSON object on stdout.

    collafuse-data digits OUT [--size 16]
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
import csv
import json
import logging
import pickle
import shutil
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from collafuse.common.data import (
    DataError,
    export_digits,
    load_image,
    partition,
    save_png,
    scan_image_folder,
    write_shards,
)
from collafuse.common.runtime import run_cli, setup_logging

log = logging.getLogger("collafuse.data")

SCHEMES = ("iid", "classes", "dirichlet")
MANIFEST = "manifest.json"


# ---------------------------------------------------------------------------- output


def scan_source(src: Path) -> list[tuple[Path, str]]:
    """The images of a source folder, with errors that name SRC (not a client's --data)."""
    if not src.exists():
        raise DataError(f"SRC {src} does not exist; pass a folder of images with one sub-folder per class")
    if not src.is_dir():
        raise DataError(f"SRC {src} is a file; pass a folder of images with one sub-folder per class")
    return scan_image_folder(src)


def prepare_out(out: Path, overwrite: bool, src: Path | None = None) -> None:
    """OUT must not already hold client folders (unless ``overwrite``) nor lie inside SRC."""
    if src is not None and out.resolve().is_relative_to(src.resolve()):
        raise DataError(f"OUT {out} lies inside SRC {src}; it would be read as a class folder next time. Choose another folder")
    if out.exists() and not out.is_dir():
        raise DataError(f"OUT {out} is a file; pass a folder")
    existing = sorted(p for p in out.glob("client-*") if p.is_dir()) if out.is_dir() else []
    if existing and not overwrite:
        raise DataError(f"{out} already holds client folders ({existing[0].name}, ...); choose an empty folder "
                        "or pass --overwrite to replace them")
    for path in existing:
        shutil.rmtree(path)
    out.mkdir(parents=True, exist_ok=True)


def summarise(out: Path, info: dict[str, Any]) -> dict[str, Any]:
    """Count images per client and class, write ``OUT/manifest.json`` and return it."""
    clients = []
    for shard in sorted((p for p in out.glob("client-*") if p.is_dir()), key=lambda p: (len(p.name), p.name)):
        classes = Counter(c for _, c in scan_image_folder(shard)) if any(shard.iterdir()) else Counter()
        clients.append({"name": shard.name, "path": str(shard), "images": sum(classes.values()),
                        "classes": dict(sorted(classes.items()))})
    manifest = {**info, "out": str(out), "clients": clients}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def write_clients(
    out: Path,
    parts: Sequence[np.ndarray],
    image_of: Callable[[int], Image.Image],
    class_of: Callable[[int], str],
    name_of: Callable[[int], str],
    desc: str,
) -> None:
    """Write item ``i`` of client ``k``'s part as ``out/client-k/<class_of(i)>/<name_of(i)>.png``."""
    total = sum(len(p) for p in parts)
    with tqdm(total=total, desc=desc, unit="img", leave=False) as bar:
        for k, indices in enumerate(parts):
            shard = out / f"client-{k}"
            shard.mkdir(parents=True, exist_ok=True)
            for i in indices:
                target = shard / class_of(int(i)) / f"{name_of(int(i))}.png"
                target.parent.mkdir(parents=True, exist_ok=True)
                image_of(int(i)).save(target)
                bar.update(1)


# ---------------------------------------------------------------------------- CIFAR-10

CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_CIFAR_RECORD = 1 + 3 * 32 * 32
_TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
_TEST_BATCHES = ["test_batch"]
# Exactly the globals a CIFAR-10 python batch needs (numpy arrays, bytes); anything else is refused.
_PICKLE_ALLOWED = {
    ("_codecs", "encode"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
}


class _CifarUnpickler(pickle.Unpickler):
    """The official CIFAR-10 python batches are pickles (made by Python 2), so pickle is the only way to read
    them. We read them only from a local, trusted copy of that dataset, with ``encoding='bytes'`` for the
    Python-2 strings, and still refuse any global beyond the numpy-array reconstruction the format needs."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _PICKLE_ALLOWED:
            raise DataError(f"refusing {module}.{name} inside a CIFAR-10 pickle; is this the official dataset file?")
        return super().find_class(module, name)


def _unpickle(path: Path) -> Any:
    try:
        with path.open("rb") as handle:
            return _CifarUnpickler(handle, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise DataError(f"{path} is not a readable CIFAR-10 python batch: {exc}") from exc


def _field(batch: dict[Any, Any], name: str) -> Any:
    for key in (name.encode(), name):
        if key in batch:
            return batch[key]
    return None


@dataclass
class ImageArrays:
    """uint8 images (N, H, W, C), integer labels, class names and a unique stem per image."""

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    ids: list[str]


def _cifar_root(src: Path) -> tuple[Path, str]:
    if not src.is_dir():
        raise DataError(f"CIFAR-10 folder {src} does not exist; pass the folder with data_batch_1 ... or data_batch_1.bin ...")
    for folder in (src, src / "cifar-10-batches-py", src / "cifar-10-batches-bin"):
        if (folder / "data_batch_1").is_file() or (folder / "test_batch").is_file():
            return folder, "python"
        if (folder / "data_batch_1.bin").is_file() or (folder / "test_batch.bin").is_file():
            return folder, "binary"
    raise DataError(f"{src} holds no CIFAR-10 batches: expected data_batch_1..5 and test_batch (python version, with "
                    "batches.meta) or data_batch_1.bin..5.bin and test_batch.bin (binary version)")


def _cifar_names(folder: Path, fmt: str) -> list[str]:
    if fmt == "python":
        meta_path = folder / "batches.meta"
        if not meta_path.is_file():
            raise DataError(f"{meta_path} is missing; the python CIFAR-10 folder needs batches.meta for the class names")
        meta = _unpickle(meta_path)
        names = _field(meta, "label_names") if isinstance(meta, dict) else None
        if not isinstance(names, list) or not names:
            raise DataError(f"{meta_path} has no label_names list; is it CIFAR-10's batches.meta?")
        return [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    meta_txt = folder / "batches.meta.txt"
    if not meta_txt.is_file():
        log.warning("%s is missing; using the standard CIFAR-10 class names", meta_txt)
        return list(CIFAR10_NAMES)
    names = [line.strip() for line in meta_txt.read_text().splitlines() if line.strip()]
    if not names:
        raise DataError(f"{meta_txt} lists no class names")
    return names


def _read_python_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(path)
    if not isinstance(batch, dict):
        raise DataError(f"{path} is not a CIFAR-10 batch (expected a dict with data and labels)")
    data, labels = _field(batch, "data"), _field(batch, "labels")
    if data is None or labels is None:
        raise DataError(f"{path} lacks the data or labels entry of a CIFAR-10 batch")
    data = np.asarray(data)
    if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8:
        raise DataError(f"{path}: data is {data.dtype}{data.shape}, expected uint8 (N, 3072)")
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (len(data),):
        raise DataError(f"{path}: {len(labels)} labels for {len(data)} images")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def _read_binary_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % _CIFAR_RECORD:
        raise DataError(f"{path}: {raw.size} bytes is not a whole number of CIFAR-10 records "
                        f"(1 label byte + 3072 pixel bytes = {_CIFAR_RECORD} bytes each)")
    records = raw.reshape(-1, _CIFAR_RECORD)
    return records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), records[:, 0].astype(np.int64)


def read_cifar10(src: Path, split: str = "train") -> ImageArrays:
    """CIFAR-10 from its python or binary batches; ``split`` is train, test or all."""
    folder, fmt = _cifar_root(src)
    names = {"train": _TRAIN_BATCHES, "test": _TEST_BATCHES, "all": _TRAIN_BATCHES + _TEST_BATCHES}.get(split)
    if names is None:
        raise DataError(f"unknown CIFAR-10 split {split!r}: use train, test or all")
    suffix = ".bin" if fmt == "binary" else ""
    present = [n for n in names if (folder / f"{n}{suffix}").is_file()]
    missing = [f"{n}{suffix}" for n in names if n not in present]
    if not present:
        raise DataError(f"{folder} has none of the {split} batches {', '.join(missing)}")
    if missing:
        log.warning("%s: missing %s; using the batches that are there", folder, ", ".join(missing))
    class_names = _cifar_names(folder, fmt)
    reader = _read_binary_batch if fmt == "binary" else _read_python_batch
    images, labels, ids = [], [], []
    for name in present:
        batch_images, batch_labels = reader(folder / f"{name}{suffix}")
        if batch_labels.size and (batch_labels.min() < 0 or batch_labels.max() >= len(class_names)):
            raise DataError(f"{folder / (name + suffix)}: label {int(batch_labels.max())} outside the {len(class_names)} classes")
        images.append(batch_images)
        labels.append(batch_labels)
        tag = "test" if name == "test_batch" else f"train{name[-1]}"
        ids += [f"{tag}_{i:05d}" for i in range(len(batch_labels))]
    log.info("CIFAR-10 (%s format, %s): %d images", fmt, split, len(ids))
    return ImageArrays(np.concatenate(images), np.concatenate(labels), class_names, ids)


def take_per_class(labels: np.ndarray, per_class: int) -> np.ndarray:
    """Indices of the first ``per_class`` images of each class (all when 0)."""
    if per_class <= 0:
        return np.arange(len(labels))
    keep = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in np.unique(labels)])
    return np.sort(keep)


# ---------------------------------------------------------------------------- CelebA


@dataclass
class CelebaAttributes:
    names: list[str]
    files: list[str]
    values: np.ndarray  # (N, A) int8 of +1 / -1


def read_celeba_attributes(path: Path) -> CelebaAttributes:
    """``list_attr_celeba.txt`` (count line, names line, ``file ±1 ...`` rows) or Kaggle's CSV."""
    if not path.is_file():
        raise DataError(f"attribute file {path} does not exist")
    if path.suffix == ".csv":
        with path.open(newline="") as handle:
            rows = list(csv.reader(handle))
        if not rows or len(rows[0]) < 2:
            raise DataError(f"{path}: expected a header 'image_id,<attribute>,...'")
        names, body, first_line = [n.strip() for n in rows[0][1:]], rows[1:], 2
    else:
        lines = path.read_text().splitlines()
        if len(lines) < 2:
            raise DataError(f"{path}: expected a count line and an attribute-name line before the rows")
        try:
            count = int(lines[0].strip())
        except ValueError as exc:
            raise DataError(f"{path} line 1: expected the image count, found {lines[0][:40]!r}") from exc
        names = lines[1].split()
        body = [line.split() for line in lines[2:] if line.strip()]
        first_line = 3
        if count != len(body):
            raise DataError(f"{path}: line 1 says {count} images but {len(body)} rows follow")
    if not names:
        raise DataError(f"{path}: no attribute names in the header")
    files, values = [], np.empty((len(body), len(names)), dtype=np.int8)
    for i, row in enumerate(body):
        if len(row) != len(names) + 1:
            raise DataError(f"{path} line {first_line + i}: {len(row) - 1} values for {len(names)} attributes")
        try:
            parsed = [int(v) for v in row[1:]]
        except ValueError as exc:
            raise DataError(f"{path} line {first_line + i}: values must be 1 or -1 ({exc})") from exc
        if any(v not in (1, -1, 0) for v in parsed):
            raise DataError(f"{path} line {first_line + i}: values must be 1 or -1")
        files.append(row[0].strip())
        values[i] = [1 if v == 1 else -1 for v in parsed]
    return CelebaAttributes(names, files, values)


def _celeba_paths(src: Path) -> tuple[Path, Path]:
    if not src.is_dir():
        raise DataError(f"CelebA folder {src} does not exist; pass the folder holding img_align_celeba/ and list_attr_celeba.txt")
    attr = next((p for p in (src / "list_attr_celeba.txt", src / "Anno" / "list_attr_celeba.txt",
                             src / "list_attr_celeba.csv") if p.is_file()), None)
    if attr is None:
        raise DataError(f"{src} has no list_attr_celeba.txt (looked in {src} and {src / 'Anno'})")
    images = next((p for p in (src / "img_align_celeba" / "img_align_celeba", src / "img_align_celeba",
                               src / "Img" / "img_align_celeba") if p.is_dir()), None)
    if images is None:
        raise DataError(f"{src} has no img_align_celeba/ folder of aligned images")
    return attr, images


def group_masks(attrs: CelebaAttributes, groups: Sequence[str]) -> np.ndarray:
    """(G, N) masks: group ``A,B,~C`` holds images with A and B and without C."""
    index = {n.lower(): i for i, n in enumerate(attrs.names)}
    masks = np.ones((len(groups), len(attrs.files)), dtype=bool)
    for g, spec in enumerate(groups):
        for term in filter(None, (t.strip() for t in spec.split(","))):
            negate = term.startswith("~")
            name = term.lstrip("~")
            if name.lower() not in index:
                raise DataError(f"unknown CelebA attribute {name!r}; known: {', '.join(attrs.names)}")
            column = attrs.values[:, index[name.lower()]] == 1
            masks[g] &= ~column if negate else column
    return masks


def assign_groups(masks: np.ndarray, mode: str) -> np.ndarray:
    """Group index per image (-1: none). ``exclusive``: images in exactly one group; ``first``: first match."""
    hits = masks.sum(axis=0)
    first = np.where(hits > 0, masks.argmax(axis=0), -1)
    if mode == "first":
        return first
    if mode == "exclusive":
        return np.where(hits == 1, first, -1)
    raise DataError(f"unknown --assign {mode!r}: use exclusive or first")


def celeba_image(path: Path, crop: int, size: int) -> Image.Image:
    """Centre crop to ``crop`` x ``crop`` (0: none), then resize to ``size`` x ``size`` (0: keep)."""
    try:
        with Image.open(path) as source:
            image = source.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from exc
    if crop:
        width, height = image.size
        if crop > min(width, height):
            raise DataError(f"--crop {crop} is larger than image {path} ({width}x{height})")
        left, top = (width - crop) // 2, (height - crop) // 2
        image = image.crop((left, top, left + crop, top + crop))
    if size and image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return image


# ---------------------------------------------------------------------------- commands


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
    attr_path, image_dir = _celeba_paths(args.src)
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


# ---------------------------------------------------------------------------- parser


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
