"""Each split client's gradient rows bounded relative to the other clients' (issue 16: no single client breaks
the model).

``--split-max-grad-norm`` refuses absurd rows, but a client that stays just under it (rows 4,000 times an honest
one) still steers every round: measured on the tiny UNet, two clients, 40 rounds, the eps-MSE went from 0.59 to
2.0 (random rows) and to 253 (rows along +gradient, i.e. gradient ascent). The training core's spike guard
cannot see it, because such a client is in every round from the first.

So the server keeps, per client, the norms of its last ``WINDOW`` image rows (times the batch size: the image's
own dL_i/d(eps_hat_i)) and takes each client's median; the reference is the *lower median over clients* of those
medians, one vote per client, so one client (or any minority) cannot move it up. A row above ``factor`` times the
reference is scaled down to it before it enters a round (rows above ``--split-max-grad-norm`` are left for the
engine to refuse). With one client only, its own median is the reference (only its spikes are scaled). Rows of a
client whose own median is near the others' are never touched, so honest training, and DP-noised rows (whose
norms are alike across clients), are unchanged.
"""

from __future__ import annotations

import logging
import threading
from collections import deque

import torch

from collafuse.common.codec import TensorError, decode, encode
from collafuse.v1 import collafuse_pb2

log = logging.getLogger(__name__)

# Recent row norms kept per client, and rows a client needs before its median votes.
WINDOW = 64
MIN_ROWS = 4


class RowNormBook:
    """Per-client recent gradient-row norms and the cross-client reference; thread-safe."""

    def __init__(self, factor: float, window: int = WINDOW) -> None:
        self.factor = factor
        self.window = window
        self._lock = threading.Lock()
        self._norms: dict[str, deque[float]] = {}
        self.clipped_rows = 0

    def forget(self, client_id: str) -> None:
        with self._lock:
            self._norms.pop(client_id, None)

    def reference(self) -> float | None:
        """The lower median over clients of each client's median row norm (None until one client has MIN_ROWS)."""
        with self._lock:
            return self._reference_locked()

    def _reference_locked(self) -> float | None:
        medians = sorted(_median(norms) for norms in self._norms.values() if len(norms) >= MIN_ROWS)
        if not medians:
            return None
        return medians[(len(medians) - 1) // 2]

    def bound(self, client_id: str, grad: torch.Tensor, hard_limit: float) -> torch.Tensor:
        """``grad`` (rows of the batch-mean gradient) with rows above ``factor`` x the reference scaled down to it;
        rows above ``hard_limit`` and non-finite gradients are returned as they are (the engine refuses them).
        The rows' norms are then recorded for this client."""
        if self.factor <= 0 or grad.dim() < 1 or grad.shape[0] == 0 or not bool(torch.isfinite(grad).all()):
            return grad
        n = int(grad.shape[0])
        norms = grad.flatten(1).norm(dim=1) * n
        if bool((norms > hard_limit).any()):
            return grad
        with self._lock:
            reference = self._reference_locked()
            kept = self._norms.setdefault(client_id, deque(maxlen=self.window))
            kept.extend(float(v) for v in norms)
        if reference is None or reference <= 0:
            return grad
        cap = self.factor * reference
        over = norms > cap
        if not bool(over.any()):
            return grad
        with self._lock:
            self.clipped_rows += int(over.sum())
        log.info("split client %s: %d of %d gradient rows above %.3g (%gx the clients' median row norm %.3g) scaled "
                 "down", client_id[:64], int(over.sum()), n, cap, self.factor, reference)
        scale = torch.where(over, cap / norms.clamp_min(1e-30), torch.ones_like(norms))
        return grad * scale.view(-1, *([1] * (grad.dim() - 1)))


def _median(values: deque[float]) -> float:
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2]


def bound_gradient_rows(request: collafuse_pb2.SplitBackwardRequest, client_id: str, book: RowNormBook, cap: float,
                        hard_limit: float) -> None:
    """Bound a split gradient's image rows in place before the engine sees it: rows whose norm (times the batch
    size: the image's own dL_i/d(eps_hat_i)) lies in (cap, hard_limit] are scaled to ``cap`` (``cap`` 0: no
    absolute cap), then rows far above the other clients' are scaled down (``RowNormBook``). Rows above the hard
    limit, and non-finite or undecodable gradients, are left for the engine to refuse."""
    if not request.HasField("grad") or (cap <= 0 and book.factor <= 0):
        return
    try:
        grad = decode(request.grad, what="grad", dtypes=("float32",))
    except TensorError:
        return
    if grad.dim() < 1 or grad.shape[0] == 0 or not bool(torch.isfinite(grad).all()):
        return
    norms = grad.flatten(1).norm(dim=1) * int(grad.shape[0])
    if bool((norms > hard_limit).any()):
        return
    bounded = grad
    if cap > 0 and bool((norms > cap).any()):
        scale = torch.where(norms > cap, cap / norms.clamp_min(1e-30), torch.ones_like(norms))
        bounded = grad * scale.view(-1, *([1] * (grad.dim() - 1)))
    bounded = book.bound(client_id, bounded, hard_limit)
    if bounded is not grad:
        request.grad.CopyFrom(encode(bounded.contiguous()))
