"""The ambient protocol on the client (docs/design.md §2): upload x_cut for every image not yet released.

x_cut = sqrt(ab_cut) x0 + sqrt(1 - ab_cut) eps_c, eps_c from a seed bound to the image's
pixels and its level (client/ledger.py), so a retried or repeated upload carries
byte-identical payloads and the server's idempotent store ignores the copies. Uploads go
in several Release calls of bounded size; each payload is recorded as sent before its
call and as acknowledged after the server's ack: a crash between two calls loses
nothing, the next run resends only what was not acknowledged, and what may have
reached the server counts as released.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from collafuse.client.connection import ServerConnection
from collafuse.client.errors import ClientError
from collafuse.client.image_identity import find_copies
from collafuse.client.ledger import Ledger, SentItem
from collafuse.client.noise_floor import check_schedule, release_look_gain
from collafuse.client.protocols.base import ClientProtocol, ContributionReport
from collafuse.common.codec import encode
from collafuse.common.diffusion import release
from collafuse.common.rpc import CHUNK_BYTES
from collafuse.common.schedule import Cut, ScheduleConfig
from collafuse.v1 import collafuse_pb2

log = logging.getLogger(__name__)

# One stream message stays well under the gRPC message limit.
CHUNK_LIMIT = CHUNK_BYTES // 4
# Images per Release call: each call is acknowledged and recorded on its own.
ITEMS_PER_CALL = 512


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


@dataclass
class ReleaseReport(ContributionReport):
    """An ambient contribution: the releases sent, and what the server and the ledger made of them."""

    already_released: int = 0
    stored: int = 0
    duplicates: int = 0
    total_for_client: int = 0
    copies: int = 0  # not released: the same pixels as, or a near-duplicate of, another image (client/image_identity.py)
    re_released: int = 0  # released again under --re-release-confirm


class AmbientClient(ClientProtocol):
    """Releases x_cut once per image, in acknowledged calls of at most ``items_per_call`` images."""

    name = "ambient"
    wire = collafuse_pb2.PROTOCOL_AMBIENT

    def __init__(self, items_per_call: int = ITEMS_PER_CALL) -> None:
        self.items_per_call = items_per_call

    def contribute(
        self,
        connection: ServerConnection,
        ledger: Ledger,
        *,
        client_id: str,
        images: torch.Tensor,
        labels: Sequence[int],
        paths: Sequence[str] | None,
        cut: int,
        schedule: ScheduleConfig,
        server: str,
        resend: bool = False,
        re_release: bool = False,
        pixels: torch.Tensor | None = None,
    ) -> ReleaseReport:
        """Release every image the ledger has not yet seen go to ``server`` at ``cut``.

        The guard, in order: the schedule against the noise floor; each image keyed by its pixels, copies and
        near-duplicates of another image skipped; the ledger's rules per image (client/ledger.py); each
        payload recorded as sent before it goes.
        """
        report = ReleaseReport(images=len(images), cut=cut)
        zeta = Cut(cut, schedule.num_train_timesteps)
        if zeta.independent:
            log.info("cut %d = T: independent client model, nothing is released", cut)
            return report
        # The floor per native pixel: the spec's look gain (recorded at the join, or grey sent as RGB) counts.
        level = check_schedule(ledger, schedule, cut, server, look=release_look_gain(ledger, images))
        if zeta.global_model:
            log.warning(
                "!!! cut 0 is the GLOBAL-MODEL BASELINE: the RAW IMAGES (x_0, no noise) of %d files LEAVE THIS "
                "CLIENT and are stored by the server at %s. This is not a private setting. !!!",
                len(images), server,
            )
        seen = images if pixels is None else pixels  # identities and copies by the pixels (client/latent.py)
        ids = ledger.identify(seen, paths)
        copies = find_copies(ids, seen, ledger.released_hashes())
        plan = ledger.plan_release(ids, level, server, copies=copies, resend=resend, re_release=re_release)
        report.copies = len(plan.copies)
        for i, copy in plan.copies.items():
            log.warning("not releasing %s: it is %s (releasing both would let the server average their noise away)",
                        ids[i].name(), copy.describe())
        report.already_released = len(plan.already_released)
        if plan.already_released:
            log.info("%d image(s) were already released to %s at cut %d; skipping them", len(plan.already_released), server, cut)
        if not plan.pending:
            log.info("nothing new to release")
            return report
        alphas_cumprod = schedule.alphas_cumprod()
        for start in range(0, len(plan.pending), self.items_per_call):
            batch = plan.pending[start : start + self.items_per_call]
            seeds = plan.seeds[start : start + self.items_per_call]
            again = plan.re_release[start : start + self.items_per_call]
            x_cut = release(images[batch].float().cpu(), seeds, cut, alphas_cumprod)
            batch_keys = [ids[i].key for i in batch]
            batch_labels = [int(labels[i]) for i in batch]
            # Built once, before the call: every retry streams these very messages again.
            chunks, digests = build_chunks(client_id, cut, batch_keys, batch_labels, x_cut)
            # Sent counts as released: recorded before the first byte goes, so a failed call still counts.
            seqs = ledger.record_sent(
                [SentItem(k, y, s, d, r) for k, y, s, d, r in zip(batch_keys, batch_labels, seeds, digests, again)],
                level, self.name, server,
            )
            ack = connection.release(functools.partial(iter, chunks))
            acknowledged = ack.stored + ack.duplicates
            if acknowledged < len(batch):
                raise ClientError(
                    f"server acknowledged {acknowledged} of {len(batch)} released images; the ledger counts them "
                    "as sent (released at this level): run the release again to resend the identical bytes"
                )
            ledger.mark_acked(seqs)
            report.calls += 1
            report.sent += len(batch)
            report.re_released += sum(again)
            report.stored += int(ack.stored)
            report.duplicates += int(ack.duplicates)
            report.total_for_client = int(ack.total_for_client)
            report.payload_bytes += sum(len(item.x_cut.data) for chunk in chunks for item in chunk.items)
            log.info(
                "released %d/%d image(s) at %s (server stored %d new, %d already held)",
                report.sent, len(plan.pending), level.describe(), ack.stored, ack.duplicates,
            )
        return report
