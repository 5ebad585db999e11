"""The ambient minibatch's random draws come from the core's generator in one fixed order (indices, label
drop-out, t ~ U(cut, T], noise): a checkpoint stores that generator, so a resumed run, or a run of a later
version of the server, continues with the same batches only while the order holds."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from collafuse.common.diffusion import sample_server_times
from collafuse.common.models import drop_labels
from collafuse.server.distributed import DistributedError, shard_rows
from collafuse.server.protocols.ambient import AmbientBatch, AmbientSource, ReleaseRows

ALPHAS_CUMPROD = torch.linspace(0.9999, 0.01, 1001)


def source_of(null: int = 10) -> AmbientSource:
    return AmbientSource(None, ALPHAS_CUMPROD, batch_size=8, label_dropout=0.5, null_label=null,
                         device=torch.device("cpu"))


def release_rows(n: int, shape: tuple[int, ...], start: int = 0) -> ReleaseRows:
    gen = torch.Generator().manual_seed(start)
    return ReleaseRows(torch.randn((n, *shape), generator=gen), (torch.arange(n) + start) % 10,
                       torch.tensor([100, 300] * (n // 2)), ["a", "b"] * (n // 2), last_rowid=start + n, version=1,
                       forget_epoch=0)


def test_batch_draws_in_the_fixed_order() -> None:
    n, shape, null = 40, (1, 4, 4), 10
    source = source_of(null=null)
    rows = release_rows(n, shape)
    source.take(rows, full=True)

    drawn, reference = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    batch = source.batch(drawn)
    idx = torch.randint(n, (8,), generator=reference)
    labels = drop_labels(rows.labels[idx], null, 0.5, generator=reference)
    t = sample_server_times(rows.cuts[idx], 1000, reference)
    noise = torch.randn((8, *shape), generator=reference)

    assert torch.equal(batch.x_cut, rows.x_cut[idx])
    assert torch.equal(batch.labels, labels) and torch.equal(batch.cuts, rows.cuts[idx])
    assert torch.equal(batch.t, t) and torch.equal(batch.noise, noise)
    assert torch.equal(drawn.get_state(), reference.get_state())  # nothing else was drawn


def test_the_shards_of_a_batch_average_to_its_loss_with_pooled_weights() -> None:
    """Data-parallel training hands each rank a shard of rows (server/distributed.py::shard_rows) and averages
    their losses: that mean must be the whole batch's loss, pooled weights (several cuts) included."""
    source = AmbientSource(None, ALPHAS_CUMPROD, batch_size=12, label_dropout=0.5, null_label=10,
                           device=torch.device("cpu"), weighting="pooled")
    source.take(release_rows(20, (1, 4, 4)), full=True)
    batch = source.batch(torch.Generator().manual_seed(5))
    assert batch.weight is not None
    torch.manual_seed(0)
    net = Conv(1)

    @torch.no_grad()
    def loss(b: AmbientBatch) -> torch.Tensor:
        return source.loss(net, b, torch.Generator().manual_seed(99))

    for parts in (2, 3, 4):
        shards = [shard_rows(batch, part, parts) for part in range(parts)]
        assert torch.equal(torch.cat([s.x_cut for s in shards]), batch.x_cut)
        assert torch.equal(torch.cat([s.weight for s in shards if s.weight is not None]), batch.weight)
        mean = torch.stack([loss(s) for s in shards]).mean()
        assert float(mean) == pytest.approx(float(loss(batch)), rel=1e-6), parts
    with pytest.raises(DistributedError, match="multiple of the 5 ranks"):
        shard_rows(batch, 0, 5)
    with pytest.raises(DistributedError, match="dataclass of per-row tensors"):
        shard_rows((batch.x_cut, batch.t), 0, 2)
    uneven = dataclasses.replace(batch, t=batch.t[:6])
    with pytest.raises(DistributedError, match="each must hold the batch's rows"):
        shard_rows(uneven, 0, 2)


class Conv(torch.nn.Module):
    """A denoiser that uses x_t, t and the label, so a wrong shard changes the loss."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
        self.embed = torch.nn.Embedding(11, channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * (t.float() / 1000)[:, None, None, None] + self.embed(labels)[:, :, None, None]
