"""Differential privacy for what leaves a client: per-image clipping and Gaussian noise, an accountant, a budget.

Split learning (docs/design.md §3) sends g = dL/d(eps_hat) per image; for the MSE loss g = 2(eps_hat - eps)/n, so
whoever holds eps_hat and g holds eps, and with x_t also x_0. ``privatize`` clips every image's gradient to
L2 norm C and adds N(0, (sigma C)^2) to every element before it leaves (the Gaussian mechanism of DP-SGD,
applied to the per-sample rows the client sends instead of their sum).

Unit of privacy: one image. Two adjacency notions, chosen once and used for both protocols so that
their numbers compare:

- ``add_remove`` (default; Opacus' convention): a removed image's row is computed from a null record
  (a zero gradient row; the zero image). L2 sensitivity C for a clipped gradient row, sqrt(ab) * sqrt(d)
  for a release sqrt(ab) x_0 + sqrt(1 - ab) eps of an image clipped to [-1, 1]^d.
- ``replace``: one image replaced by another: twice those sensitivities (2C; 2 sqrt(ab) sqrt(d)). Exact for
  a single release (sample rate 1); with subsampling (q < 1) Opacus' sampled-Gaussian bound is proven for
  add/remove only, so ``replace`` there is the usual approximation and the accountant says so in its log.

The noise multiplier handed to the accountant is always noise std / L2 sensitivity. Opacus is imported on
first use (it takes seconds to import).
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import torch

log = logging.getLogger(__name__)

Adjacency = Literal["add_remove", "replace"]
AccountantKind = Literal["rdp", "prv"]

# Opacus' default orders plus orders near 1 (tiny noise multipliers, e.g. a release just above the data)
# and large orders (large noise multipliers), so the optimum is rarely at an end of the range.
RDP_ORDERS: tuple[float, ...] = (
    tuple(1.0 + k / 100 for k in range(1, 10))
    + tuple(1.0 + x / 10.0 for x in range(1, 100))
    + tuple(float(a) for a in range(12, 64))
    + (128.0, 256.0, 512.0, 1024.0, 4096.0)
)


class PrivacyBudgetExceeded(RuntimeError):
    """The next step would spend more privacy than the client's --dp-epsilon allows."""


def _sensitivity_factor(adjacency: Adjacency) -> float:
    if adjacency == "add_remove":
        return 1.0
    if adjacency == "replace":
        return 2.0
    raise ValueError(f"unknown adjacency {adjacency!r}: use 'add_remove' or 'replace'")


# ---- the mechanism ----------------------------------------------------------------------------------


def per_sample_norms(grad: torch.Tensor) -> torch.Tensor:
    """L2 norm of each sample's gradient (samples along dim 0), in float64."""
    if grad.dim() < 1 or grad.shape[0] == 0:
        raise ValueError(f"expected a gradient with one row per sample, got shape {tuple(grad.shape)}")
    return grad.detach().reshape(grad.shape[0], -1).to(torch.float64).norm(dim=1)


def clip_per_sample(grad: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Scale each sample's gradient to L2 norm at most ``max_norm`` (rows already inside stay untouched)."""
    if not max_norm > 0:
        raise ValueError(f"the clipping norm C must be > 0, got {max_norm}")
    norms = per_sample_norms(grad)
    # Factor computed in float64 and rounded down a hair so that the float32 result never exceeds C.
    factor = torch.clamp(max_norm / norms.clamp_min(1e-300), max=1.0) * (1.0 - 1e-6)
    factor = torch.where(norms <= max_norm, torch.ones_like(factor), factor)
    return grad * factor.to(grad.dtype).view(-1, *([1] * (grad.dim() - 1)))


def privatize(
    grad: torch.Tensor,
    max_norm: float,
    noise_multiplier: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Clip each sample's gradient to norm C, then add N(0, (noise_multiplier * C)^2) to every element."""
    if noise_multiplier < 0:
        raise ValueError(f"the noise multiplier sigma must be >= 0, got {noise_multiplier}")
    clipped = clip_per_sample(grad, max_norm)
    if noise_multiplier == 0:
        return clipped
    noise = torch.randn(clipped.shape, generator=generator, dtype=torch.float32).to(clipped.device, clipped.dtype)
    return clipped + (noise_multiplier * max_norm) * noise


# ---- noise multipliers of the two protocols -----------------------------------------------------------


def gradient_noise_multiplier(noise_multiplier: float, adjacency: Adjacency = "add_remove") -> float:
    """The accountant's multiplier for clipped gradient rows with noise std sigma*C."""
    return noise_multiplier / _sensitivity_factor(adjacency)


def release_noise_multiplier(alpha_bar: float, num_elements: int, adjacency: Adjacency = "add_remove") -> float:
    """Noise std / L2 sensitivity of one release sqrt(ab) x_0 + sqrt(1 - ab) eps of x_0 in [-1, 1]^d.

    Sensitivity of sqrt(ab) x_0: sqrt(ab) * sqrt(d) (add/remove against the zero image) or twice that
    (replace). ab = 1 (cut 0, the raw image) gives multiplier 0: no privacy at all.
    """
    if not 0.0 <= alpha_bar <= 1.0:
        raise ValueError(f"alpha_bar must lie in [0, 1], got {alpha_bar}")
    if num_elements < 1:
        raise ValueError(f"an image has at least one element, got d = {num_elements}")
    if alpha_bar == 0.0:
        return math.inf
    sensitivity = _sensitivity_factor(adjacency) * math.sqrt(alpha_bar * num_elements)
    return math.sqrt(1.0 - alpha_bar) / sensitivity


def combined_noise_multiplier(*multipliers: float) -> float:
    """One Gaussian mechanism equivalent to several on the same record (independent noise): s = (sum s_i^-2)^-1/2.

    Whitening each part makes the joint release one Gaussian mechanism whose squared sensitivity is the
    sum of the parts'. A split step releases x_t *and* the gradient of the same image: both count.
    """
    inverse = sum(0.0 if math.isinf(s) else (math.inf if s == 0 else s**-2) for s in multipliers)
    return 0.0 if math.isinf(inverse) else (math.inf if inverse == 0 else inverse**-0.5)


# ---- accounting -------------------------------------------------------------------------------------


def gaussian_rdp(order: float, noise_multiplier: float) -> float:
    """RDP of the (unsampled) Gaussian mechanism at order alpha: alpha / (2 s^2), s = std / sensitivity."""
    return math.inf if noise_multiplier == 0 else order / (2.0 * noise_multiplier**2)


def analytic_gaussian_epsilon(noise_multiplier: float, delta: float) -> float:
    """Exact epsilon of one Gaussian mechanism at delta (Balle & Wang 2018), for a single release.

    delta(eps) = Phi(1/(2s) - eps s) - e^eps Phi(-1/(2s) - eps s) with s = noise multiplier; bisection in eps.
    """
    from scipy.stats import norm

    _check_delta(delta)
    if noise_multiplier == 0:
        return math.inf
    if math.isinf(noise_multiplier):
        return 0.0
    s = noise_multiplier

    def delta_of(eps: float) -> float:
        # log-space for the second term: e^eps overflows where Phi underflows.
        second = math.exp(eps + float(norm.logcdf(-1.0 / (2 * s) - eps * s)))
        return float(norm.cdf(1.0 / (2 * s) - eps * s)) - second

    if delta_of(0.0) <= delta:
        return 0.0
    low, high = 0.0, 1.0
    while delta_of(high) > delta:
        low, high = high, high * 2
        if high > 1e7:
            return math.inf
    for _ in range(200):
        mid = 0.5 * (low + high)
        if delta_of(mid) > delta:
            low = mid
        else:
            high = mid
    return high


def _check_delta(delta: float) -> None:
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must lie in (0, 1), got {delta}; a usual choice is below 1 / (number of images)")


def _make_accountant(kind: AccountantKind) -> Any:
    from opacus.accountants import PRVAccountant, RDPAccountant

    if kind == "rdp":
        return RDPAccountant()
    if kind == "prv":
        return PRVAccountant()
    raise ValueError(f"unknown accountant {kind!r}: use 'rdp' or 'prv'")


class PrivacyAccountant:
    """Opacus' RDP (default) or PRV accountant over (noise multiplier, sample rate) steps.

    Zero noise (a raw image, or DP off) makes epsilon infinite; it is recorded, not passed to Opacus.
    ``state_dict`` is plain JSON (a history of (multiplier, rate, steps)), for the client's ledger.
    """

    def __init__(self, kind: AccountantKind = "rdp") -> None:
        self.kind: AccountantKind = kind
        self._accountant = _make_accountant(kind)
        self._unbounded = False  # a step with zero noise was taken

    @property
    def history(self) -> list[tuple[float, float, int]]:
        return [(float(s), float(q), int(n)) for s, q, n in self._accountant.history]

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self.history)

    def step(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample rate q must lie in (0, 1], got {sample_rate}")
        if noise_multiplier < 0 or steps < 0:
            raise ValueError(f"noise multiplier and steps must be >= 0, got {noise_multiplier}, {steps}")
        if steps == 0 or math.isinf(noise_multiplier):
            return  # a step that releases nothing about the image costs nothing
        if noise_multiplier == 0:
            self._unbounded = True
            return
        history = self._accountant.history
        if history and history[-1][:2] == (noise_multiplier, sample_rate):
            history[-1] = (noise_multiplier, sample_rate, history[-1][2] + steps)
        else:
            history.append((noise_multiplier, sample_rate, steps))

    def epsilon(self, delta: float) -> float:
        _check_delta(delta)
        if self._unbounded:
            return math.inf
        if not self._accountant.history:
            return 0.0
        if self.kind == "rdp":
            with warnings.catch_warnings():
                # At the smallest order for tiny multipliers (a nearly raw release): still a valid upper bound.
                warnings.filterwarnings("ignore", message="Optimal order is the (smallest|largest) alpha")
                return float(self._accountant.get_epsilon(delta=delta, alphas=list(RDP_ORDERS)))
        return float(self._accountant.get_epsilon(delta=delta))

    def copy(self) -> PrivacyAccountant:
        return copy.deepcopy(self)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "history": [list(h) for h in self.history], "unbounded": self._unbounded}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> PrivacyAccountant:
        accountant = cls(state.get("kind", "rdp"))
        for s, q, n in state.get("history", []):
            accountant.step(float(s), float(q), int(n))
        accountant._unbounded = bool(state.get("unbounded", False))
        return accountant


def epsilon_after(
    noise_multiplier: float, sample_rate: float, steps: int, delta: float, kind: AccountantKind = "rdp"
) -> float:
    """Epsilon at delta after ``steps`` subsampled Gaussian steps (Poisson rate q, multiplier s)."""
    accountant = PrivacyAccountant(kind)
    accountant.step(noise_multiplier, sample_rate, steps)
    return accountant.epsilon(delta)


def release_epsilon(
    alpha_bar: float, num_elements: int, delta: float, adjacency: Adjacency = "add_remove", releases: int = 1
) -> dict[str, float]:
    """What releasing one image at noise level alpha_bar costs, in the DP unit of the split protocol.

    ``rdp``: the accountant's epsilon (composes with other steps); ``exact``: the analytic Gaussian
    mechanism's epsilon for a single release (tight; only for ``releases`` = 1).
    """
    multiplier = release_noise_multiplier(alpha_bar, num_elements, adjacency)
    out = {
        "noise_multiplier": multiplier,
        "epsilon_rdp": epsilon_after(multiplier, 1.0, releases, delta),
    }
    if releases == 1:
        out["epsilon_exact"] = analytic_gaussian_epsilon(multiplier, delta)
    return out


@dataclass
class PrivacyBudget:
    """A client's budget (--dp-epsilon, --dp-delta): refuse any step that would spend past it."""

    epsilon: float
    delta: float
    accountant: PrivacyAccountant

    def __post_init__(self) -> None:
        if not self.epsilon > 0:
            raise ValueError(f"--dp-epsilon must be > 0, got {self.epsilon}")
        _check_delta(self.delta)

    @classmethod
    def new(cls, epsilon: float, delta: float, kind: AccountantKind = "rdp") -> PrivacyBudget:
        return cls(epsilon, delta, PrivacyAccountant(kind))

    def spent(self) -> float:
        return self.accountant.epsilon(self.delta)

    def epsilon_if(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> float:
        """Epsilon spent after the given further steps (the accountant itself is not changed)."""
        trial = self.accountant.copy()
        trial.step(noise_multiplier, sample_rate, steps)
        return trial.epsilon(self.delta)

    def allows(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> bool:
        return self.epsilon_if(noise_multiplier, sample_rate, steps) <= self.epsilon

    def charge(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> float:
        """Account the steps if the budget allows them; else raise PrivacyBudgetExceeded (nothing charged)."""
        after = self.epsilon_if(noise_multiplier, sample_rate, steps)
        if after > self.epsilon:
            raise PrivacyBudgetExceeded(
                f"privacy budget spent: {self.accountant.steps} steps have used epsilon = {self.spent():.3g} "
                f"of --dp-epsilon {self.epsilon:g} (delta {self.delta:g}); the next {steps} step(s) at noise "
                f"multiplier {noise_multiplier:g}, sample rate {sample_rate:g} would bring it to {after:.3g}. "
                "The client stops sending. To go on, raise --dp-epsilon, add noise (a larger noise multiplier), "
                "or train the rest locally."
            )
        self.accountant.step(noise_multiplier, sample_rate, steps)
        return after
