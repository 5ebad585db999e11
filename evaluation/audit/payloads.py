"""Payload checks: is a received tensor at least as noisy as its sender declared, and is it never raw data?

A release of x_0 at level ab is x = sqrt(ab) x_0 + sqrt(1 - ab) eps. Noise is measured as the
*equivalent* ab of the payload's signal-to-noise ratio, ab_eff = a^2 / (a^2 + b^2) for x = a x_0 + b eps,
so rescaling a payload neither hides nor fakes noise. Two estimators:

- ``estimate_known``: the auditor holds the sender's x_0 (regression). a_hat = <x, x_0>/<x_0, x_0>,
  b_hat^2 = residual energy / (d - 1). Standard errors: b/|x_0| for a_hat and b^2 sqrt(2/d) for b_hat^2,
  propagated to ab_eff (delta method); a payload is flagged when ab_eff exceeds the declared ab by more
  than ``sigmas`` standard errors (evaluated at the declared level: a one-sided test of honesty).
  For 8x8 digits the standard error is about 0.005 at cut 50, 0.02 at cut 200, 0.03 at cut 500.
- ``estimate_blind``: no x_0. Immerkaer's (1996) Laplacian-difference mask
  [[1,-2,1],[-2,4,-2],[1,-2,1]] has squared sum 36, so on white noise of variance b^2 its output has
  variance 36 b^2; image edges add energy too, so b^2 is over-estimated and ab = 1 - b^2 (assuming a
  variance-preserving release) is under-estimated: the blind check can miss an under-noised release of a
  busy image, never falsely accuse a well-noised one. On 8x8 digits its error in ab is measured by the
  tests (a bias of roughly -0.1 at ab ~ 0.6); use it only to screen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

_IMMERKAER = torch.tensor([[1.0, -2.0, 1.0], [-2.0, 4.0, -2.0], [1.0, -2.0, 1.0]], dtype=torch.float64)


@dataclass(frozen=True)
class NoiseEstimate:
    """Per image: the signal gain a, the noise variance b^2, ab_eff = a^2/(a^2 + b^2) and its standard error."""

    gain: torch.Tensor
    noise_var: torch.Tensor
    alpha_bar: torch.Tensor
    stderr: torch.Tensor


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to(torch.float64).reshape(x.shape[0], -1)


def estimate_known(
    payload: torch.Tensor, x0: torch.Tensor, reference_alpha_bar: float | torch.Tensor | None = None
) -> NoiseEstimate:
    """Regression of each payload on its own x_0 (rows matched).

    The standard error is evaluated at ``reference_alpha_bar`` (the declared level: a test under the
    hypothesis that the sender was honest) where given, else at the estimate. At the estimate it is
    unreliable when a_hat is near 0 (ab_eff's derivative vanishes there).
    """
    if payload.shape != x0.shape:
        raise ValueError(f"payload {tuple(payload.shape)} and x0 {tuple(x0.shape)} must have the same shape")
    x, ref = _flat(payload), _flat(x0)
    d = x.shape[1]
    energy = (ref * ref).sum(dim=1).clamp_min(1e-12)
    a = (x * ref).sum(dim=1) / energy
    residual = x - a[:, None] * ref
    b2 = (residual * residual).sum(dim=1) / max(d - 1, 1)
    total = (a * a + b2).clamp_min(1e-300)
    # a_hat^2 over-estimates a^2 by Var(a_hat) = b^2/|x_0|^2: negligible at low noise, but at high noise
    # (ab -> 0, the split protocol's t near T) it is the whole estimate. Subtract it (unbiased, may dip < 0).
    ab = (a * a - b2 / energy) / total
    if reference_alpha_bar is not None:
        ref_ab = torch.as_tensor(reference_alpha_bar, dtype=torch.float64).to(x.device).expand(x.shape[0])
        a, b2 = torch.sqrt(ref_ab * total), (1 - ref_ab) * total  # same power, the reference's split
    d_a = 2 * a * b2 / total**2
    d_b2 = -(a * a) / total**2
    # First order (delta method) plus the second-order spread of a_hat^2 (std sqrt(2) b^2/|x_0|^2), which
    # is what is left when a -> 0.
    second = math.sqrt(2.0) * b2 / (energy * total)
    stderr = torch.sqrt(d_a**2 * b2 / energy + d_b2**2 * 2 * b2**2 / d + second**2)
    return NoiseEstimate(a, b2, ab, stderr)


def estimate_blind(payload: torch.Tensor) -> NoiseEstimate:
    """Noise variance from high frequencies, ab = 1 - b^2 (variance-preserving release assumed)."""
    if payload.dim() != 4 or min(payload.shape[-2:]) < 3:
        raise ValueError(f"blind noise estimation needs (N, C, H, W) images of side >= 3, got {tuple(payload.shape)}")
    x = payload.detach().to(torch.float64)
    n, c = x.shape[:2]
    kernel = _IMMERKAER.to(x.device).expand(c, 1, 3, 3)
    response = F.conv2d(x, kernel, groups=c).reshape(n, -1)
    b2 = response.pow(2).mean(dim=1) / 36.0
    ab = (1.0 - b2).clamp(0.0, 1.0)
    m = response.shape[1]
    # Sampling error only (neighbouring outputs correlate, so this understates it); the signal bias is larger.
    stderr = b2 * math.sqrt(2.0 / max(m, 1)) * 3.0
    return NoiseEstimate(torch.sqrt(ab), b2, ab, stderr)


@dataclass
class PayloadFinding:
    """One payload that breaks the sender's declaration."""

    index: int
    kind: str  # "less_noise", "raw_x0", "raw_bytes", "file_bytes"
    detail: str

    def to_json(self) -> dict[str, object]:
        return {"index": self.index, "kind": self.kind, "detail": self.detail}


@dataclass
class NoiseCheck:
    declared_alpha_bar: list[float]
    measured_alpha_bar: list[float]
    stderr: list[float]
    method: str
    findings: list[PayloadFinding] = field(default_factory=list)

    def summary(self) -> dict[str, object]:
        measured = np.asarray(self.measured_alpha_bar)
        declared = np.asarray(self.declared_alpha_bar)
        return {
            "method": self.method,
            "payloads": len(measured),
            "declared_alpha_bar_mean": float(declared.mean()) if len(declared) else None,
            "measured_alpha_bar_mean": float(measured.mean()) if len(measured) else None,
            "measured_minus_declared_max": float((measured - declared).max()) if len(measured) else None,
            "stderr_mean": float(np.mean(self.stderr)) if self.stderr else None,
            "less_noisy_than_declared": sum(f.kind == "less_noise" for f in self.findings),
            "group_less_noisy": any(f.kind == "less_noise_group" for f in self.findings),
            "findings": [f.to_json() for f in self.findings[:20]],
        }


def check_noise(
    payload: torch.Tensor,
    declared_alpha_bar: torch.Tensor | float,
    x0: torch.Tensor | None = None,
    sigmas: float = 5.0,
    blind_margin: float = 0.02,
) -> NoiseCheck:
    """Flag each payload whose measured ab_eff exceeds the declared ab (less noise than declared).

    With ``x0`` (rows matched to the payload) the regression estimate and ``sigmas`` standard errors of
    slack are used; without it the blind estimate with ``blind_margin`` of slack.
    """
    declared = torch.as_tensor(declared_alpha_bar, dtype=torch.float64).expand(payload.shape[0])
    if x0 is not None:
        est, method, slack = estimate_known(payload, x0, declared), "regression on x0", None
    else:
        est, method, slack = estimate_blind(payload), "blind (Immerkaer high-frequency residual)", blind_margin
    allowed = declared + (sigmas * est.stderr if slack is None else slack + sigmas * est.stderr)
    findings = [
        PayloadFinding(
            i, "less_noise",
            f"measured alpha_bar {float(est.alpha_bar[i]):.4f} > declared {float(declared[i]):.4f} "
            f"(+/- {float(est.stderr[i]):.4f}, {method})",
        )
        for i in torch.nonzero(est.alpha_bar > allowed).flatten().tolist()
    ]
    # Per image the test is weak on small images (8x8: ~0.06 at cut 200); a group that is less noisy on
    # average stands out by sqrt(N) more.
    z = (est.alpha_bar - declared) / est.stderr.clamp_min(1e-12)
    group_z = float(z.mean()) * math.sqrt(len(z)) if slack is None and len(z) > 1 else 0.0
    if group_z > sigmas:
        findings.append(PayloadFinding(
            -1, "less_noise_group",
            f"the {len(z)} payloads are on average less noisy than declared: measured alpha_bar "
            f"{float(est.alpha_bar.mean()):.4f} vs declared {float(declared.mean()):.4f} (z = {group_z:.1f}, {method})",
        ))
    return NoiseCheck(declared.tolist(), est.alpha_bar.tolist(), est.stderr.tolist(), method, findings)


def check_raw(
    payload: torch.Tensor,
    x0: torch.Tensor,
    payload_bytes: bytes | None = None,
    files: dict[str, bytes] | None = None,
    atol: float = 1e-5,
) -> list[PayloadFinding]:
    """Payload rows equal to any raw x_0 (up to ``atol``); raw x_0 float32 bytes or file bytes in the wire bytes."""
    findings: list[PayloadFinding] = []
    x, ref = _flat(payload), _flat(x0)
    if x.shape[1] == ref.shape[1] and len(ref):
        distance = torch.cdist(x, ref, p=float("inf")) if len(x) else torch.empty(0, len(ref))
        for i, j in torch.nonzero(distance <= atol).tolist():
            findings.append(PayloadFinding(i, "raw_x0", f"payload {i} equals the client's image {j}"))
    if payload_bytes is not None:
        for j, image in enumerate(x0):
            raw = image.detach().cpu().numpy().astype("<f4").tobytes()
            if raw in payload_bytes:
                findings.append(PayloadFinding(-1, "raw_bytes", f"the float32 bytes of image {j} are on the wire"))
        for name, content in (files or {}).items():
            if content and content in payload_bytes:
                findings.append(PayloadFinding(-1, "file_bytes", f"the bytes of file {name} are on the wire"))
    return findings


def match_to_originals(payload: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """For each payload the index of the x_0 it correlates with most (when no ledger maps keys to files)."""
    x, ref = _flat(payload), _flat(x0)
    x = x - x.mean(dim=1, keepdim=True)
    ref = ref - ref.mean(dim=1, keepdim=True)
    corr = (x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)) @ (ref / ref.norm(dim=1, keepdim=True).clamp_min(1e-12)).T
    return corr.argmax(dim=1)
