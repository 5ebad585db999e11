"""Forward process, the release, and the two training losses (docs/design.md §1, §2).

All ``t`` here are the paper's 1-based times; ``alphas_cumprod`` comes from
``ScheduleConfig.alphas_cumprod()`` (index 0 holds alpha_bar_0 = 1).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from collafuse.common.config import AmbientLoss, LocalTimesteps

# eps_hat = denoiser(x_t, t, labels); t is the paper's 1-based time (LongTensor [N]).
Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _bcast(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(device=like.device, dtype=like.dtype).view(-1, *([1] * (like.dim() - 1)))


def q_sample(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps."""
    ab = alphas_cumprod[t.cpu()]
    return _bcast(ab.sqrt(), x0) * x0 + _bcast((1 - ab).sqrt(), x0) * noise


def release_noise(seeds: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """eps_c for each image, drawn from its persistent per-image seed (one image, one noise)."""
    out = torch.empty((len(seeds), *shape), dtype=torch.float32)
    for i, seed in enumerate(seeds):
        gen = torch.Generator().manual_seed(int(seed))
        out[i] = torch.randn(shape, generator=gen, dtype=torch.float32)
    return out


def release(x0: torch.Tensor, seeds: list[int], cut: int, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """x_cut = sqrt(alpha_bar_cut) x_0 + sqrt(1 - alpha_bar_cut) eps_c, eps_c from the per-image seeds."""
    noise = release_noise(seeds, tuple(x0.shape[1:]))
    t = torch.full((x0.shape[0],), cut, dtype=torch.long)
    return q_sample(x0.float(), t, noise, alphas_cumprod).float()


def sample_client_times(n: int, cut: int, generator: torch.Generator | None = None,
                        timesteps: LocalTimesteps = "uniform") -> torch.Tensor:
    """t in {1, ..., cut}, the client's low-noise steps: uniform, or ``linear`` with P(t) = t / (cut (cut + 1) / 2).

    Linear draws are a reweighting of the same eps objective (every t keeps a positive weight, so the minimiser
    E[eps | x_t] is unchanged); they spend more of a short training on the noisier steps, where a hand-off's class is
    kept or lost, and less on the last few, which only sharpen."""
    if cut < 1:
        raise ValueError("a client with cut 0 (global model) owns no timesteps and trains no model")
    if timesteps == "uniform":
        return torch.randint(1, cut + 1, (n,), generator=generator)
    if timesteps == "linear":
        weights = torch.arange(1, cut + 1, dtype=torch.float64)
        return torch.multinomial(weights, n, replacement=True, generator=generator) + 1
    raise ValueError(f"unknown client timesteps {timesteps!r}: use uniform or linear")


def sample_server_times(cuts: torch.Tensor, num_train_timesteps: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """t ~ U{cut + 1, ..., T} per sample (each release carries its own client's cut)."""
    if bool((cuts >= num_train_timesteps).any()):
        raise ValueError("a release at cut T leaves the server no timesteps to train")
    span = (num_train_timesteps - cuts).to(torch.float64)
    u = torch.rand(cuts.shape, generator=generator, dtype=torch.float64)
    return (cuts + 1 + torch.floor(u * span).long()).clamp(max=num_train_timesteps)


def ambient_c2(cut: int, alphas_cumprod: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, c(t)^2) for every t in (cut, T]: c^2 = (1 - ab_t / ab_cut) / (1 - ab_t), the weight the ambient loss gives
    t (docs/design.md §2). Float64."""
    num_train_timesteps = alphas_cumprod.shape[0] - 1
    t = torch.arange(cut + 1, num_train_timesteps + 1)
    ab_t = alphas_cumprod[t].to(torch.float64)
    return t, (1 - ab_t / float(alphas_cumprod[cut])) / (1 - ab_t)


def sample_server_times_c2(
    cuts: torch.Tensor, alphas_cumprod: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """t ~ p(t | cut) proportional to c(t)^2 on (cut, T], and the importance weight of each draw (the server's
    ``--ambient-timesteps c2``).

    The ambient loss weighs t by c(t)^2, which is near 0 just above the cut: drawn uniformly, those t cost a sample and
    teach little. Drawn in proportion to c^2 and weighted by w = mean_t'(c^2) / c(t)^2, the loss has the same
    expectation (the same objective) as the uniform draw: sum_t p(t) w(t) L(t) = mean_t L(t).
    """
    if bool((cuts >= alphas_cumprod.shape[0] - 1).any()):
        raise ValueError("a release at cut T leaves the server no timesteps to train")
    t = torch.empty(cuts.shape, dtype=torch.long)
    weight = torch.empty(cuts.shape, dtype=torch.float64)
    for cut in torch.unique(cuts).tolist():
        rows = torch.nonzero(cuts == cut).flatten()
        steps, c2 = ambient_c2(int(cut), alphas_cumprod)
        draw = torch.multinomial(c2 / c2.sum(), len(rows), replacement=True, generator=generator)
        t[rows] = steps[draw]
        weight[rows] = c2.mean() / c2[draw]
    return t, weight


def client_loss(
    denoiser: Denoiser,
    x0: torch.Tensor,
    labels: torch.Tensor,
    cut: int,
    alphas_cumprod: torch.Tensor,
    generator: torch.Generator | None = None,
    timesteps: LocalTimesteps = "uniform",
) -> torch.Tensor:
    """Plain DDPM eps-prediction on the client's own x_0, t in [1, cut] drawn as ``timesteps`` says."""
    t = sample_client_times(x0.shape[0], cut, generator, timesteps)
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    x_t = q_sample(x0, t, noise, alphas_cumprod)
    return torch.nn.functional.mse_loss(denoiser(x_t, t.to(x0.device), labels), noise)


def ambient_renoise(
    x_cut: torch.Tensor,
    cuts: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    alphas_cumprod: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-noise a release from its cut to t > cut: returns (x_t, c) of docs/design.md §2.

    x_t = a x_cut + b eps',  a = sqrt(ab_t / ab_cut),  b = sqrt(1 - ab_t / ab_cut),
    c = b / sqrt(1 - ab_t).  x_t then has exactly the forward marginal q(x_t | x_0).
    """
    if bool((t <= cuts).any()):
        raise ValueError("the server re-noises only to t > cut")
    ratio = alphas_cumprod[t.cpu()] / alphas_cumprod[cuts.cpu()]
    a, b = ratio.sqrt(), (1 - ratio).sqrt()
    c = b / (1 - alphas_cumprod[t.cpu()]).sqrt()
    x_t = _bcast(a, x_cut) * x_cut + _bcast(b, x_cut) * noise
    return x_t, _bcast(c, x_cut)


def ambient_pooled_weights(
    cuts: torch.Tensor,
    t: torch.Tensor,
    present_cuts: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    max_weight: float = 10.0,
) -> torch.Tensor:
    """Per-release weights that make the ambient minimiser the pooled E[eps | x_t] when cuts differ.

    Unweighted, a release of client i lands at t with density 1/(T - cut_i) (t ~ U(cut_i, T]) and its
    loss is scaled by c_i(t)^2, so at each t the minimiser weighs client i's posterior by
    n_i c_i(t)^2 / (T - cut_i) instead of n_i. The weight r_i(t) = (T - cut_i) / c_i(t)^2 undoes both.

    Only the ratio of weights at the same t decides the minimiser, so any lambda(t) > 0 may scale them:
    lambda(t) = min(1 / r_min(t), max_weight / r_max(t)), the min and max taken over the cuts in
    ``present_cuts`` (plus the batch's own) that lie below t. The release with the smallest r at t
    (far above the cuts, where c ~ 1: the highest cut, whose t draws are densest) keeps weight 1 while the
    spread r_max / r_min at t is at most ``max_weight``; where it
    is larger (t just above a cut, where c -> 0 and r explodes) every weight at that t is scaled down so
    that none exceeds ``max_weight``. The per-t minimiser stays exactly the pooled posterior for any cap;
    what the cap trades is the weight of the t just above the higher cuts in the whole loss (those t
    are learned more slowly) against gradient variance (a release near its cut regresses onto eps'/c,
    whose variance is 1/c^2). Where one cut lies below t, every weight is exactly 1.

    ``cuts`` and ``t`` are per-release [N] (t > cut); returns float64 [N] on the CPU.
    """
    if max_weight < 1:
        raise ValueError(f"max_weight {max_weight} is below 1: that only scales the whole loss down (the learning "
                         "rate does that); use 1 or more")
    if bool((t <= cuts).any()):
        raise ValueError("weights are defined for t > cut only")
    num_train_timesteps = alphas_cumprod.shape[0] - 1
    cuts, t = cuts.cpu().long(), t.cpu().long()
    levels = torch.unique(torch.cat([present_cuts.cpu().long().reshape(-1), cuts]))  # [K]
    ab_t = alphas_cumprod[t].to(torch.float64)[:, None]  # [N, 1]

    def spread(cut: torch.Tensor) -> torch.Tensor:
        """r = (T - cut) / c^2 with c^2 = (1 - ab_t / ab_cut) / (1 - ab_t), broadcast over [N, *]."""
        c2 = (1 - ab_t / alphas_cumprod[cut].to(torch.float64)) / (1 - ab_t)
        return (num_train_timesteps - cut).to(torch.float64) / c2

    active = levels[None, :] < t[:, None]  # [N, K]; the batch's own cut is always active
    with torch.no_grad():
        r_all = spread(levels[None, :].expand(t.shape[0], -1).clamp(max=num_train_timesteps - 1))
        r_min = torch.where(active, r_all, torch.inf).amin(dim=1)
        r_max = torch.where(active, r_all, -torch.inf).amax(dim=1)
        r_own = spread(cuts[:, None])[:, 0]
        scale = torch.minimum(1 / r_min, max_weight / r_max)
    return r_own * scale


def ambient_server_loss(
    denoiser: Denoiser,
    x_cut: torch.Tensor,
    labels: torch.Tensor,
    cuts: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    generator: torch.Generator | None = None,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    parametrisation: AmbientLoss = "eps",
    max_weight: float = 10.0,
) -> torch.Tensor:
    """|| c eps_hat_s(x_t, t, y) - eps' ||^2 with t ~ U(cut, T] and eps' ~ N(0, I) unless given.

    With one cut for every release its minimiser is the standard eps-predictor E[eps | x_t]. With
    several cuts (the "mixed cuts" caveat of docs/design.md §2) it is not: at each t client i's posterior is
    weighted by n_i c_i(t)^2 / (T - cut_i) rather than n_i. ``weight`` (per release, from
    ``ambient_pooled_weights``; the server's ``--ambient-weighting pooled``) restores n_i; the loss is
    then mean(weight * squared error), so a slice of a batch with its weights is that slice's share.
    """
    num_train_timesteps = alphas_cumprod.shape[0] - 1
    if t is None:
        t = sample_server_times(cuts, num_train_timesteps, generator)
    if noise is None:
        noise = torch.randn(x_cut.shape, generator=generator, dtype=x_cut.dtype)
    noise = noise.to(x_cut.device)
    x_t, c = ambient_renoise(x_cut, cuts, t, noise, alphas_cumprod)
    eps_hat = denoiser(x_t, t.to(x_cut.device), labels)
    if parametrisation == "x0":
        squared = ambient_x0_squared_error(eps_hat, x_t, x_cut, cuts, t, c, alphas_cumprod, max_weight)
    elif weight is None:
        return torch.nn.functional.mse_loss(c * eps_hat, noise)
    else:
        squared = (c * eps_hat.float() - noise.float()) ** 2
    return squared.mean() if weight is None else (_bcast(weight, squared) * squared).mean()


def ambient_x0_target(
    x_t: torch.Tensor, x_cut: torch.Tensor, cuts: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """The x0 that a release at its cut and its re-noised x_t point to (Daras et al. 2024, "Consistent Diffusion
    Meets Tweedie", the double application of Tweedie's formula).

    In variance-exploding units y = x / sqrt(ab) with sigma^2 = (1 - ab) / ab, Tweedie's formula at both levels
    gives E[y_cut | y_t] = r y_t + (1 - r) E[x_0 | y_t], r = sigma_cut^2 / sigma_t^2. So the model's E[x_0 | x_t]
    minimises || x0_hat - (y_cut - r y_t) / (1 - r) ||^2: this is that target (unbiased, not clean: its variance
    grows as t nears the cut, where 1 - r = c^2 -> 0).
    """
    ab_t = alphas_cumprod[t.cpu()].to(torch.float64)
    ab_cut = alphas_cumprod[cuts.cpu()].to(torch.float64)
    r = ((1 - ab_cut) / ab_cut) / ((1 - ab_t) / ab_t)
    y_t = x_t / _bcast(ab_t.sqrt(), x_t)
    y_cut = x_cut / _bcast(ab_cut.sqrt(), x_cut)
    return (y_cut - _bcast(r, y_t) * y_t) / _bcast(1 - r, y_t)


def predicted_x0(eps_hat: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """x0_hat = (x_t - sqrt(1 - ab_t) eps_hat) / sqrt(ab_t): an eps-model's estimate of x_0."""
    ab_t = alphas_cumprod[t.cpu()]
    return (x_t - _bcast((1 - ab_t).sqrt(), x_t) * eps_hat) / _bcast(ab_t.sqrt(), x_t)


def ambient_x0_squared_error(
    eps_hat: torch.Tensor,
    x_t: torch.Tensor,
    x_cut: torch.Tensor,
    cuts: torch.Tensor,
    t: torch.Tensor,
    c: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    max_weight: float,
) -> torch.Tensor:
    """The x0-parametrised ambient loss per element (the server's ``--ambient-loss x0``; ``c`` from
    ``ambient_renoise``):
    lambda(t) || x0_hat(x_t) - x0_target ||^2 with lambda = SNR(t) min(1, max_weight c^2).

    SNR(t) = ab_t / (1 - ab_t) is the weight that makes the x0 loss the plain eps loss when cut = 0. Written in eps
    terms this loss is min(1 / c^2, max_weight) || c eps_hat - eps' ||^2: the eps loss with the t just above the cut,
    which it weighs by c^2 ~ 0, lifted to full weight, up to ``max_weight`` times the eps loss's (the target's variance
    grows as 1 / c^2 there). Each t keeps its minimiser E[x_0 | x_t], so the objective's optimum is the eps loss's.
    """
    ab_t = alphas_cumprod[t.cpu()].to(torch.float64)
    c2 = c.flatten().cpu().to(torch.float64) ** 2
    lam = ab_t / (1 - ab_t) * torch.clamp(max_weight * c2, max=1.0)
    error = predicted_x0(eps_hat.double(), x_t.double(), t, alphas_cumprod.double()) - ambient_x0_target(
        x_t.double(), x_cut.double(), cuts, t, alphas_cumprod)
    return (_bcast(lam, error) * error**2).to(eps_hat.dtype)
