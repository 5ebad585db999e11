"""The audit of one client's recorded split steps (docs/design.md §3): what the server saw, and what it can invert.

Inputs are the transcript's split steps (``transcript.split_payloads``): x_t, t, labels, the gradient
dL/d(eps_hat) the client sent, and the eps_hat the server itself sent (recorded on the server's side: the
weights change every step and only the latest checkpoint is kept, so eps_hat cannot be recomputed).

The client sends g = (clip_C(rows) + sigma C z) / N with rows_i = dl_i/d(eps_hat_i) = 2 (eps_hat_i - eps_i) / d
for l_i = mean((eps_hat_i - eps_i)^2) over d elements (client/protocols/split.py). So N g is the per-image row,
and ``attacks.invert_gradient`` with loss scale d/2 recovers eps (exactly without DP), hence x_0.

Truth: which of the client's images each payload row was. The client records every send in its ledger (image key
and t per row of each step, client/privacy_ledger.py): with the client's workdir each recorded step is found by its
t values and each row is its image exactly (``ledger_index``). Without it each row is matched by pixels: the maximum-likelihood image given what the auditor holds, x_t ~ N(sqrt(ab_t) x_0,
(1 - ab_t) I) and the gradient's model above with the client's C and sigma. Without DP the gradient pins
the image exactly; with heavy DP at high t the match is uncertain (reported as ``match.confident``), and
scores there are against the likeliest image. Scores are given for every row and for the least noisy
tenth of the server's steps (t <= cut + (T - cut)/10), where the server learns most.

Rows of one image sent in several steps are linked and combined (evaluation/audit/linking.py): every row's x_t
look and gradient look, weighted by their precisions, per image, with the rows linked by the audit's match (an
upper bound) and by content alone (what the server can do from the wire). Those figures are per image (each
image's combined estimate against it), beside the per-row ones. When the served spec is larger than the client's
images, every estimate is also taken back to the native pixels by least squares (``<attack>_native``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from collafuse.evaluation.audit.attacks import Reconstruction, invert_gradient, score, x0_from_eps
from collafuse.evaluation.audit.core import score_native
from collafuse.evaluation.audit.floor import ClientFloor
from collafuse.evaluation.audit.linking import Looks, link_by_content, row_looks
from collafuse.evaluation.audit.native import NativeImages
from collafuse.evaluation.audit.payloads import check_noise, check_raw
from collafuse.evaluation.audit.quality import ssim
from collafuse.evaluation.audit.space import current_space
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
    step: torch.Tensor | None = None  # (rows,) the step each row came from (0-based, in transcript order)

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
            torch.cat([torch.full((p.x_t.shape[0],), k, dtype=torch.long) for k, p in enumerate(payloads)]),
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


def ledger_index(client_dir: Path, payloads: Sequence[SplitPayload], x0_all: torch.Tensor) -> torch.Tensor | None:
    """Each row's image from the client's own record of its split sends (None when a step or image is not found).

    The ledger holds, per step, the image key and t of each row in the order sent; a transcript step is the next
    recorded step with the same t values (steps refused or left without a backward are in the ledger, not among the
    complete steps audited), and a key is the image of the client's data whose pixels give it.
    """
    from collafuse.client.ledger import LEDGER_FILE, Ledger
    from collafuse.client.privacy_ledger import PrivacyLedger

    if not (Path(client_dir) / LEDGER_FILE).is_file():
        return None
    with Ledger(Path(client_dir)) as ledger:
        keys = {key: i for i, key in enumerate(ledger.image_keys(x0_all))}
        record = PrivacyLedger(ledger.path)
        try:
            sends = record.sends()
        finally:
            record.close()
    steps: dict[int, list[tuple[str, int]]] = {}
    for step, key, t, _ in sends:
        steps.setdefault(step, []).append((key, t))
    recorded = list(steps.values())
    out: list[int] = []
    at = 0
    for payload in payloads:
        wanted = payload.t.tolist()
        while at < len(recorded) and [t for _, t in recorded[at]] != wanted:
            at += 1
        if at == len(recorded) or any(key not in keys for key, _ in recorded[at]):
            return None
        out += [keys[key] for key, _ in recorded[at]]
        at += 1
    return torch.tensor(out, dtype=torch.long)


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
    floor: ClientFloor | None = None,
    files: dict[str, bytes] | None = None,
    native_of: Callable[[Sequence[int]], NativeImages | None] | None = None,
    link: bool = True,
    known_index: torch.Tensor | None = None,
) -> tuple[dict[str, Any], list[Reconstruction], torch.Tensor]:
    """Audit one client's split steps against its images ``x0_all``; returns (report, reconstructions, matched x0).

    ``floor``: the client's own floor (each row's level is held against its per-element level). ``native_of``:
    the client's images at their own size for given image indices (None when the served spec is theirs).
    ``link``: combine the rows of one image across steps (off: per-row attacks only). ``known_index``: each row's
    image from the client's ledger (``ledger_index``); without it rows are matched by likelihood.
    """
    batch = SplitBatch.of(payloads)
    T = len(alphas_cumprod) - 1
    n = int(batch.x_t.shape[0])
    ab_t = alphas_cumprod[batch.t].double()
    index, posterior = match_rows(batch, x0_all, alphas_cumprod, dp)
    method = "max likelihood of x_t and the gradient over the client's images"
    agreement = None
    if known_index is not None and len(known_index) == n:
        agreement = float((index == known_index).double().mean())
        index, posterior = known_index, torch.ones(n, dtype=torch.float64)
        method = "the client's ledger (image key and t of every split send)"
    x0 = x0_all[index].double()
    low = batch.t <= cut + max(1, round(LOW_BAND * (T - cut)))
    report: dict[str, Any] = {
        "protocol": "split", "cut": cut, "steps": batch.steps, "images": n,
        "t": {"min": int(batch.t.min()), "max": int(batch.t.max()), "low_band_max": cut + max(1, round(LOW_BAND * (T - cut))),
              "low_band_images": int(low.sum())},
        "alpha_bar": float(alphas_cumprod[cut]),
        "dp": {"clip": dp.clip, "noise_multiplier": dp.noise_multiplier},
        "match": {"method": method,
                  "confident": float((posterior > 0.99).double().mean()),
                  "distinct_images": int(index.unique().numel())},
    }
    if agreement is not None:
        report["match"]["likelihood_agrees"] = agreement
    if cut == 0:
        report["note"] = "cut 0 is the global-model baseline: x_t at t = 1 is nearly x0 (no privacy, by design)"
    # (a) every t above the cut; every row within the client's own floor per element (its reference schedule and
    # the served spec's look gain), never merely within the server's schedule.
    report["t_at_or_below_cut"] = int((batch.t <= cut).sum())
    limit = floor.per_element if floor is not None else float(alphas_cumprod[cut])
    if floor is not None:
        report["floor"] = floor.to_json()
        report["floor_alpha_bar"] = floor.per_element
        report["above_floor"] = int((ab_t > floor.per_element * (1 + 1e-9)).sum())
    # Each x_t against that level: no payload may carry more signal. Only rows matched with confidence are tested:
    # picking the likeliest of many images selects the one that happens to correlate most with x_t, which would
    # make an honest payload look less noisy than it is.
    against = "the client's own floor per element" if floor is not None else "the level at the cut (no client floor)"
    sure = posterior > 0.99
    if bool(sure.any()):
        report["noise_check"] = {**check_noise(batch.x_t[sure], limit, x0[sure]).summary(), "against": against}
    else:
        report["noise_check"] = {"payloads": 0, "less_noisy_than_declared": 0, "group_less_noisy": False,
                                 "note": "no row matched with confidence: nothing to test against"}
    raw = check_raw(torch.cat([batch.x_t, batch.rows]), x0_all, batch.wire_bytes, files)
    report["raw_findings"] = [f.to_json() for f in raw[:20]]
    report["raw_findings_count"] = len(raw)

    results: list[dict[str, Any]] = []
    recs: list[Reconstruction] = []
    sigma = dp.noise_multiplier if dp.on else 0.0
    looks = row_looks(batch.x_t, ab_t, batch.eps_hat, batch.rows, x0, dp.clip, sigma)
    shape = tuple(batch.x_t.shape)
    # Per row: each estimate of x0 from that row alone (unclamped where linear).
    attempts = {
        "linear": batch.x_t / ab_t.sqrt().view(-1, 1, 1, 1),
        "tweedie": x0_from_eps(batch.x_t, batch.eps_hat, ab_t),  # the server's own eps_hat at that step
        "split_inversion": invert_gradient(batch.rows, batch.eps_hat, batch.x_t, ab_t, x0[0].numel() / 2.0,
                                           max_norm=dp.clip, noise_multiplier=sigma),
        "row_combined": looks.estimate.reshape(shape),  # x_t and gradient looks of the row, by precision
    }
    for name, x0_hat in attempts.items():
        rec, entry = _scores(name, x0_hat, x0, low)
        if name == "split_inversion":
            entry["dp_noise"] = sigma
            exact = (x0_hat.double() - x0).abs().flatten(1).amax(1)
            entry["max_abs_error"] = float(exact.max())
            entry["exact_rows"] = float((exact < 1e-3).double().mean())
        recs.append(rec)
        results.append(entry)
    # Per image: every row of it, linked across steps, combined by precision.
    linked: dict[str, torch.Tensor] = {}
    if link:
        by_content = link_by_content(looks, batch.labels, batch.step if batch.step is not None else torch.arange(n))
        ways: list[tuple[str, torch.Tensor, Looks, str]] = [
            ("linked_by_image", index, looks, ("rows grouped by the image each was matched to (an upper bound on any "
                                              "linking); gradient looks with their exact clipping factor")),
            ("linked_by_content", by_content, looks, ("rows linked from the wire alone: same label, different steps, "
                                                     "looks that agree within their noise")),
        ]
        if dp.clip is not None:
            unclipped = row_looks(batch.x_t, ab_t, batch.eps_hat, batch.rows, x0, dp.clip, sigma, clip_factor="none")
            ways.append(("linked_by_image_unclipped", index, unclipped,
                         ("rows grouped by the matched image; every gradient row taken as unclipped (a server steering "
                         "eps_hat towards its estimate)")))
        for name, groups, these, how in ways:
            linked[name] = _combined(these, groups, shape)
            rec = score_by_image(name, linked[name], x0, index)
            sizes = torch.bincount(index)
            entry = {**rec.summary(), "simulated": False, "per_image": True, "linking": how,
                     "images_linked": int((sizes > 0).sum()), "max_rows_per_image": int(sizes.max())}
            if name == "linked_by_content":
                entry.update(_link_quality(groups, index))
            recs.append(rec)
            results.append(entry)
    if native_of is not None:
        native = native_of(index.tolist())
        if native is not None:
            report["native"] = native.describe()
            rows = native.rows
            for name, x0_hat in {**attempts, **linked}.items():
                est = native.operator.lsq(x0_hat[rows])
                if name in linked:
                    rec = score_by_image(f"{name}_native", est, native.images, index[rows])
                else:
                    rec = score_native(f"{name}_native", est, native.images)
                recs.append(rec)
                results.append({**rec.summary(), "simulated": False, "per_image": name in linked,
                                "resolution": "native"})
    report["attacks"] = results
    report["best_actual"] = max(results, key=lambda r: r["psnr_db"])
    report["best_actual_low_t"] = max(results, key=lambda r: r.get("psnr_db_low_t", -math.inf))
    return report, recs, x0.float()


def _combined(looks: Looks, groups: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Each row's estimate: the precision-weighted mean of every look in its group (unclamped)."""
    _, inverse = torch.unique(groups, return_inverse=True)
    estimate, _ = looks.combine(inverse)
    return estimate[inverse].reshape(shape)


def _link_quality(groups: torch.Tensor, index: torch.Tensor) -> dict[str, Any]:
    """How the content linking compares with the match: groups found, and rows in a group whose most common image
    is their own."""
    right = 0
    for g in groups.unique():
        members = index[groups == g]
        right += int((members == members.mode().values).sum())
    return {"groups_found": int(groups.unique().numel()), "rows_linked_to_their_image": right / max(len(groups), 1)}


def score_by_image(attack: str, x0_hat: torch.Tensor, x0: torch.Tensor, image: torch.Tensor) -> Reconstruction:
    """Per image, not per row: each image's MSE is the mean over its rows (identical rows for a linked estimate),
    and the figure is the PSNR of the mean over images (so an image sent often counts once). ``x0_hat`` per row."""
    est, truth = (v.to(torch.float64) for v in current_space().to_pixels(x0_hat, x0))
    mse = (est - truth).pow(2).flatten(1).mean(dim=1)
    _, inverse = torch.unique(image, return_inverse=True)
    count = torch.bincount(inverse).double()
    per_image = torch.zeros(len(count), dtype=torch.float64).index_add_(0, inverse, mse) / count
    pooled = float(per_image.mean())
    value = 300.0 if pooled <= 0 else min(300.0, 10 * math.log10(4.0 / pooled))
    if min(truth.shape[-2:]) >= 6:
        row_ssim = ssim(est, truth)
        structure = float((torch.zeros(len(count), dtype=torch.float64).index_add_(0, inverse, row_ssim) / count).mean())
    else:
        structure = math.nan
    psnr_images = (10 * torch.log10(4.0 / per_image.clamp_min(1e-300))).clamp(max=300.0).tolist()
    return Reconstruction(attack, est.float(), value, structure, psnr_images)
