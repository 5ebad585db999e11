"""The ambient minibatch's random draws come from the core's generator in one fixed order (indices, label
drop-out, t ~ U(cut, T], noise): a checkpoint stores that generator, so a resumed run, or a run of a later
version of the server, continues with the same batches only while the order holds."""

from __future__ import annotations

import pytest
import torch

from collafuse.common.diffusion import sample_server_times
from collafuse.common.models import drop_labels
from collafuse.server.protocols.ambient import AmbientSource, Partition, ReleaseRows

ALPHAS_CUMPROD = torch.linspace(0.9999, 0.01, 1001)


def source_of(partition: Partition | None = None, null: int = 10) -> AmbientSource:
    return AmbientSource(None, ALPHAS_CUMPROD, batch_size=8, label_dropout=0.5, null_label=null,
                         device=torch.device("cpu"), partition=partition or Partition())


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


def test_partitioned_ranks_hold_their_part_and_draw_their_group_of_the_global_batch() -> None:
    """Rows arrive in two loads (the second starting mid-part): rank r keeps rows r, r + 3, ...; the three
    ranks' groups, stacked, are the batch one process holding every row draws (independent: indices drawn here)."""
    shape, size = (1, 2, 2), 3
    first, second = release_rows(10, shape), release_rows(7, shape, start=10)
    every_x = torch.cat([first.x_cut, second.x_cut])
    every_labels, every_cuts = torch.cat([first.labels, second.labels]), torch.cat([first.cuts, second.cuts])
    with pytest.raises(ValueError, match="does not split"):
        source_of(Partition(3, 0))  # batch 8 over 3 ranks
    sources = [AmbientSource(None, ALPHAS_CUMPROD, batch_size=9, label_dropout=0.5, null_label=10,
                             device=torch.device("cpu"), partition=Partition(size, rank)) for rank in (0, 1, 2, None)]
    empty = ReleaseRows(torch.empty((0,)), torch.empty((0,), dtype=torch.long), torch.empty((0,), dtype=torch.long),
                        [], 0, 0, 0)
    assert [Partition(size).positions(0, 0, part).tolist() for part in range(size)] == [[], [], []]
    for source in sources:
        source.take(empty, full=True)  # the first load of an empty store
        source.take(first, full=True)
        source.take(second, full=False)
    for rank in range(size):
        assert torch.equal(sources[rank].x_cut, every_x[rank::size]) and len(sources[rank]) == 17

    generators = [torch.Generator().manual_seed(3) for _ in sources]
    batches = [s.batch(g) for s, g in zip(sources, generators, strict=True)]
    whole = batches[-1]
    for field in ("x_cut", "labels", "cuts", "t", "noise"):
        assert torch.equal(torch.cat([getattr(b, field) for b in batches[:size]]), getattr(whole, field)), field
    assert all(torch.equal(g.get_state(), generators[0].get_state()) for g in generators), "generators in step"
    # The global rows: three from each part (parts of 6, 6 and 5 rows).
    reference = torch.Generator().manual_seed(3)
    idx = torch.cat([torch.randint(rows, (3,), generator=reference) * size + part for part, rows in enumerate((6, 6, 5))])
    assert torch.equal(whole.x_cut, every_x[idx]) and torch.equal(whole.cuts, every_cuts[idx])
    assert set(whole.labels.tolist()) <= set(every_labels[idx].tolist()) | {10}


def test_a_replica_refuses_x_cut_rows_that_fit_neither_all_rows_nor_its_part() -> None:
    source = source_of(Partition(2, 1))
    rows = release_rows(6, (1, 2, 2))
    wrong = ReleaseRows(rows.x_cut[:2], rows.labels, rows.cuts, [], 6, 1, 0)
    with pytest.raises(ValueError, match="2 x_cut rows for 6 release rows"):
        source.take(wrong, full=True)
