"""The ambient minibatch's random draws come from the core's generator in one fixed order (indices, label
drop-out, t ~ U(cut, T], noise): a checkpoint stores that generator, so a resumed run, or a run of a later
version of the server, continues with the same batches only while the order holds."""

from __future__ import annotations

import torch

from collafuse.common.diffusion import sample_server_times
from collafuse.common.models import drop_labels
from collafuse.server.protocols.ambient import AmbientSource, ReleaseRows


def test_batch_draws_in_the_fixed_order() -> None:
    n, shape, null = 40, (1, 4, 4), 10
    alphas_cumprod = torch.linspace(0.9999, 0.01, 1001)
    source = AmbientSource(None, alphas_cumprod, batch_size=8, label_dropout=0.5, null_label=null,
                           device=torch.device("cpu"))
    rows = ReleaseRows(torch.randn((n, *shape)), torch.arange(n) % 10, torch.tensor([100, 300] * (n // 2)),
                       ["a", "b"] * (n // 2), last_rowid=n, version=1, forget_epoch=0)
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
