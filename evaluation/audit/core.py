"""The audit of one (client, cut) group of releases: payload checks, attacks, epsilon. Pure tensors in, JSON out.

Attacks on the *actual* payloads (``linear``, ``tweedie``, ``chain_*``) say what this run's server can
reconstruct. Attacks marked ``simulated`` say what it could if the client misbehaved or used the other
protocol: k fresh-noise releases of one image (averaging), one noise reused at a second level (two-level
solve), and a split-learning step at t = cut + 1 (the least noisy step the server would ever see) with and
without DP. All are scored against the true x_0.

What reached the server is attacked as a whole, not payload by payload (the copies and the native view come from
the caller, evaluation/audit/cli.py): ``extra`` estimates such as the aligned mean of every copy of an image that
reached the server (``copies``), and, when the served spec is larger than the client's images, every actual
attack again at the client's native resolution by least squares (``native``: ``<attack>_native``, scored
against the native image). The noise check holds each payload against the client's own floor per element
(``floor``: its reference schedule and look gain), not against the schedule the server served.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from collafuse.client.dp import (
    combined_noise_multiplier,
    epsilon_after,
    gradient_noise_multiplier,
    per_sample_norms,
    privatize,
    release_epsilon,
    release_noise_multiplier,
)
from collafuse.common.diffusion import Denoiser, q_sample
from collafuse.common.schedule import ScheduleConfig
from collafuse.evaluation.audit import attacks
from collafuse.evaluation.audit.attacks import Reconstruction, score
from collafuse.evaluation.audit.floor import ClientFloor
from collafuse.evaluation.audit.native import NativeImages
from collafuse.evaluation.audit.payloads import check_noise, check_raw
from collafuse.evaluation.audit.space import current_space

log = logging.getLogger(__name__)


class AuditConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    chains: list[str] = Field(default_factory=lambda: ["ddim", "ddpm"], description="full-chain attacks to run")
    chain_steps: int = Field(0, ge=0, description="chain length (0: every step from the cut, the exact level)")
    averaging: list[int] = Field(default_factory=lambda: [2, 4, 8], description="k of the simulated averaging attack")
    dp_noise: list[float] = Field(default_factory=lambda: [0.5, 2.0], description="sigma of the simulated DP split step")
    dp_clip: float | None = Field(None, gt=0, description="C (default: the median per-image gradient norm)")
    delta: float = Field(1e-5, gt=0, lt=1, description="delta of the epsilon reported")
    seed: int = 0


def _attack(results: list[dict[str, Any]], recs: list[Reconstruction], rec: Reconstruction, **tags: Any) -> None:
    recs.append(rec)
    results.append({**rec.summary(), **tags})


def _split_step(
    denoiser: Denoiser, x0: torch.Tensor, labels: torch.Tensor, t: int, alphas_cumprod: torch.Tensor,
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """One split step as the client computes it: (x_t, eps_hat, dL/d eps_hat, loss scale)."""
    eps = torch.randn(x0.shape, generator=gen)
    x_t = q_sample(x0, torch.full((x0.shape[0],), t, dtype=torch.long), eps, alphas_cumprod).float()
    with torch.no_grad():
        eps_hat = denoiser(x_t, torch.full((x0.shape[0],), t, dtype=torch.long), labels)
    with torch.enable_grad():
        eps_hat.requires_grad_(True)
        loss = torch.nn.functional.mse_loss(eps_hat, eps)
        (grad,) = torch.autograd.grad(loss, eps_hat)
    return x_t, eps_hat.detach(), grad, attacks.mse_loss_scale(tuple(eps.shape))


def audit_group(
    x0: torch.Tensor,
    x_cut: torch.Tensor,
    labels: torch.Tensor,
    cut: int,
    schedule: ScheduleConfig,
    denoiser: Denoiser | None,
    config: AuditConfig,
    wire_bytes: bytes | None = None,
    files: dict[str, bytes] | None = None,
    release_alpha_bar: float | None = None,
    *,
    floor: ClientFloor | None = None,
    native: NativeImages | None = None,
    extra: dict[str, torch.Tensor] | None = None,
    extra_info: dict[str, dict[str, Any]] | None = None,
) -> tuple[dict[str, Any], list[Reconstruction]]:
    """Audit N releases ``x_cut`` (rows matched to ``x0``) of one client at one cut.

    ``release_alpha_bar``: the level the payloads were released at, which the attacks undo (default:
    ``schedule``'s at the cut, the server's). ``floor``: the client's own floor; the noise check holds every
    payload against its per-element level (without it: against the release level). ``native``: the client's
    images at their own size, when the served spec differs (every actual attack is then also run back to them by
    least squares). ``extra``: further actual estimates of x_0 (unclamped, rows matched), e.g. the aligned copies.
    """
    ab = schedule.alphas_cumprod()
    ab_cut = float(ab[cut]) if release_alpha_bar is None else release_alpha_bar
    d = x0[0].numel()
    gen = torch.Generator().manual_seed(config.seed)
    report: dict[str, Any] = {"cut": cut, "alpha_bar": ab_cut, "images": int(x0.shape[0])}
    limit = floor.per_element if floor is not None else ab_cut
    against = ("the client's own floor per element" if floor is not None else "the release level (no client floor)")
    report["noise_check"] = {**check_noise(x_cut, limit, x0).summary(), "against": against}
    report["noise_check_blind"] = {**check_noise(x_cut, limit).summary(), "against": against}
    if floor is not None:
        report["floor"] = floor.to_json()
        report["level_check"] = check_noise(x_cut, ab_cut, x0).summary()
        measured = torch.tensor(report["noise_check"].get("measured_alpha_bar_mean") or 0.0)
        report["floor"]["measured_alpha_bar_per_native_pixel"] = float(floor.native_level(measured))
    raw = check_raw(x_cut, x0, wire_bytes, files)
    report["raw_findings"] = [f.to_json() for f in raw[:20]]
    if cut == 0:
        report["note"] = "cut 0 is the global-model baseline: the release IS x0 (no privacy, by design)"
    report["epsilon_release"] = release_epsilon(ab_cut, d, config.delta, bound=current_space().dp_bound)
    results: list[dict[str, Any]] = []
    recs: list[Reconstruction] = []

    # ---- on the actual payloads --------------------------------------------------------------------
    actual: dict[str, torch.Tensor] = {}  # name -> estimate (unclamped where the attack is linear)
    if cut > 0:
        actual["linear"] = x_cut.to(torch.float64) / math.sqrt(ab_cut)
    if denoiser is not None and 0 < cut:
        actual["tweedie"] = attacks.tweedie(denoiser, x_cut, cut, labels, ab)
        for kind in config.chains:
            actual[f"chain_{kind}"] = attacks.chain(denoiser, schedule, x_cut, cut, labels, kind,  # type: ignore[arg-type]
                                                    config.chain_steps, config.seed)
    if cut == 0:
        actual["identity"] = x_cut
    for name, x0_hat in (extra or {}).items():
        actual[name] = x0_hat
    for name, x0_hat in actual.items():
        _attack(results, recs, score(name, x0_hat, x0), simulated=False, **(extra_info or {}).get(name, {}))
    if native is not None:
        report["native"] = native.describe()
        for name, x0_hat in actual.items():
            rec = score_native(f"{name}_native", native.operator.lsq(x0_hat[native.rows]), native.images)
            _attack(results, recs, rec, simulated=False, resolution="native")

    # ---- what misbehaviour or the other protocol would give ----------------------------------------
    if 0 < cut < schedule.num_train_timesteps:
        for k in config.averaging:
            fresh = torch.stack([x_cut] + [
                q_sample(x0, torch.full((x0.shape[0],), cut, dtype=torch.long), torch.randn(x0.shape, generator=gen), ab)
                .float() for _ in range(k - 1)
            ])
            mean, ab_k = attacks.average_releases(fresh, ab_cut)
            _attack(results, recs, score(f"average_k{k}_linear", attacks.linear(mean, ab_k), x0), simulated=True, k=k)
            if denoiser is not None:
                t_k = attacks.nearest_timestep(ab_k, ab)
                _attack(results, recs, score(f"average_k{k}_tweedie", attacks.tweedie(denoiser, mean, t_k, labels, ab), x0),
                        simulated=True, k=k)
        second = min(schedule.num_train_timesteps, 2 * cut)
        if second != cut:
            eps_c = (x_cut.double() - math.sqrt(ab_cut) * x0.double()) / math.sqrt(1 - ab_cut)  # the release's own noise
            x_second = q_sample(x0.double(), torch.full((x0.shape[0],), second, dtype=torch.long), eps_c, ab)
            _attack(results, recs, score("two_level", attacks.two_level(x_cut, ab_cut, x_second, float(ab[second])), x0),
                    simulated=True, second_level=second)
    if denoiser is not None and cut < schedule.num_train_timesteps:
        t = cut + 1
        x_t, eps_hat, grad, scale = _split_step(denoiser, x0, labels, t, ab, gen)
        ab_t = float(ab[t])
        _attack(results, recs, score("split_inversion", attacks.invert_gradient(grad, eps_hat, x_t, ab_t, scale), x0),
                simulated=True, t=t, dp_noise=0.0)
        clip = config.dp_clip or float(per_sample_norms(grad).median())
        x_t_multiplier = release_noise_multiplier(ab_t, d, bound=current_space().dp_bound)
        report["split"] = {"t": t, "dp_clip": clip, "epsilon_one_step": {}}
        for sigma in config.dp_noise:
            noisy = privatize(grad, clip, sigma, gen)
            x0_hat = attacks.invert_gradient(noisy, eps_hat, x_t, ab_t, scale, max_norm=clip, noise_multiplier=sigma)
            _attack(results, recs, score(f"split_inversion_dp{sigma:g}", x0_hat, x0), simulated=True, t=t, dp_noise=sigma)
            joint = combined_noise_multiplier(gradient_noise_multiplier(sigma), x_t_multiplier)
            report["split"]["epsilon_one_step"][f"{sigma:g}"] = epsilon_after(joint, 1.0, 1, config.delta)
        report["split"]["epsilon_one_step"]["x_t_only"] = epsilon_after(x_t_multiplier, 1.0, 1, config.delta)

    on_payloads = [r for r in results if not r["simulated"]]
    report["attacks"] = results
    report["best_actual"] = max(on_payloads, key=lambda r: r["psnr_db"]) if on_payloads else None
    return report, recs


def score_native(attack: str, x0_hat: torch.Tensor, x0: torch.Tensor) -> Reconstruction:
    """``score``, for images that may be too small for SSIM's window (SSIM NaN then)."""
    if min(x0.shape[-2:]) >= 6:
        return score(attack, x0_hat, x0)
    from collafuse.evaluation.audit.quality import mean_psnr, psnr

    x0_hat = x0_hat.detach().float().clamp(-1, 1)
    return Reconstruction(attack, x0_hat, mean_psnr(x0_hat, x0.float()), math.nan, psnr(x0_hat, x0.float()).tolist())
