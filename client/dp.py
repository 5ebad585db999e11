"""Differential privacy for what leaves a client: per-image clipping and Gaussian noise, and what each send costs.

Split learning (docs/design.md §3) sends g = dL/d(eps_hat) per image; for the MSE loss g = 2(eps_hat - eps)/n, so
whoever holds eps_hat and g holds eps, and with x_t also x_0. ``privatize`` clips every image's gradient row to
L2 norm C and adds N(0, (sigma C)^2) to every element before it leaves.

**Neighbouring relation: replace-one, labels fixed.** Two data sets are neighbours when they have the same
number of images with the same labels and differ in the pixels of one image (any two images in [-1, 1]^d). In
latent space (--autoencoder) the mechanism acts on the image's scaled latent, clamped by the client to
[-b, b]^d with b = LATENT_BOUND (common/autoencoder.py): every sensitivity below is then b times larger
(``bound``), with d the number of latent elements.
Labels are sent in the clear with every release and split row, so they are not protected. Add/remove is not
offered: the server sees every image's release or rows as such (it counts them), so an image's presence is
never hidden. ``zero`` is the special case of replacing an image by the null record, the all-zero image run
through the same code: half the x sensitivity, but *not* half the gradient's: the zero image's gradient row is
not zero, so two clipped rows still differ by up to 2C.

**Unit: one image, composed over what was actually sent.** Every release and every split send of an image is a
Gaussian mechanism on that image's pixels x_0; its strength is mu = L2 sensitivity / noise std (Gaussian DP).
Composing Gaussian mechanisms adds mu^2 exactly (Dong, Roth & Su 2022), also adaptively, and an image's sends
are chosen independently of any pixels (which image, when, at which t), so an image sent k times has
mu^2 = sum_k mu_k^2, and epsilon at delta is that of one Gaussian mechanism with this mu (Balle & Wang 2018).
No amplification by subsampling is claimed: a split step sends one row per image, so whether an image is in a
batch is not hidden the way it is in a noised *sum* (DP-SGD); Poisson sampling gives such rows no amplification
at all, and fixed-size sampling only while every image is treated alike, which the per-image caps of split
(client/protocols/split.py) deliberately do not do. Epsilon is therefore the worst image's, whatever the sampler.

One send, per image, under replace-one (p_t = ab_t / (1 - ab_t)):

- a release sqrt(ab) x_0 + sqrt(1 - ab) eps: sensitivity 2 sqrt(ab d), noise sqrt(1 - ab): mu^2 = 4 d p;
- a split row's x_t: the same at its t;
- its gradient row, given x_t: clip_C((2/d)(eps_hat - eps)) with eps = (x_t - sqrt(ab) x_0) / sqrt(1 - ab). Two
  clipped rows differ by at most 2C; and since clipping is 1-Lipschitz and eps moves by sqrt(p) per unit of
  x_0, they differ by at most (2/d) sqrt(p) * 2 sqrt(d) = 4 sqrt(p / d). Noise sigma C:
  mu^2 = min(2C, 4 sqrt(p/d))^2 / (sigma C)^2. Without noise (sigma = 0 or no clipping) mu is infinite.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

Relation = Literal["replace", "zero"]
RELATIONS: tuple[str, ...] = ("replace", "zero")


def _x_distance(relation: Relation, bound: float = 1.0) -> float:
    """Largest ||x_0 - x_0'|| / sqrt(d) between neighbours: any two points of [-b, b]^d, or a point and zero.

    ``bound`` b is the data's range per element: 1 for images in [-1, 1], common/autoencoder.py's LATENT_BOUND for
    scaled latents (the client clamps them to it, so every image's latent lies in the box)."""
    if not bound > 0:
        raise ValueError(f"the data's range per element must be positive, got {bound}")
    if relation == "replace":
        return 2.0 * bound
    if relation == "zero":
        return 1.0 * bound
    raise ValueError(f"unknown neighbouring relation {relation!r}: use 'replace' (replace-one) or 'zero' "
                     "(replace by the zero image); add/remove is not a relation these releases can meet")


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


# ---- what one release or send costs (mu^2, Gaussian DP) ---------------------------------------------


def _odds(alpha_bar: float) -> float:
    if not 0.0 <= alpha_bar <= 1.0:
        raise ValueError(f"alpha_bar must lie in [0, 1], got {alpha_bar}")
    return math.inf if alpha_bar == 1.0 else alpha_bar / (1.0 - alpha_bar)


def release_mu2(alpha_bar: float, num_elements: int, relation: Relation = "replace", bound: float = 1.0) -> float:
    """mu^2 of one release sqrt(ab) x_0 + sqrt(1 - ab) eps of an image in [-1, 1]^d: (k sqrt(d))^2 * ab / (1 - ab).

    k = 2 under replace-one, 1 against the zero image. ab = 1 (cut 0, the raw image): infinite.
    """
    if num_elements < 1:
        raise ValueError(f"an image has at least one element, got d = {num_elements}")
    return _x_distance(relation, bound) ** 2 * num_elements * _odds(alpha_bar)


def gradient_mu2(
    alpha_bar: float, num_elements: int, clip: float | None, noise_multiplier: float, relation: Relation = "replace",
    bound: float = 1.0,
) -> float:
    """mu^2 of one clipped, noised gradient row given its x_t (module docstring): min(2C, L)^2 / (sigma C)^2.

    L = (2/d) sqrt(ab / (1 - ab)) * k sqrt(d) is how far the row can move when x_0 moves by the relation's
    distance; 2C is how far two clipped rows can be apart, whichever image is the null record.
    """
    if clip is None or noise_multiplier <= 0:
        return math.inf  # the exact gradient gives eps, hence x_0
    lipschitz = 2.0 / num_elements * math.sqrt(_odds(alpha_bar)) * _x_distance(relation, bound) * math.sqrt(num_elements)
    return (min(2.0 * clip, lipschitz) / (noise_multiplier * clip)) ** 2


def split_send_mu2(
    alpha_bar: float, num_elements: int, clip: float | None, noise_multiplier: float, relation: Relation = "replace",
    bound: float = 1.0,
) -> float:
    """mu^2 of one split send of one image at a level alpha_bar: its x_t and its gradient row, composed."""
    return release_mu2(alpha_bar, num_elements, relation, bound) + gradient_mu2(
        alpha_bar, num_elements, clip, noise_multiplier, relation, bound)


# ---- noise multipliers (noise std / sensitivity = 1 / mu) ------------------------------------------


def release_noise_multiplier(alpha_bar: float, num_elements: int, adjacency: Relation = "replace",
                             bound: float = 1.0) -> float:
    """Noise std / L2 sensitivity of one release of x_0 in [-b, b]^d (1 / mu); 0 for the raw image (cut 0)."""
    mu2 = release_mu2(alpha_bar, num_elements, adjacency, bound)
    return 0.0 if math.isinf(mu2) else (math.inf if mu2 == 0 else mu2**-0.5)


def gradient_noise_multiplier(noise_multiplier: float, adjacency: Relation = "replace") -> float:
    """Multiplier of a clipped row with noise sigma C, from the clipping bound alone: sigma C / 2C = sigma / 2.

    The same under both relations: the null record's row is not zero. (``gradient_mu2`` is tighter at high t.)
    """
    _x_distance(adjacency)
    return noise_multiplier / 2.0


def combined_noise_multiplier(*multipliers: float) -> float:
    """One Gaussian mechanism equivalent to several on the same record (independent noise): s = (sum s_i^-2)^-1/2.

    Whitening each part makes the joint release one Gaussian mechanism whose squared sensitivity is the
    sum of the parts'. A split step releases x_t *and* the gradient of the same image: both count.
    """
    inverse = sum(0.0 if math.isinf(s) else (math.inf if s == 0 else s**-2) for s in multipliers)
    return 0.0 if math.isinf(inverse) else (math.inf if inverse == 0 else inverse**-0.5)


# ---- epsilon ----------------------------------------------------------------------------------------


def _check_delta(delta: float) -> None:
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must lie in (0, 1), got {delta}; a usual choice is below 1 / (number of images)")


def _log_delta(mu: float, eps: float) -> float:
    """ln delta(eps) of a mu-GDP mechanism: Phi(mu/2 - eps/mu) - e^eps Phi(-mu/2 - eps/mu), in log space."""
    from scipy.stats import norm

    first = float(norm.logcdf(mu / 2 - eps / mu))
    second = eps + float(norm.logcdf(-mu / 2 - eps / mu))
    return first + math.log1p(-math.exp(second - first)) if second < first else -math.inf


def gaussian_epsilon(mu: float, delta: float) -> float:
    """Exact epsilon at delta of a Gaussian mechanism with mu = sensitivity / noise std (Balle & Wang 2018)."""
    from scipy.optimize import brentq

    _check_delta(delta)
    if mu <= 0:
        return 0.0
    if math.isinf(mu):
        return math.inf
    target = math.log(delta)
    if _log_delta(mu, 0.0) <= target:
        return 0.0
    high = 1.0
    while _log_delta(mu, high) > target:
        high *= 2.0
    return float(brentq(lambda e: _log_delta(mu, e) - target, high / 2 if high > 1 else 0.0, high, xtol=1e-12,
                        rtol=1e-12))


def gaussian_mu(epsilon: float, delta: float) -> float:
    """The largest mu whose Gaussian mechanism is (epsilon, delta)-DP: the inverse of ``gaussian_epsilon``."""
    from scipy.optimize import brentq

    _check_delta(delta)
    if math.isinf(epsilon):
        return math.inf
    if not epsilon >= 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    target = math.log(delta)
    low, high = 1e-6, 1.0
    while _log_delta(high, epsilon) < target:
        low, high = high, high * 2.0
    if _log_delta(low, epsilon) > target:
        return 0.0
    return float(brentq(lambda m: _log_delta(m, epsilon) - target, low, high, xtol=1e-12, rtol=1e-12))


def epsilon_of_mu2(mu2: float, delta: float) -> float:
    """Epsilon at delta after Gaussian mechanisms whose mu^2 add up to ``mu2`` (their exact composition)."""
    return gaussian_epsilon(math.sqrt(mu2), delta) if mu2 > 0 else 0.0


def analytic_gaussian_epsilon(noise_multiplier: float, delta: float) -> float:
    """Exact epsilon of one Gaussian mechanism with noise std / sensitivity = ``noise_multiplier``."""
    _check_delta(delta)
    if noise_multiplier == 0:
        return math.inf
    return gaussian_epsilon(1.0 / noise_multiplier, delta)


def epsilon_after(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Epsilon at delta after ``steps`` Gaussian mechanisms on the same image, each at ``noise_multiplier``.

    ``sample_rate`` must be 1: no amplification by subsampling is claimed for per-image releases (module docstring).
    """
    if sample_rate != 1.0:
        raise ValueError(f"sample rate {sample_rate}: amplification by subsampling does not apply to per-image rows "
                         "(a row's presence is visible); account the sends each image actually made")
    if steps < 0 or noise_multiplier < 0:
        raise ValueError(f"noise multiplier and steps must be >= 0, got {noise_multiplier}, {steps}")
    _check_delta(delta)
    if steps == 0 or math.isinf(noise_multiplier):
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    return epsilon_of_mu2(steps / noise_multiplier**2, delta)


def release_epsilon(
    alpha_bar: float, num_elements: int, delta: float, adjacency: Relation = "replace", releases: int = 1,
    bound: float = 1.0,
) -> dict[str, float | str]:
    """What releasing one image ``releases`` times at noise level alpha_bar costs (independent noise each time)."""
    mu2 = release_mu2(alpha_bar, num_elements, adjacency, bound)
    return {
        "relation": adjacency,
        "noise_multiplier": 0.0 if math.isinf(mu2) else mu2**-0.5,
        "mu": math.sqrt(mu2),
        "epsilon_exact": epsilon_of_mu2(releases * mu2, delta) if math.isfinite(mu2) else math.inf,
    }
