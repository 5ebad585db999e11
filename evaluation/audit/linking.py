"""Linking split rows of one image across steps, and combining every look at it (docs/design.md §3).

A split client that sends an image in several steps, each with fresh noise at its own t, gives the server several
independent Gaussian looks at it. Per row there are two:

- its x_t: x_t / sqrt(ab_t) = x_0 + noise of variance (1 - ab_t) / ab_t per element;
- its gradient row, given x_t: row = f (2/d)(u + k x_0) + N(0, (sigma C)^2), with u = eps_hat - x_t / sqrt(1 - ab_t),
  k = sqrt(ab_t / (1 - ab_t)) and f = min(1, C / |(2/d)(u + k x_0)|) the clipping factor; so
  (row d / (2 f) - u) / k = x_0 + noise of variance (sigma C d / (2 f k))^2, independent of the first
  (exact without DP noise).

Both are unbiased with known variances: the best linear unbiased combination of any set of looks at one image is
their inverse-variance weighted mean (the sufficient statistic of Gaussian looks), per row and over every row of
the image. What the server must do is *link* the rows, since no image key travels with a split row. Two linkings:

- ``by_image``: the rows grouped by the image each was matched to (the audit's truth: an upper bound, the
  attacker told which image every row is);
- ``by_content``: what the server can do from the wire alone: rows of one client, with the same label and from
  different steps (a step draws its images without replacement), are one image when their looks agree within
  their noise (the squared difference per element over the sum of the two variances is chi^2_d / d under "same
  image": a row joins the closest group below 1 + z sqrt(2/d), else it starts one), rows taken least noisy first.

The clipping factor f is computed from the client's image (a scalar per row, which the server can estimate
iteratively); without DP the gradient look's variance is taken from the row itself (float rounding). A server that
steers its eps_hat towards its running estimate keeps most rows unclipped and takes f = 1 (``clip_factor="none"``):
biased toward its estimate where a row was clipped after all, but less noisy, and at times closer than the
unbiased look; the audit runs both.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Literal

import torch

LINK_Z = 3.0  # standard deviations of chi^2_d / d a row may be off its group and still join it
MIN_VAR = 1e-24  # a look's variance is never taken below this (exact looks: float rounding)


@dataclass
class Looks:
    """Per row: the combined look at x_0 (unclamped) and its precision per element."""

    estimate: torch.Tensor  # (n, d) float64
    precision: torch.Tensor  # (n,) float64

    def combine(self, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inverse-variance mean per group id (``groups``: (n,) ints in [0, G)): ((G, d) estimates, (G,) precisions)."""
        count = int(groups.max()) + 1 if len(groups) else 0
        weighted = torch.zeros((count, self.estimate.shape[1]), dtype=torch.float64)
        weighted.index_add_(0, groups, self.estimate * self.precision[:, None])
        precision = torch.zeros(count, dtype=torch.float64).index_add_(0, groups, self.precision)
        return weighted / precision.clamp_min(1e-300)[:, None], precision


def row_looks(
    x_t: torch.Tensor,
    alpha_bar: torch.Tensor,
    eps_hat: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
    x0: torch.Tensor | None = None,
    clip: float | None = None,
    noise_multiplier: float = 0.0,
    clip_factor: Literal["exact", "none"] = "exact",
) -> Looks:
    """Each row's x_t look, combined with its gradient look where the step's eps_hat and row are given.

    ``rows``: the per-image gradient rows as the client clipped and noised them (N g); ``x0``: each row's image
    (for the clipping factor, and for the rounding error of an exact look); ``clip``/``noise_multiplier``: the
    client's DP (None: no clipping, no noise). ``clip_factor``: "exact" (from each row's image), or "none" (every
    row taken as unclipped, f = 1).
    """
    n = x_t.shape[0]
    x = x_t.reshape(n, -1).to(torch.float64)
    d = x.shape[1]
    ab = alpha_bar.to(torch.float64).reshape(n, 1)
    odds = ab / (1 - ab)
    first = x / ab.sqrt()
    p_first = odds[:, 0]
    if eps_hat is None or rows is None:
        return Looks(first, p_first)
    k = odds.sqrt()
    u = eps_hat.reshape(n, -1).to(torch.float64) - x / (1 - ab).sqrt()
    g = rows.reshape(n, -1).to(torch.float64)
    if clip is None or clip_factor == "none":
        f = torch.ones_like(k)
    else:
        if x0 is None:
            raise ValueError("clipped rows need each row's image for its clipping factor")
        norm = (2 / d) * (u + k * x0.reshape(n, -1).to(torch.float64)).norm(dim=1, keepdim=True)
        f = torch.clamp(clip / norm.clamp_min(1e-300), max=1.0)
    second = (g * d / (2 * f) - u) / k
    if clip is not None and noise_multiplier > 0:
        var = (noise_multiplier * clip * d / (2 * f * k)) ** 2
    elif x0 is not None:
        var = (second - x0.reshape(n, -1).to(torch.float64)).pow(2).mean(dim=1, keepdim=True)  # exact: rounding
    else:
        var = torch.full_like(k, MIN_VAR)
    p_second = 1.0 / var.clamp_min(MIN_VAR)[:, 0]
    precision = p_first + p_second
    estimate = (first * p_first[:, None] + second * p_second[:, None]) / precision[:, None]
    return Looks(estimate, precision)


def link_by_content(looks: Looks, labels: torch.Tensor, steps: torch.Tensor, z: float = LINK_Z) -> torch.Tensor:
    """Group ids (n,) from the wire alone: same label, different steps, looks that agree within their noise."""
    n, d = looks.estimate.shape
    limit = 1.0 + z * math.sqrt(2.0 / d)
    group = torch.full((n,), -1, dtype=torch.long)
    sums: list[torch.Tensor] = []  # per group: precision-weighted sum of its looks
    precisions: list[float] = []
    by_label: dict[int, list[int]] = defaultdict(list)
    in_step: dict[int, set[int]] = defaultdict(set)
    for r in torch.argsort(looks.precision, descending=True).tolist():
        label, step = int(labels[r]), int(steps[r])
        candidates = [c for c in by_label[label] if c not in in_step[step]]
        look, p = looks.estimate[r], float(looks.precision[r])
        chosen = -1
        if candidates:
            weights = torch.tensor([precisions[c] for c in candidates], dtype=torch.float64)
            means = torch.stack([sums[c] for c in candidates]) / weights[:, None]
            stat = (means - look).pow(2).mean(dim=1) / (1.0 / p + 1.0 / weights)
            best = int(stat.argmin())
            if float(stat[best]) <= limit:
                chosen = candidates[best]
        if chosen < 0:
            chosen = len(sums)
            sums.append(torch.zeros(d, dtype=torch.float64))
            precisions.append(0.0)
            by_label[label].append(chosen)
        sums[chosen] += p * look
        precisions[chosen] += p
        in_step[step].add(chosen)
        group[r] = chosen
    return group
