"""Crash-safe writes: a JSON file or a whole folder is replaced so that a reader (or a restart after a
crash) finds the old version or the new one, never a torn one."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def write_json_atomic(path: Path, data: Any, *, indent: int | None = 2, sort_keys: bool = True) -> None:
    """Write ``data`` as JSON to a hidden temp file beside ``path``, fsync it, and rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as fh:
        json.dump(data, fh, indent=indent, sort_keys=sort_keys, default=str)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any]:
    """The stored mapping, or {} when there is none or it cannot be parsed (logged, not fatal)."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        log.warning("ignoring unreadable %s (%s); it will be rewritten", path, exc)
        return {}
    return data if isinstance(data, dict) else {}


def replace_folder(tmp: Path, folder: Path, aside: Path, *, durable: bool = False,
                   dispose: Callable[[Path], None] | None = None) -> None:
    """Swap the complete folder ``tmp`` in as ``folder``.

    A rename cannot overwrite a non-empty folder, so the current ``folder`` is moved to ``aside`` first
    and removed last: at every instant ``folder`` or ``aside`` holds a complete copy, and
    ``restore_folder`` puts ``aside`` back after a crash in between. ``durable`` fsyncs every file of
    ``tmp`` before the swap and the parent folder after it, so the rename publishes data that is on disk.
    """
    if durable:
        fsync_tree(tmp)
    if aside.exists():
        shutil.rmtree(aside)
    if folder.exists():
        os.replace(folder, aside)
    os.replace(tmp, folder)
    if durable:
        fsync_dir(folder.parent)
    if dispose is not None and aside.exists():
        dispose(aside)  # e.g. keep the replaced folder elsewhere (checkpoint history)
    shutil.rmtree(aside, ignore_errors=True)


def restore_folder(folder: Path, aside: Path) -> bool:
    """Finish a ``replace_folder`` a crash interrupted (``folder`` moved aside, the new one not yet in place).

    Returns whether ``aside`` was put back as ``folder``.
    """
    if not folder.exists() and aside.exists():
        os.replace(aside, folder)
        return True
    return False


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flush every file and folder under ``root`` so that a rename publishes complete data."""
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb+") as fh:
                os.fsync(fh.fileno())
        fsync_dir(Path(folder))
