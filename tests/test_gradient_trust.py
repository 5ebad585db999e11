"""The admission rule of split steps against the server's own objective (server/gradient_trust.py), alone."""

from __future__ import annotations

import pytest
import torch

from collafuse.server.gradient_trust import ContributionBook, bound_to_peers, projection


def test_a_client_may_undo_at_most_half_the_help_it_gave() -> None:
    book = ContributionBook(window=4)
    assert not book.admits("c", -0.1), "nothing banked: no step against the objective"
    for _ in range(2):
        assert book.admits("c", 1.0)
        book.record("c", 1.0)
    assert book.admits("c", -1.0) and not book.admits("c", -1.01)  # half of the 2.0 banked
    assert book.left_out == {"c": 2}
    book.forget("c")
    assert not book.admits("c", -0.1)


def test_only_the_window_of_applied_steps_counts() -> None:
    book = ContributionBook(window=2)
    for value in (5.0, 0.1, 0.1):  # the 5.0 falls out of the window
        book.record("c", value)
    assert not book.admits("c", -0.2) and book.admits("c", -0.1)


def test_a_step_far_against_the_objective_is_left_out_whatever_was_banked() -> None:
    book = ContributionBook(window=8)
    for _ in range(8):
        book.record("c", 10.0)
    assert book.admits("c", -1.0, cosine=-0.4) and not book.admits("c", -1.0, cosine=-0.6)


def test_projection_and_cosine() -> None:
    root = [torch.tensor([3.0, 4.0])]
    p, cosine = projection([torch.tensor([0.0, 2.0])], root)
    assert p == pytest.approx(1.6) and cosine == pytest.approx(0.8)
    assert projection([torch.zeros(2)], root) == (0.0, 1.0)


def test_a_client_far_above_its_peers_is_scaled_to_twice_the_median() -> None:
    grads = [[torch.tensor([1.0])], [torch.tensor([2.0])], [torch.tensor([-40.0])]]
    bounded = bound_to_peers(grads)
    assert [float(g[0]) for g in bounded] == [1.0, 2.0, -4.0]  # lower median of (1, 2, 40) is 2
    alone = [[torch.tensor([40.0])]]
    assert bound_to_peers(alone) is alone
