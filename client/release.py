"""Upload x_cut for every image not yet released (DESIGN 1a), and write the ledger after each ack.

x_cut = sqrt(ab_cut) x0 + sqrt(1 - ab_cut) eps_c, eps_c from the image's persistent seed,
so a retried or repeated upload carries byte-identical payloads and the server's
idempotent store ignores the copies. Uploads go in several Release calls of bounded
size, each acknowledged (durably stored) before the ledger records it: a crash
between two calls loses nothing and the next run sends only the rest.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from collafuse.client.connection import ServerConnection
from collafuse.client.errors import ClientError
from collafuse.client.ledger import AckedItem, Ledger
from collafuse.common.codec import encode
from collafuse.common.diffusion import release
from collafuse.common.rpc import CHUNK_BYTES
from collafuse.common.schedule import ScheduleConfig
from collafuse.v1 import collafuse_pb2

log = logging.getLogger(__name__)

# One stream message stays well under the gRPC message limit.
CHUNK_LIMIT = CHUNK_BYTES // 4
# Images per Release call: each call is acknowledged and recorded on its own.
ITEMS_PER_CALL = 512


@dataclass
class ReleaseReport:
    images: int = 0
    sent: int = 0
    already_released: int = 0
    stored: int = 0
    duplicates: int = 0
    total_for_client: int = 0
    calls: int = 0
    payload_bytes: int = 0
    cut: int = 0

    def to_json(self) -> dict[str, int]:
        return asdict(self)


def build_chunks(
    client_id: str, cut: int, keys: Sequence[str], labels: Sequence[int], x_cut: torch.Tensor, limit: int = CHUNK_LIMIT
) -> tuple[list[collafuse_pb2.ReleaseChunk], list[str]]:
    """ReleaseChunk messages of at most ``limit`` bytes each (one item may not be split), and per-item SHA-256."""
    chunks: list[collafuse_pb2.ReleaseChunk] = []
    digests: list[str] = []
    current = collafuse_pb2.ReleaseChunk(client_id=client_id, cut=cut)
    for key, label, x in zip(keys, labels, x_cut):
        item = collafuse_pb2.ReleaseItem(image_key=key, label=int(label), x_cut=encode(x.contiguous()))
        digests.append(hashlib.sha256(item.x_cut.data).hexdigest())
        if current.items and current.ByteSize() + item.ByteSize() + 8 > limit:
            chunks.append(current)
            current = collafuse_pb2.ReleaseChunk(client_id=client_id, cut=cut)
        current.items.append(item)
    if current.items:
        chunks.append(current)
    return chunks, digests


def release_images(
    connection: ServerConnection,
    ledger: Ledger,
    *,
    client_id: str,
    images: torch.Tensor,
    labels: Sequence[int],
    keys: Sequence[str],
    paths: Sequence[str] | None,
    cut: int,
    protocol: str,
    schedule: ScheduleConfig,
    server: str,
    resend: bool = False,
    items_per_call: int = ITEMS_PER_CALL,
) -> ReleaseReport:
    """Release every image the ledger has not yet seen go to ``server`` at ``cut``."""
    report = ReleaseReport(images=len(keys), cut=cut)
    if cut >= schedule.num_train_timesteps:
        log.info("cut %d = T: independent client model, nothing is released", cut)
        return report
    if cut == 0:
        log.warning(
            "!!! cut 0 is the GLOBAL-MODEL BASELINE: the RAW IMAGES (x_0, no noise) of %d files LEAVE THIS "
            "CLIENT and are stored by the server at %s. This is not a private setting. !!!",
            len(keys), server,
        )
    plan = ledger.plan_release(keys, cut, protocol, server, paths, resend=resend)
    report.already_released = len(plan.already_released)
    if plan.already_released:
        log.info("%d image(s) were already released to %s at cut %d; skipping them", len(plan.already_released), server, cut)
    if not plan.pending:
        log.info("nothing new to release")
        return report
    alphas_cumprod = schedule.alphas_cumprod()
    for start in range(0, len(plan.pending), items_per_call):
        batch = plan.pending[start : start + items_per_call]
        seeds = plan.seeds[start : start + items_per_call]
        x_cut = release(images[batch].float().cpu(), seeds, cut, alphas_cumprod)
        batch_keys = [keys[i] for i in batch]
        batch_labels = [int(labels[i]) for i in batch]
        # Built once, before the call: every retry streams these very messages again.
        chunks, digests = build_chunks(client_id, cut, batch_keys, batch_labels, x_cut)
        ack = connection.release(lambda chunks=chunks: iter(chunks))
        acknowledged = ack.stored + ack.duplicates
        if acknowledged < len(batch):
            raise ClientError(
                f"server acknowledged {acknowledged} of {len(batch)} released images; nothing of this upload "
                "was recorded as released, run the release again"
            )
        ledger.record_releases(
            [AckedItem(k, y, s, d) for k, y, s, d in zip(batch_keys, batch_labels, seeds, digests)], cut, protocol, server
        )
        report.calls += 1
        report.sent += len(batch)
        report.stored += int(ack.stored)
        report.duplicates += int(ack.duplicates)
        report.total_for_client = int(ack.total_for_client)
        report.payload_bytes += sum(len(item.x_cut.data) for chunk in chunks for item in chunk.items)
        log.info(
            "released %d/%d image(s) at cut %d (server stored %d new, %d already held)",
            report.sent, len(plan.pending), cut, ack.stored, ack.duplicates,
        )
    return report
