"""The audit of one client's recorded split steps (docs/design.md §3): what the server saw, and what it can invert.

Inputs are the transcript's split steps (``transcript.split_payloads``): x_t, t, labels, the gradient
dL/d(eps_hat) the client sent, and the eps_hat the server itself sent (recorded on the server's side: the
weights change every step and only the latest checkpoint is kept, so eps_hat cannot be recomputed).

The client sends g = (clip_C(rows) + sigma C z) / N with rows_i = dl_i/d(eps_hat_i) = 2 (eps_hat_i - eps_i) / d
for l_i = mean((eps_hat_i - eps_i)^2) over d elements (client/protocols/split.py). So N g is the per-image row,
and ``attacks.invert_gradient`` with loss scale d/2 recovers eps (exactly without DP), hence x_0.

Truth: which of the client's images each payload row was. The client does not record its batches, so each
row is matched by pixels: the maximum-likelihood image given what the auditor holds, x_t ~ N(sqrt(ab_t) x_0,
(1 - ab_t) I) and the gradient's model above with the client's C and sigma. Without DP the gradient pins
the image exactly; with heavy DP at high t the match is uncertain (reported as ``match.confident``), and
scores there are against the likeliest image. Scores are given for every row and for the least noisy
tenth of the server's steps (t <= cut + (T - cut)/10), where the server learns most.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch

from collafuse.evaluation.audit.attacks import Reconstruction, invert_gradient, linear, score, x0_from_eps
from collafuse.evaluation.audit.payloads import check_noise, check_raw
from collafuse.evaluation.audit.transcript import SplitPayload

log = logging.getLogger(__name__)

LOW_BAND = 0.1  # the least noisy tenth of the server's steps
# Without DP the observed rows equal the candidate's to float32 rounding; a small variance keeps the
# likelihood finite.
EXACT_VAR = 1e-12
CHUNK = 512


@dataclass(frozen=True)
class DpParams:
    """What the client used (public in the protocol): clipping norm C (None: no clipping) and sigma."""

    clip: float | None = None
    noise_multiplier: float = 0.0

    @property
    def on(self) -> bool:
        return self.clip is not None


@dataclass
class SplitBatch:
    """A client's split payload rows, concatenated over steps."""

    x_t: torch.Tensor
    t: torch.Tensor
    labels: torch.Tensor
    eps_hat: torch.Tensor
    rows: torch.Tensor  # N g: the per-image rows the client clipped and noised
    steps: int
    wire_bytes: bytes

    @classmethod
    def of(cls, payloads: list[SplitPayload]) -> SplitBatch:
        return cls(
            torch.cat([p.x_t for p in payloads]).double(),
            torch.cat([p.t for p in payloads]),
            torch.cat([p.labels for p in payloads]),
            torch.cat([p.eps_hat for p in payloads]).double(),
            torch.cat([p.grad.double() * p.grad.shape[0] for p in payloads]),
            len(payloads),
            b"".join(p.wire_bytes for p in payloads),
        )


def match_rows(batch: SplitBatch, x0: torch.Tensor, alphas_cumprod: torch.Tensor, dp: DpParams) -> tuple[torch.Tensor, torch.Tensor]:
    """(index into x0, posterior of that index) per row: the joint likelihood of x_t and the gradient row."""
    d = x0[0].numel()
    cand = x0.double().reshape(x0.shape[0], -1)
    cand_sq = cand.pow(2).sum(1)
    var = (dp.noise_multiplier * dp.clip) ** 2 if dp.clip is not None and dp.noise_multiplier > 0 else EXACT_VAR
    index, posterior = [], []
    for start in range(0, batch.x_t.shape[0], CHUNK):
        sl = slice(start, start + CHUNK)
        x = batch.x_t[sl].reshape(-1, d)
        ab = alphas_cumprod[batch.t[sl]].double()[:, None]
        obs = batch.rows[sl].reshape(-1, d)
        e_hat = batch.eps_hat[sl].reshape(-1, d)
        # eps_j = (x - sqrt(ab) x0_j) / sqrt(1 - ab): log p(x_t | x0_j) = -|eps_j|^2 / 2 + const.
        xc = x @ cand.T
        eps_sq = (x.pow(2).sum(1, keepdim=True) - 2 * ab.sqrt() * xc + ab * cand_sq[None]) / (1 - ab)
        # row_j = (2/d)(u + k x0_j), u = eps_hat - x / sqrt(1 - ab), k = sqrt(ab / (1 - ab)).
        u = e_hat - x / (1 - ab).sqrt()
        k = (ab / (1 - ab)).sqrt()
        uc = u @ cand.T
        row_sq = (2 / d) ** 2 * (u.pow(2).sum(1, keepdim=True) + 2 * k * uc + k**2 * cand_sq[None])
        f = torch.ones_like(row_sq) if dp.clip is None else torch.clamp(dp.clip / row_sq.sqrt().clamp_min(1e-300), max=1.0)
        dot = (2 / d) * ((obs * u).sum(1, keepdim=True) + k * (obs @ cand.T))
        resid = obs.pow(2).sum(1, keepdim=True) - 2 * f * dot + f**2 * row_sq
        loglik = -eps_sq / 2 - resid.clamp_min(0) / (2 * var)
        probs = torch.softmax(loglik, dim=1)
        best = probs.max(dim=1)
        index.append(best.indices)
        posterior.append(best.values)
    return torch.cat(index), torch.cat(posterior)


def _scores(name: str, x0_hat: torch.Tensor, x0: torch.Tensor, low: torch.Tensor) -> tuple[Reconstruction, dict[str, Any]]:
    rec = score(name, x0_hat, x0)
    entry: dict[str, Any] = {**rec.summary(), "simulated": False}
    if bool(low.any()):
        low_rec = score(name, x0_hat[low], x0[low])
        entry.update(psnr_db_low_t=low_rec.psnr_db, ssim_low_t=low_rec.ssim)
    return rec, entry


def audit_split(
    payloads: list[SplitPayload],
    x0_all: torch.Tensor,
    cut: int,
    alphas_cumprod: torch.Tensor,
    dp: DpParams,
    floor_alpha_bar: float | None = None,
    files: dict[str, bytes] | None = None,
) -> tuple[dict[str, Any], list[Reconstruction], torch.Tensor]:
    """Audit one client's split steps against its images ``x0_all``; returns (report, reconstructions, matched x0)."""
    batch = SplitBatch.of(payloads)
    T = len(alphas_cumprod) - 1
    n = int(batch.x_t.shape[0])
    ab_t = alphas_cumprod[batch.t].double()
    index, posterior = match_rows(batch, x0_all, alphas_cumprod, dp)
    x0 = x0_all[index].double()
    low = batch.t <= cut + max(1, round(LOW_BAND * (T - cut)))
    report: dict[str, Any] = {
        "protocol": "split", "cut": cut, "steps": batch.steps, "images": n,
        "t": {"min": int(batch.t.min()), "max": int(batch.t.max()), "low_band_max": cut + max(1, round(LOW_BAND * (T - cut))),
              "low_band_images": int(low.sum())},
        "alpha_bar": float(alphas_cumprod[cut]),
        "dp": {"clip": dp.clip, "noise_multiplier": dp.noise_multiplier},
        "match": {"method": "max likelihood of x_t and the gradient over the client's images",
                  "confident": float((posterior > 0.99).double().mean()),
                  "distinct_images": int(index.unique().numel())},
    }
    if cut == 0:
        report["note"] = "cut 0 is the global-model baseline: x_t at t = 1 is nearly x0 (no privacy, by design)"
    # (a) every t above the cut and within the pinned floor; every x_t at least as noisy as the cut.
    report["t_at_or_below_cut"] = int((batch.t <= cut).sum())
    if floor_alpha_bar is not None:
        report["floor_alpha_bar"] = floor_alpha_bar
        report["above_floor"] = int((ab_t > floor_alpha_bar * (1 + 1e-9)).sum())
    # Each x_t against the sender's level zeta (alpha_bar at its cut under its pinned schedule, its floor): no
    # payload may carry more signal than that. Only rows matched with confidence are tested: picking the
    # likeliest of many images selects the one that happens to correlate most with x_t, which would make an
    # honest payload look less noisy than it is.
    declared = floor_alpha_bar if floor_alpha_bar is not None else float(alphas_cumprod[cut])
    sure = posterior > 0.99
    if bool(sure.any()):
        report["noise_check"] = check_noise(batch.x_t[sure], declared, x0[sure]).summary()
    else:
        report["noise_check"] = {"payloads": 0, "less_noisy_than_declared": 0, "group_less_noisy": False,
                                 "note": "no row matched with confidence: nothing to test against"}
    raw = check_raw(torch.cat([batch.x_t, batch.rows]), x0_all, batch.wire_bytes, files)
    report["raw_findings"] = [f.to_json() for f in raw[:20]]
    report["raw_findings_count"] = len(raw)

    results: list[dict[str, Any]] = []
    recs: list[Reconstruction] = []
    attempts = {
        "linear": linear(batch.x_t, ab_t),
        "tweedie": x0_from_eps(batch.x_t, batch.eps_hat, ab_t),  # the server's own eps_hat at that step
        "split_inversion": invert_gradient(
            batch.rows, batch.eps_hat, batch.x_t, ab_t, x0[0].numel() / 2.0,
            max_norm=dp.clip, noise_multiplier=dp.noise_multiplier if dp.on else 0.0,
        ),
    }
    for name, x0_hat in attempts.items():
        rec, entry = _scores(name, x0_hat, x0, low)
        if name == "split_inversion":
            entry["dp_noise"] = dp.noise_multiplier if dp.on else 0.0
            exact = (x0_hat.double() - x0).abs().flatten(1).amax(1)
            entry["max_abs_error"] = float(exact.max())
            entry["exact_rows"] = float((exact < 1e-3).double().mean())
        recs.append(rec)
        results.append(entry)
    report["attacks"] = results
    report["best_actual"] = max(results, key=lambda r: r["psnr_db"])
    report["best_actual_low_t"] = max(results, key=lambda r: r.get("psnr_db_low_t", -math.inf))
    return report, recs, x0.float()
