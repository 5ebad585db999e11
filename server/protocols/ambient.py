"""The ambient protocol on the server (docs/design.md §2): releases x_cut are stored once per image, and the
trainer re-noises them from each release's own cut to t > cut.

- ``ReleaseTable`` is the protocol's table: one row per (client, image key), the payload bytes as they
  came over the wire (float32 little-endian [C, H, W]) and their SHA-256, computed once.
- ``AmbientProtocol`` validates a Release stream's items and commits a whole stream in one transaction.
- ``AmbientSource`` is what the trainer learns from: the releases in memory, loaded incrementally
  (rows after the last one seen; everything again only after a forget), and ``ambient_server_loss``;
  with ``--ambient-weighting pooled`` and releases at several cuts, each minibatch carries the per-release
  weights of ``ambient_pooled_weights`` (the mixed-cuts correction of docs/design.md §2).
- ``AmbientBatch`` carries every random draw of the loss, so data-parallel training
  (``server/distributed.py``) can hand each rank a shard of its rows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import torch

from collafuse.common.codec import TensorError, decode
from collafuse.common.config import AmbientLoss, AmbientTimesteps, AmbientWeighting, ServerSettings
from collafuse.common.diffusion import (
    Denoiser,
    ambient_pooled_weights,
    ambient_server_loss,
    sample_server_times,
    sample_server_times_c2,
)
from collafuse.common.models import drop_labels
from collafuse.common.schedule import Cut, validate_cut
from collafuse.server.errors import RequestRefused, StoreError
from collafuse.server.protocols.base import LabelCheck, ReleaseOutcome, ServerProtocol, TrainingSource
from collafuse.server.store import ClientRecord, ReleaseStore, TableSpec
from collafuse.v1 import collafuse_pb2

log = logging.getLogger(__name__)

Code = grpc.StatusCode

# A release is sqrt(ab) x0 + sqrt(1 - ab) eps with x0 in [-1, 1]: |x| beyond this is not a release.
MAX_ABS_RELEASE = 50.0
MAX_KEY_LENGTH = 256
# Keys named in a conflict message (the rest are counted): an error must stay small.
KEYS_SHOWN = 3

TABLE = TableSpec(
    schema="""
CREATE TABLE IF NOT EXISTS releases (
    client_id TEXT NOT NULL,
    image_key TEXT NOT NULL,
    label INTEGER NOT NULL,
    cut INTEGER NOT NULL,
    dtype TEXT NOT NULL,
    shape TEXT NOT NULL,
    data BLOB NOT NULL,
    sha256 TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (client_id, image_key)
);
-- The primary key serves the queries by client (Status's counts, forget); the trainer asks for the distinct
-- cuts held after every new release (ReleaseTable.summary), a scan of every row and its payload without this.
CREATE INDEX IF NOT EXISTS releases_cut ON releases (cut);
""",
    client_tables=("releases",),
)


@dataclass(frozen=True)
class NewRelease:
    """One validated x_cut to store: the wire bytes (float32 little-endian, C-contiguous) and their digest."""

    image_key: str
    label: int
    shape: tuple[int, ...]
    data: bytes
    sha256: str

    @classmethod
    def of(cls, image_key: str, label: int, x_cut: torch.Tensor) -> NewRelease:
        """From a tensor (tests, tools); the servicer builds items from the wire bytes directly."""
        array = np.ascontiguousarray(x_cut.detach().cpu().numpy(), dtype="<f4")
        data = array.tobytes()
        return cls(image_key, int(label), tuple(array.shape), data, hashlib.sha256(data).hexdigest())


class ReleaseConflict(Exception):
    """Items whose key is stored with another payload or cut; the transaction was rolled back."""

    def __init__(self, client_id: str, keys: list[str]) -> None:
        shown = ", ".join(repr(k[:40]) for k in keys[:KEYS_SHOWN])
        more = f" and {len(keys) - KEYS_SHOWN} more" if len(keys) > KEYS_SHOWN else ""
        super().__init__(
            f"{len(keys)} image key(s) ({shown}{more}) are already stored for client {client_id[:64]!r} with a "
            "different payload or cut. A release is never replaced (two noise draws of one image let an observer "
            "average the noise away), so nothing of this upload was stored. Re-send the payload each key was first "
            "released with (the client's ledger seeds reproduce it), or forget this client and release again"
        )
        self.keys = keys


@dataclass(frozen=True)
class ReleaseRows:
    """Rows of the release table after ``after_rowid``, in rowid (insertion) order, as tensors on the CPU."""

    x_cut: torch.Tensor  # float32 [N, C, H, W]
    labels: torch.Tensor  # int64 [N]
    cuts: torch.Tensor  # int64 [N]
    client_ids: list[str]  # per row
    last_rowid: int
    version: int
    forget_epoch: int

    def __len__(self) -> int:
        return int(self.labels.shape[0])


class ReleaseTable:
    """The protocol's rows in the server's store."""

    def __init__(self, store: ReleaseStore) -> None:
        self.store = store

    def add(self, client_id: str, cut: int, items: Iterable[NewRelease]) -> tuple[int, int]:
        """All ``items`` in one transaction; returns (stored, duplicates).

        An item whose key is already held with the same payload and cut is a duplicate (a retry) and
        ignored; one held with another payload or cut raises ``ReleaseConflict`` and nothing is stored.
        """
        stored = duplicates = 0
        conflicts: list[str] = []
        now = time.time()
        with self.store.transaction() as conn:
            for item in items:
                cursor = conn.execute(
                    "INSERT OR IGNORE INTO releases (client_id, image_key, label, cut, dtype, shape, data, sha256, "
                    "created_at) VALUES (?, ?, ?, ?, 'float32', ?, ?, ?, ?)",
                    (client_id, item.image_key, int(item.label), int(cut), json.dumps(list(item.shape)), item.data,
                     item.sha256, now),
                )
                if cursor.rowcount == 1:
                    stored += 1
                    continue
                kept = conn.execute(
                    "SELECT sha256, cut FROM releases WHERE client_id = ? AND image_key = ?", (client_id, item.image_key)
                ).fetchone()
                if kept is not None and (kept[0] != item.sha256 or int(kept[1]) != int(cut)):
                    conflicts.append(item.image_key)
                else:
                    duplicates += 1
            if conflicts:
                raise ReleaseConflict(client_id, conflicts)  # rolls the transaction back
            if stored:
                self.store.bump(conn)
        return stored, duplicates

    def row_ids(self, after_rowid: int = 0, chunk: int = 65_536) -> tuple[np.ndarray, int, int]:
        """(rowids after ``after_rowid`` in order, store version, forget epoch): no payload is read."""
        with self.store.reading() as conn:
            version, epoch = self.store.version, self.store.forget_epoch
            cursor = conn.execute("SELECT rowid FROM releases WHERE rowid > ? ORDER BY rowid", (int(after_rowid),))
            parts = []
            while batch := cursor.fetchmany(chunk):
                parts.append(np.fromiter((r[0] for r in batch), dtype=np.int64, count=len(batch)))
        return (np.concatenate(parts) if parts else np.empty((0,), dtype=np.int64)), version, epoch

    def summary(self) -> tuple[list[str], list[int]]:
        """(the clients with releases, the distinct cuts held), both sorted."""
        with self.store.reading() as conn:
            clients = [str(r[0]) for r in conn.execute("SELECT DISTINCT client_id FROM releases ORDER BY 1")]
            cuts = [int(r[0]) for r in conn.execute("SELECT DISTINCT cut FROM releases ORDER BY 1")]
        return clients, cuts

    def fetch(self, rowids: Iterable[int]) -> dict[int, tuple[np.ndarray, int, int]]:
        """rowid -> (x_cut as float32 [C, H, W], label, cut) for the rows that still exist."""
        wanted = sorted({int(r) for r in rowids})
        found: dict[int, tuple[np.ndarray, int, int]] = {}
        with self.store.reading() as conn:
            for start in range(0, len(wanted), 500):  # SQLite's bound on host parameters
                part = wanted[start:start + 500]
                marks = ",".join("?" * len(part))
                for rowid, label, cut, shape, data in conn.execute(
                    f"SELECT rowid, label, cut, shape, data FROM releases WHERE rowid IN ({marks})", part
                ):
                    x = np.frombuffer(data, dtype="<f4").reshape(json.loads(shape)).astype(np.float32)
                    found[int(rowid)] = (x, int(label), int(cut))
        return found

    def load(self, after_rowid: int = 0) -> ReleaseRows:
        """The rows after ``after_rowid`` (0: all), with the store's version and forget epoch they belong to."""
        with self.store.reading() as conn:
            # Rows and counters under one lock: the triple is consistent.
            version = self.store.version
            epoch = self.store.forget_epoch
            rows = conn.execute(
                "SELECT rowid, client_id, label, cut, shape, data FROM releases WHERE rowid > ? ORDER BY rowid",
                (int(after_rowid),),
            ).fetchall()
        if not rows:
            empty = torch.empty((0,), dtype=torch.long)
            return ReleaseRows(torch.empty((0,)), empty, empty.clone(), [], int(after_rowid), version, epoch)
        shapes = {r[4] for r in rows}
        if len(shapes) != 1:
            raise StoreError(
                f"the store {self.store.root} holds releases of several shapes {sorted(shapes)}; use a fresh --store"
            )
        shape = json.loads(rows[0][4])
        # One buffer for all rows; the blobs are float32 little-endian as received.
        x = np.frombuffer(b"".join(r[5] for r in rows), dtype="<f4").reshape(len(rows), *shape)
        return ReleaseRows(
            x_cut=torch.from_numpy(x.astype(np.float32, copy=True)),
            labels=torch.tensor([r[2] for r in rows], dtype=torch.long),
            cuts=torch.tensor([r[3] for r in rows], dtype=torch.long),
            client_ids=[str(r[1]) for r in rows],
            last_rowid=int(rows[-1][0]),
            version=version,
            forget_epoch=epoch,
        )


@dataclass(frozen=True)
class AmbientBatch:
    """A minibatch with every random draw of its loss (t, noise), so that a shard of its rows (one data-parallel
    rank's share, ``server/distributed.py``) computes exactly that shard's part of the whole batch's loss."""

    x_cut: torch.Tensor
    labels: torch.Tensor
    cuts: torch.Tensor
    t: torch.Tensor
    noise: torch.Tensor  # on the CPU (drawn before the copy to the device, see batch())
    # Per-release loss weights (--ambient-weighting pooled with several cuts held), else None: plain MSE.
    weight: torch.Tensor | None = None


class _Growing:
    """A tensor that grows along dim 0 with doubling capacity: appending N rows in total copies O(N)."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device
        self._buffer: torch.Tensor | None = None
        self.size = 0

    def append(self, rows: torch.Tensor) -> None:
        rows = rows.to(self.device) if self.device is not None else rows
        need = self.size + rows.shape[0]
        if self._buffer is None or need > self._buffer.shape[0]:
            grown = torch.empty((max(need, 2 * self.size, 16), *rows.shape[1:]), dtype=rows.dtype, device=rows.device)
            if self._buffer is not None:
                grown[: self.size] = self._buffer[: self.size]
            self._buffer = grown
        self._buffer[self.size:need] = rows
        self.size = need

    @property
    def view(self) -> torch.Tensor:
        assert self._buffer is not None
        return self._buffer[: self.size]


class AmbientSource(TrainingSource[AmbientBatch]):
    """Every stored release in memory (x_cut on the training device), minibatches drawn uniformly."""

    def __init__(
        self,
        table: ReleaseTable | None,  # None: a data-parallel replica, which only computes the loss of shards
        alphas_cumprod: torch.Tensor,
        *,
        batch_size: int,
        label_dropout: float,
        null_label: int,
        device: torch.device,
        incremental: bool = True,
        weighting: AmbientWeighting = "standard",
        max_weight: float = 10.0,
        timesteps: AmbientTimesteps = "uniform",
        loss: AmbientLoss = "eps",
    ) -> None:
        self.table = table
        self.alphas_cumprod = alphas_cumprod
        self.batch_size = batch_size
        self.label_dropout = label_dropout
        self.null_label = null_label
        self.device = device
        # incremental=False reloads everything on every change (benchmarks/store_load.py compares the two).
        self.incremental = incremental
        # "pooled": per-release weights so that mixed cuts learn the pooled E[eps | x_t] (common/diffusion.py).
        self.weighting = weighting
        self.max_weight = max_weight
        self.timesteps = timesteps
        self.loss_kind = loss  # "x0": the x0-parametrised ambient loss (common/diffusion.py::ambient_x0_squared_error)
        self._reset()
        self.loads = 0
        self.rows_loaded = 0

    def _reset(self) -> None:
        self._x = _Growing(self.device)
        self._labels = _Growing()
        self._cuts = _Growing()
        self._clients: set[str] = set()
        self._cut_levels: set[int] = set()
        self._last_rowid = 0
        self._version = -1
        self._epoch = -1

    def refresh(self) -> bool:
        if self.table is None:
            return False
        store = self.table.store
        if store.version == self._version:
            return False
        full = not self.incremental or store.forget_epoch != self._epoch
        return self.take(self.table.load(0 if full else self._last_rowid), full)

    def take(self, rows: ReleaseRows, full: bool) -> bool:
        """Append ``rows`` (after dropping everything held when ``full``); True when anything changed."""
        if full:
            self._reset()
        self.loads += 1
        self.rows_loaded += len(rows)
        if len(rows):
            self._x.append(rows.x_cut)
            self._labels.append(rows.labels)
            self._cuts.append(rows.cuts)
            self._clients.update(rows.client_ids)
            self._cut_levels.update(int(c) for c in torch.unique(rows.cuts).tolist())
        self._last_rowid, self._version, self._epoch = rows.last_rowid, rows.version, rows.forget_epoch
        return full or bool(len(rows))

    def __len__(self) -> int:
        return self._labels.size

    @property
    def client_ids(self) -> list[str]:
        return sorted(self._clients)

    @property
    def x_cut(self) -> torch.Tensor:
        """The x_cut of every row held."""
        return self._x.view if self._x.size else torch.empty((0,))

    @property
    def labels(self) -> torch.Tensor:
        return self._labels.view

    @property
    def cuts(self) -> torch.Tensor:
        return self._cuts.view

    def batch(self, generator: torch.Generator) -> AmbientBatch:
        idx = torch.randint(len(self), (self.batch_size,), generator=generator)
        labels, cuts = self._labels_and_cuts(idx)
        labels = drop_labels(labels, self.null_label, self.label_dropout, generator=generator)
        importance: torch.Tensor | None = None
        if self.timesteps == "c2":
            t, importance = sample_server_times_c2(cuts, self.alphas_cumprod, generator)
        else:
            t = sample_server_times(cuts, self.alphas_cumprod.shape[0] - 1, generator)
        noise = torch.randn((self.batch_size, *self._row_shape()), generator=generator, dtype=torch.float32)
        weight = importance
        # One cut held: every pooled weight is 1, and the plain loss is kept bit for bit.
        if self.weighting == "pooled" and len(self._cut_levels) > 1:
            levels = torch.tensor(sorted(self._cut_levels), dtype=torch.long)
            pooled = ambient_pooled_weights(cuts, t, levels, self.alphas_cumprod, self.max_weight)
            weight = pooled if importance is None else pooled * importance
        weight = None if weight is None else weight.float()
        # Every CPU draw before the first copy to the device: that copy waits for the previous step's queued GPU
        # work, and drawing the noise (3 MB at 64x64x3, batch 64) after it left the GPU idle for ~6% of a step.
        return AmbientBatch(self._x_cut(idx), labels, cuts, t, noise, weight)

    # ---- where the rows are (StoreSource reads them from the store instead) ----------------------------------
    def _labels_and_cuts(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._labels.view[idx], self._cuts.view[idx]

    def _row_shape(self) -> tuple[int, ...]:
        return tuple(self._x.view.shape[1:])

    def _x_cut(self, idx: torch.Tensor) -> torch.Tensor:
        return self._x.view[idx.to(self.device)]

    def loss(self, net: Denoiser, batch: AmbientBatch, generator: torch.Generator) -> torch.Tensor:
        return ambient_server_loss(net, batch.x_cut, batch.labels, batch.cuts, self.alphas_cumprod, t=batch.t,
                                   noise=batch.noise, weight=batch.weight, parametrisation=self.loss_kind,
                                   max_weight=self.max_weight)

    def describe(self) -> str:
        capped = self.weighting == "pooled" or self.loss_kind == "x0"
        weighting = f", {self.weighting} weighting, {self.loss_kind} loss" + (
            f" (max weight {self.max_weight:g})" if capped else "")
        return (f"{len(self)} releases from {len(self._clients)} clients (cuts {sorted(self._cut_levels)}"
                f"{weighting})")


class AmbientProtocol(ServerProtocol):
    name = "ambient"
    wire = collafuse_pb2.PROTOCOL_AMBIENT
    table = TABLE

    def __init__(self, settings: ServerSettings, store: ReleaseStore) -> None:
        super().__init__(settings, store)
        self.releases = ReleaseTable(store)
        self.image_shape = self.settings.image_shape
        self.T = self.settings.num_train_timesteps

    def validate_release(
        self, chunk: collafuse_pb2.ReleaseChunk, client: ClientRecord, where: str, label_error: LabelCheck
    ) -> list[object]:
        try:
            validate_cut(chunk.cut, self.T)
        except ValueError as exc:
            raise RequestRefused(Code.INVALID_ARGUMENT, f"{where}: {exc}") from None
        if chunk.cut != client.cut:
            raise RequestRefused(
                Code.INVALID_ARGUMENT,
                f"{where}: released at cut {chunk.cut} but client {client.client_id!r} registered cut {client.cut}; "
                "release at the registered cut, or forget and register again with the new cut",
            )
        if Cut(chunk.cut, self.T).independent:
            raise RequestRefused(
                Code.INVALID_ARGUMENT, f"{where}: cut {chunk.cut} = T is an independent client model, which releases nothing"
            )
        items: list[object] = []
        c, h, w = self.image_shape
        for i, item in enumerate(chunk.items):
            if not item.image_key:
                raise RequestRefused(Code.INVALID_ARGUMENT, f"{where}, item {i}: image_key is empty; give every image a stable key")
            if len(item.image_key) > MAX_KEY_LENGTH:
                raise RequestRefused(Code.INVALID_ARGUMENT, f"{where}, item {i}: image_key longer than {MAX_KEY_LENGTH} characters")
            what = f"{where}, item {i} (key {item.image_key[:40]!r})"
            problem = label_error(item.label, client.class_names)
            if problem:
                raise RequestRefused(Code.INVALID_ARGUMENT, f"{what}: {problem}")
            if not item.HasField("x_cut"):
                raise RequestRefused(Code.INVALID_ARGUMENT, f"{what}: x_cut is missing")
            try:
                # Checks dtype, shape, byte count, finiteness and range; the bytes are then stored as they came.
                decode(item.x_cut, what=f"{what}: x_cut", dtypes=("float32",), shape=self.image_shape,
                       finite=True, value_range=(-MAX_ABS_RELEASE, MAX_ABS_RELEASE))
            except TensorError as exc:
                raise RequestRefused(
                    Code.INVALID_ARGUMENT, f"{exc} (the server serves {h}x{w}x{c} images, float32 [C, H, W])"
                ) from None
            data = bytes(item.x_cut.data)
            items.append(NewRelease(item.image_key, int(item.label), self.image_shape, data, hashlib.sha256(data).hexdigest()))
        return items

    def commit_release(self, client: ClientRecord, items: Iterable[object]) -> ReleaseOutcome:
        releases = (i for i in items if isinstance(i, NewRelease))
        try:
            stored, duplicates = self.releases.add(client.client_id, client.cut, releases)
        except ReleaseConflict as exc:
            self.store.count_conflicts(len(exc.keys))
            log.warning("client %s: release refused, %d conflicting key(s) (payload differs from the stored one)",
                        client.client_id[:64], len(exc.keys))
            raise RequestRefused(Code.ALREADY_EXISTS, str(exc)) from None
        return ReleaseOutcome(stored, duplicates)

    def training_source(self, device: torch.device, null_label: int) -> AmbientSource:
        return ambient_source(self.settings, self.releases, device, null_label)

    @classmethod
    def replica_source(cls, settings: ServerSettings, device: torch.device, null_label: int) -> AmbientSource:
        return ambient_source(settings, None, device, null_label)


def ambient_source(
    settings: ServerSettings, table: ReleaseTable | None, device: torch.device, null_label: int
) -> AmbientSource:
    """The trainer's source for ``settings`` (``table`` None: a replica that only computes the loss):
    every release in memory, or with ``--train-from-store`` read from the store in each batch."""
    options: dict[str, Any] = {
        "batch_size": settings.batch_size, "label_dropout": settings.label_dropout, "null_label": null_label,
        "device": device, "weighting": settings.ambient_weighting, "max_weight": settings.ambient_max_weight,
        "timesteps": settings.ambient_timesteps, "loss": settings.ambient_loss,
    }
    alphas_cumprod = settings.schedule().alphas_cumprod()
    if settings.train_from_store and table is not None:
        from collafuse.server.protocols.ambient_store import StoreSource  # it builds on AmbientSource

        return StoreSource(table, alphas_cumprod, cache_rows=settings.train_cache_rows, **options)
    return AmbientSource(table, alphas_cumprod, **options)
