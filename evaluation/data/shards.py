"""Writing per-client shards: ``OUT/client-<k>/<class>/<image>.png`` plus ``OUT/manifest.json``.

Shared by every ``collafuse-data`` command that makes clients; each ``client-<k>`` is a ``--data``
folder for ``collafuse-client``.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from collafuse.common.data import DataError, scan_image_folder

MANIFEST = "manifest.json"


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
