"""Each split client's steps checked against the server's own objective (issue 16: no single client poisons
the shared model).

Bounding gradient rows (``gradient_bounds.py``) stops a client that sends *large* rows, not one that sends
rows of honest size pointing the wrong way: a gradient-ascent client (its true dL/d(eps_hat), negated) with
rows as large as the cap allows took the eps-MSE of a two-client run from 0.59 to 288. With two clients no
vote among clients can tell which one lies, so the server needs a reference of its own.

It has one: the round's x_t. Re-noised from level t to a t' in (t, T] (the ambient protocol's move, docs/
design.md §2), x_t gives a denoising loss the server computes alone, with no client's noise and no image.
Its gradient g_0 at the round's weights is the **root direction** (FLTrust's idea, with the root data made
from the round itself). Each client's gradient g_i (of its own mean loss) is projected on it:
p_i = <g_i, g_0> / |g_0|, how far the client's step moves along the server's objective (negative: against it).

A client's step enters the round only if ``CREDIT`` (1/2) times the sum of the projections of its applied
steps in a window of ``window`` steps, plus this one's, stays >= 0: a client may undo at most half the help
it gave, never push the model below where it found it. An honest client's projections are mostly positive (its loss and the root loss agree at
nearby t), so its rare negative steps are covered by the ones before; a gradient-ascent client's first step
is left out, and so is every later one. Scaling a harmful step up does not help an attacker (projections
add up with their size); splitting it over rounds does not either (the window holds applied steps only).
The check is first order and uses the current round's root direction for every step in the window; it
cannot see label-flipping (a client's *data* lying), which no split server can. The projection of a step
is noisy (an honest client's is negative now and then), so a client could bank credit with honest steps and
spend it on one large harmful step: each client's parameter gradient is first bounded to
``PEER_NORM_FACTOR`` times the round's median client's (``bound_to_peers``), so what one step can spend is
bounded too, and a step whose cosine with the root direction is below ``MIN_COSINE`` (-0.5) is left out
whatever the client banked (an honest step rarely points that far against it: 2 of 200 in the benchmark).

Cost: the round's backward runs once per client instead of once for the concatenated batch (the same
images, in smaller calls) plus one forward and backward of ``rows`` re-noised rows for g_0.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, deque
from collections.abc import Sequence

import torch
from diffusers.models import UNet2DModel

from collafuse.common.diffusion import ambient_server_loss

log = logging.getLogger(__name__)

# A client's parameter gradient may be at most this many times the round's median client's (bound_to_peers).
PEER_NORM_FACTOR = 2.0
# The share of a client's banked help that its later steps may undo.
CREDIT = 0.5
# A step pointing further against the root direction than this cosine is left out whatever the client banked.
MIN_COSINE = -0.5


class ContributionBook:
    """Per-client projections of the applied steps on the root direction, and the admission rule; thread-safe."""

    def __init__(self, window: int) -> None:
        self.window = window
        self._lock = threading.Lock()
        self._applied: dict[str, deque[float]] = {}
        self.left_out: Counter[str] = Counter()  # steps kept out of their round, per client

    @property
    def enabled(self) -> bool:
        return self.window > 0

    def admits(self, client_id: str, projection: float, cosine: float = 1.0) -> bool:
        """Whether a step of ``client_id`` that moves ``projection`` along the root direction (at ``cosine`` to
        it) may be applied."""
        with self._lock:
            banked = sum(self._applied.get(client_id, ()))
            admitted = CREDIT * banked + projection >= 0.0 and cosine >= MIN_COSINE
            if not admitted:
                self.left_out[client_id] += 1
        if not admitted:
            log.info("split client %s: step left out of its round (it moves %.3g against the server's own "
                     "objective; its last applied steps moved %.3g along it)", client_id[:64], -projection, banked)
        return admitted

    def record(self, client_id: str, projection: float) -> None:
        """An admitted step was applied."""
        with self._lock:
            self._applied.setdefault(client_id, deque(maxlen=self.window)).append(projection)

    def forget(self, client_id: str) -> None:
        with self._lock:
            self._applied.pop(client_id, None)


def root_gradient(
    model: UNet2DModel,
    x_t: torch.Tensor,
    t: torch.Tensor,
    labels: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    rows: int,
    generator: torch.Generator,
) -> list[torch.Tensor] | None:
    """g_0: the gradient of the ambient loss of up to ``rows`` of the round's x_t, each re-noised from its own t
    to t' ~ U(t, T] (rows at t = T have nowhere to go). None when no row can be used."""
    num_train_timesteps = alphas_cumprod.shape[0] - 1
    usable = (t < num_train_timesteps).nonzero().flatten()
    if usable.numel() == 0 or rows <= 0:
        return None
    if usable.numel() > rows:  # an even spread over the round (clients are in id order)
        usable = usable[torch.linspace(0, usable.numel() - 1, rows).round().long()]
    params = list(model.parameters())
    device = x_t.device

    def eps_hat(x: torch.Tensor, steps: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return model(x, (steps - 1).to(device), class_labels=y.to(device)).sample

    with torch.enable_grad():
        loss = ambient_server_loss(eps_hat, x_t[usable].float(), labels[usable], t[usable].cpu(),
                                   alphas_cumprod, generator=generator)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]


def bound_to_peers(per_client: list[list[torch.Tensor]], factor: float = PEER_NORM_FACTOR) -> list[list[torch.Tensor]]:
    """Each client's parameter gradient scaled down to ``factor`` times the lower median of the round's clients'
    norms (one vote each, so a minority cannot raise it; with one client nothing changes)."""
    if len(per_client) < 2:
        return per_client
    norms = [sum(float(g.double().pow(2).sum()) for g in grads) ** 0.5 for grads in per_client]
    cap = factor * sorted(norms)[(len(norms) - 1) // 2]
    return [[g * (cap / norm) for g in grads] if norm > cap > 0 else grads
            for grads, norm in zip(per_client, norms, strict=True)]


def projection(grads: Sequence[torch.Tensor], root: Sequence[torch.Tensor]) -> tuple[float, float]:
    """(<g, g_0> / |g_0|, the cosine of g and g_0) over every parameter (0, 1 when either is 0)."""
    dot = sum(float((g.double() * r.double()).sum()) for g, r in zip(grads, root, strict=True))
    root_norm = sum(float(r.double().pow(2).sum()) for r in root) ** 0.5
    norm = sum(float(g.double().pow(2).sum()) for g in grads) ** 0.5
    if root_norm == 0 or norm == 0:
        return 0.0, 1.0
    return dot / root_norm, dot / (root_norm * norm)
