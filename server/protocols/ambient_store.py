"""The ambient training source that reads its minibatches from the store (``--train-from-store``).

``AmbientSource`` holds every release in memory: at 64x64x3 a million releases are about 50 GB. This source
holds only the row ids of the releases (8 bytes a row) and reads each minibatch's rows from the store by id,
through a bounded least-recently-used cache of ``cache_rows`` decoded releases. It draws exactly what
``AmbientSource`` draws from the same generator (the same indices into the rows in rowid order, then the
same label drop-out, t and noise), so the two give the same batches on the same store
(``tests/test_ambient_store.py``) and a run can switch between them.

Rows that a Forget removed between the index and a batch are gone from the store: the index is rebuilt at the
next refresh (a forget bumps the store's epoch), and a batch that meets a missing row is drawn again after it.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

from collafuse.common.config import AmbientLoss, AmbientTimesteps, AmbientWeighting
from collafuse.server.protocols.ambient import AmbientBatch, AmbientSource, ReleaseRows, ReleaseTable

FORGET_RETRIES = 3


class RowsForgotten(RuntimeError):
    """A drawn row was removed from the store after the index was read (a Forget): refresh and draw again."""


class StoreSource(AmbientSource):
    """Row ids in memory, releases read from the store per batch through an LRU cache."""

    def __init__(
        self,
        table: ReleaseTable,
        alphas_cumprod: torch.Tensor,
        *,
        batch_size: int,
        label_dropout: float,
        null_label: int,
        device: torch.device,
        weighting: AmbientWeighting = "standard",
        max_weight: float = 10.0,
        timesteps: AmbientTimesteps = "uniform",
        loss: AmbientLoss = "eps",
        cache_rows: int = 65_536,
    ) -> None:
        self.cache_rows = cache_rows
        self._cache: OrderedDict[int, tuple[np.ndarray, int, int]] = OrderedDict()
        self._shape: tuple[int, ...] | None = None
        self._batch_rows: dict[int, tuple[np.ndarray, int, int]] = {}
        self.reads = 0  # rows read from the store
        super().__init__(table, alphas_cumprod, batch_size=batch_size, label_dropout=label_dropout,
                         null_label=null_label, device=device, weighting=weighting, max_weight=max_weight,
                         timesteps=timesteps, loss=loss)
        self.store_table: ReleaseTable = table  # the base's ``table``, never None here

    def _reset(self) -> None:
        super()._reset()
        self._ids = np.empty((0,), dtype=np.int64)

    def refresh(self) -> bool:
        table = self.store_table
        store = table.store
        if store.version == self._version:
            return False
        full = store.forget_epoch != self._epoch
        if full:
            self._reset()
            self._cache.clear()
        ids, version, epoch = table.row_ids(0 if full else self._last_rowid)
        self.loads += 1
        self.rows_loaded += len(ids)
        if len(ids):
            self._ids = np.concatenate([self._ids, ids])
            self._last_rowid = int(ids[-1])
            clients, cuts = table.summary()
            self._clients, self._cut_levels = set(clients), set(cuts)
        self._version, self._epoch = version, epoch
        return full or bool(len(ids))

    def take(self, rows: ReleaseRows, full: bool) -> bool:
        raise TypeError("a store-backed source reads its rows from the store (refresh), it is not handed them")

    def __len__(self) -> int:
        return int(self._ids.shape[0])

    @property
    def x_cut(self) -> torch.Tensor:
        raise TypeError("a store-backed source holds no x_cut in memory")

    def batch(self, generator: torch.Generator) -> AmbientBatch:
        # A Forget that lands between the trainer's check of the store and this read removes drawn rows: read
        # the index again and draw again (the generator moves on, as it would after any change of the data).
        for _ in range(FORGET_RETRIES):
            try:
                return super().batch(generator)
            except RowsForgotten:
                self.refresh()
                if not len(self):
                    break
        raise RowsForgotten("the store kept changing under this batch (Forget): the trainer reads it again")

    # ---- rows of one batch ----------------------------------------------------------------------------------
    def _labels_and_cuts(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rowids = [int(r) for r in self._ids[idx.numpy()]]
        rows = self._rows(rowids)
        self._batch_rows = rows
        labels = torch.tensor([rows[r][1] for r in rowids], dtype=torch.long)
        cuts = torch.tensor([rows[r][2] for r in rowids], dtype=torch.long)
        return labels, cuts

    def _row_shape(self) -> tuple[int, ...]:
        assert self._shape is not None  # set by the batch's rows, read just before
        return self._shape

    def _x_cut(self, idx: torch.Tensor) -> torch.Tensor:
        rowids = self._ids[idx.numpy()]
        rows, self._batch_rows = self._batch_rows, {}
        return torch.from_numpy(np.stack([rows[int(r)][0] for r in rowids])).to(self.device)

    def _rows(self, rowids: list[int]) -> dict[int, tuple[np.ndarray, int, int]]:
        """The rows of ``rowids``: cached ones, the rest read in one query (then cached)."""
        found = {r: self._cache[r] for r in rowids if r in self._cache}
        for r in found:
            self._cache.move_to_end(r)
        missing = [r for r in set(rowids) if r not in found]
        if missing:
            read = self.store_table.fetch(missing)
            self.reads += len(read)
            gone = set(missing) - set(read)
            if gone:
                self._version = -1  # re-read the index at the next refresh
                raise RowsForgotten(f"{len(gone)} drawn release(s) were forgotten after the index was read")
            found.update(read)
            if self.cache_rows > 0:
                for r, row in read.items():
                    self._cache[r] = row
                while len(self._cache) > self.cache_rows:
                    self._cache.popitem(last=False)
        self._shape = tuple(found[rowids[0]][0].shape)
        return found

    def describe(self) -> str:
        return (f"{super().describe()[:-1]}, read from the store: {len(self._cache)} of at most {self.cache_rows} "
                "rows cached)")
