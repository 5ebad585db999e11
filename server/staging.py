"""A Release stream's validated items, kept on disk until the stream's one commit.

A stream may carry up to ``--release-max-stream-bytes`` (1 GiB by default); holding its items in memory
until the end-of-stream marker would let a few concurrent uploads exhaust the server's memory. Each
message's items are appended to an unnamed temporary file in ``<store>/staging`` as they are validated
(memory holds one message), and the commit reads them back one at a time. The file has no name (it is
unlinked at creation), so nothing is left behind by a crash, a cancelled stream or a refused commit. A disk
that refuses the write raises ``StorageFull`` (RESOURCE_EXHAUSTED with a retry hint); nothing is stored.
"""

from __future__ import annotations

import pickle
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from collafuse.server.errors import StorageFull, is_storage_error

STAGING = "staging"


class ReleaseStaging:
    """Append-only items of one stream on disk; iterate to read them back in order (one at a time)."""

    def __init__(self, store_root: Path) -> None:
        self.directory = Path(store_root) / STAGING
        self.count = 0
        try:
            self.directory.mkdir(exist_ok=True)
            # Closed by close() (the servicer's ``with``); unlinked at creation, so a crash leaves nothing.
            self._file: IO[bytes] = tempfile.TemporaryFile(dir=self.directory, prefix="release-")  # noqa: SIM115
        except OSError as exc:
            raise self._full(exc) from exc

    def extend(self, items: Iterable[object]) -> None:
        try:
            for item in items:
                # Written and read by this process only: pickle is not a trust boundary here.
                pickle.dump(item, self._file, protocol=pickle.HIGHEST_PROTOCOL)
                self.count += 1
        except OSError as exc:
            raise self._full(exc) from exc

    def __iter__(self) -> Iterator[object]:
        self._file.flush()
        self._file.seek(0)
        for _ in range(self.count):
            yield pickle.load(self._file)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def _full(self, exc: OSError) -> BaseException:
        if is_storage_error(exc):
            return StorageFull(self.directory, exc, "nothing of this Release stream was stored")
        return exc
