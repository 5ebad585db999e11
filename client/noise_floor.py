"""The client owns its noise floor (docs/design.md §7): a server-sent schedule is an input to check, never an order.

A cut counts steps; what protects an image is the noise level at that step, alpha_bar_cut
(a release is sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps). A server that sends T = 10,000
or tiny betas makes "cut 200" an almost clean image. So the client's floor, the largest
alpha_bar a release may have, is the client's own from its first contact on:

- alpha_bar at ``--cut`` under the client's *reference schedule* (the standard DDPM linear schedule,
  T = 1000, betas 1e-4..0.02, unless its operator configures another with ``--reference-*``);
- or ``--max-release-alpha-bar``, the user's explicit word, which replaces it for the run it is given in;
- tightened, never loosened, by the level of the first schedule the client accepted (pinned in the ledger):
  a client that released at one noise level does not later release the same data with less.

The floor is per *native pixel*. A server that serves a larger spec than the data (grey replicated
into RGB, upsampled pixels) gives every native pixel several looks with independent noise; the
served spec's look gain g (client/local_data.py::LookGain) turns a release at alpha_bar into
g * alpha_bar / (1 - alpha_bar + g * alpha_bar) per native pixel (the signal-to-noise ratio times g),
and that is what is held against the floor. Every join and every release checks the schedule and spec
in force; one that would release with less noise is refused with a message naming both levels and
the flag that would accept the server's level. Nothing is trusted on first use.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from pydantic import ValidationError

from collafuse.client.errors import LedgerRefusal
from collafuse.client.ledger import FloorConfig, Ledger, ReleaseLevel
from collafuse.client.local_data import LookGain
from collafuse.common.config import ClientSettings
from collafuse.common.schedule import ScheduleConfig, ScheduleError
from collafuse.common.settings import ConfigError, describe_validation_error

log = logging.getLogger(__name__)

# The standard DDPM linear schedule (Ho et al. 2020): T = 1000, betas 1e-4..0.02.
DEFAULT_REFERENCE = ScheduleConfig()


class NoiseFloorRefusal(LedgerRefusal):
    """A schedule, cut or image spec would release with less noise than the client's floor."""


def describe_schedule(schedule: ScheduleConfig) -> str:
    return (
        f"T={schedule.num_train_timesteps}, {schedule.beta_schedule} betas "
        f"{schedule.beta_start:g}..{schedule.beta_end:g}"
    )


def reference_schedule(settings: ClientSettings) -> ScheduleConfig:
    """The client's reference schedule from its settings (``--reference-*``); ConfigError when unusable."""
    try:
        return ScheduleConfig(
            num_train_timesteps=settings.reference_timesteps, beta_start=settings.reference_beta_start,
            beta_end=settings.reference_beta_end, beta_schedule=settings.reference_beta_schedule,
        )
    except ValidationError as exc:
        raise ConfigError(f"--reference-*: the reference schedule is unusable: {describe_validation_error(exc)}") from None
    except (ValueError, ScheduleError) as exc:
        raise ConfigError(f"--reference-*: the reference schedule is unusable: {exc}") from None


def floor_config(settings: ClientSettings) -> FloorConfig:
    return FloorConfig(reference_schedule(settings), settings.max_release_alpha_bar)


# ---- levels per native pixel ------------------------------------------------------------------------------------


def per_native_pixel(alpha_bar: float, gain: float) -> float:
    """The alpha_bar of one look that tells as much as ``gain`` looks at ``alpha_bar`` (signal-to-noise ratio
    alpha_bar / (1 - alpha_bar) times the gain)."""
    if gain <= 1.0 or alpha_bar >= 1.0:
        return alpha_bar
    return gain * alpha_bar / (1.0 - alpha_bar + gain * alpha_bar)


def per_element(floor: float, gain: float) -> float:
    """The largest alpha_bar per served element at which ``gain`` looks tell no more than one at ``floor``."""
    if gain <= 1.0 or floor >= 1.0:
        return floor
    return floor / (floor + gain * (1.0 - floor))


def noise_std(alpha_bar: float) -> float:
    return math.sqrt(max(0.0, 1.0 - alpha_bar))


def flag_value(alpha_bar: float) -> str:
    """``alpha_bar`` written for --max-release-alpha-bar: rounded up (its noise 1 - alpha_bar down to 3 significant
    digits), so that the level it names is accepted."""
    noise = 1.0 - alpha_bar
    if noise <= 0:
        return "1"
    exponent = math.floor(math.log10(noise)) - 2
    kept = math.floor(noise / 10.0**exponent) * 10.0**exponent
    return f"{1.0 - kept:.{max(0, -exponent)}f}"


@dataclass(frozen=True)
class Floor:
    """The most alpha_bar a release may have per native pixel, and where that number comes from."""

    alpha_bar: float
    origin: str

    def describe(self) -> str:
        return f"{self.alpha_bar:.4g} (noise std {noise_std(self.alpha_bar):.3f}, from {self.origin})"


def reference_floor(reference: ScheduleConfig, cut: int) -> float:
    """alpha_bar at ``cut`` under the reference schedule (its last step for a cut beyond its T)."""
    return float(reference.alphas_cumprod()[min(cut, reference.num_train_timesteps)])


def client_floor(ledger: Ledger, cut: int, config: FloorConfig | None = None) -> Floor:
    """The client's floor at ``cut``: --max-release-alpha-bar when stated, else alpha_bar at ``cut`` under the
    reference schedule, tightened by the pinned level of the first schedule accepted (never loosened)."""
    config = config or ledger.floor_config()
    if config.max_alpha_bar is not None:
        return Floor(config.max_alpha_bar, "--max-release-alpha-bar")
    floor = Floor(reference_floor(config.reference, cut),
                  f"cut {cut} under your reference schedule, {describe_schedule(config.reference)}")
    pinned = ledger.pinned_schedule()
    if pinned is not None and math.isfinite(pinned.floor_alpha_bar) and pinned.floor_alpha_bar < floor.alpha_bar:
        return Floor(pinned.floor_alpha_bar, pinned.floor_origin)
    return floor


def client_floors(ledger: Ledger, last_cut: int, config: FloorConfig | None = None) -> np.ndarray:
    """``client_floor(ledger, c, config).alpha_bar`` for every cut c in [0, last_cut], at once."""
    config = config or ledger.floor_config()
    if config.max_alpha_bar is not None:
        return np.full(last_cut + 1, config.max_alpha_bar)
    reference = config.reference.alphas_cumprod().numpy()
    floors = reference[np.minimum(np.arange(last_cut + 1), config.reference.num_train_timesteps)]
    pinned = ledger.pinned_schedule()
    if pinned is not None and math.isfinite(pinned.floor_alpha_bar):
        floors = np.minimum(floors, pinned.floor_alpha_bar)
    return floors


def _gain(look: LookGain | float | None, ledger: Ledger) -> tuple[float, str]:
    """The look gain and a sentence about it (empty for 1)."""
    if isinstance(look, LookGain):
        return look.gain, (look.describe() if look.inflated else "")
    gain = float(look) if look is not None else (ledger.look_gain() or 1.0)
    return gain, (f"the served spec shows each native pixel up to {gain:.3g} times" if gain > 1.0 else "")


def replicated_gain(images: torch.Tensor) -> float:
    """3 when RGB images carry grey (all three channels equal: each pixel is sent three times), else 1."""
    if images.ndim != 4 or images.shape[1] != 3 or len(images) == 0:
        return 1.0
    same = (images[:, 0] == images[:, 1]) & (images[:, 1] == images[:, 2])
    return 3.0 if bool(same.flatten(1).all(dim=1).any()) else 1.0


def release_look_gain(ledger: Ledger, images: torch.Tensor) -> float:
    """The look gain of a release of ``images`` (at the served spec): the gain recorded when the client joined with
    this spec (from its data's native shapes), and at least 3 when grey images are about to leave as RGB."""
    return max(ledger.look_gain(tuple(images.shape[1:])) or 1.0, replicated_gain(images))


def _least_cut(schedule: ScheduleConfig, cut: int, gain: float, floors: np.ndarray | float) -> int | None:
    """The smallest cut above ``cut`` whose level under ``schedule`` meets the floor (one floor, or one per cut)."""
    ab = schedule.alphas_cumprod().numpy()
    cuts = np.arange(len(ab))
    limit = np.broadcast_to(np.asarray(floors, dtype=np.float64), ab.shape)
    ok = (cuts > cut) & (cuts < schedule.num_train_timesteps)
    seen = ab if gain <= 1.0 else gain * ab / (1.0 - ab + gain * ab)
    ok &= seen <= limit
    found = np.nonzero(ok)[0]
    return int(found[0]) if len(found) else None


def _advice(ledger: Ledger, schedule: ScheduleConfig, cut: int, gain: float, floor: Floor, config: FloorConfig,
            seen: float) -> str:
    """What the user can do: a cut of this schedule that meets the floor, or the flag that accepts the level."""
    per_cut = client_floors(ledger, schedule.num_train_timesteps, config)
    options = []
    least = _least_cut(schedule, cut, gain, per_cut)
    if least is not None:
        options.append(f"use --cut {least} or more (the least cut of this schedule that meets your floor)")
    else:
        fixed = _least_cut(schedule, cut, gain, floor.alpha_bar)
        if fixed is not None:
            options.append(
                f"keep this floor and release with more noise: --cut {fixed} --max-release-alpha-bar "
                f"{flag_value(floor.alpha_bar)} (your floor as it is now, stated: unstated, it follows the cut)"
            )
        else:
            options.append("no cut of this schedule meets your floor")
    options.append(
        f"if you accept alpha_bar {seen:.4g} (noise std {noise_std(seen):.4f}) per native pixel, say so with "
        f"--max-release-alpha-bar {flag_value(seen)}"
    )
    return "; ".join(options)


def check_schedule(
    ledger: Ledger,
    schedule: ScheduleConfig,
    cut: int,
    server: str,
    max_alpha_bar: float | None = None,
    *,
    look: LookGain | float | None = None,
) -> ReleaseLevel:
    """The level a release at ``cut`` would have under ``schedule``, once it is checked against the client's floor.

    ``max_alpha_bar`` (when given) replaces the ledger's stated floor for this check; ``look`` is the served spec's
    look gain (default: the one recorded when the client joined). Raises ``NoiseFloorRefusal`` when the level per
    native pixel exceeds the floor; nothing is changed then. The first accepted schedule is pinned (for the
    record, and as a floor that may only tighten the client's own).
    """
    level = ReleaseLevel.of(schedule, cut)
    if cut >= schedule.num_train_timesteps:
        return level  # the independent client model releases nothing: no floor to check or pin
    config = ledger.floor_config()
    if max_alpha_bar is not None:
        config = FloorConfig(config.reference, max_alpha_bar)
    floor = client_floor(ledger, cut, config)
    gain, spec = _gain(look, ledger)
    seen = per_native_pixel(level.alpha_bar, gain)
    pinned = ledger.pinned_schedule()
    changed = pinned is not None and pinned.digest != schedule.config_digest()
    if seen > floor.alpha_bar:
        asked = "schedule" if pinned is not None and not changed else "server schedule"
        was = ""
        if pinned is not None and changed:
            first = ScheduleConfig.from_wire(pinned.config_json, pinned.digest)
            was = f" (the schedule first accepted was {describe_schedule(first)})"
        native = f"; {spec}, so per native pixel that is alpha_bar {seen:.4g} (noise std {noise_std(seen):.4f})" if spec else ""
        raise NoiseFloorRefusal(
            f"{asked} {describe_schedule(schedule)} gives alpha_bar {level.alpha_bar:.4g} (noise std "
            f"{noise_std(level.alpha_bar):.4f}) at cut {cut}{native}, your floor is {floor.describe()}{was}: refusing "
            f"to release with less noise. To go on: {_advice(ledger, schedule, cut, gain, floor, config, seen)}."
        )
    if pinned is None:
        origin = f"cut {cut} under the first schedule accepted ({describe_schedule(schedule)})"
        ledger.pin_schedule(schedule, seen, origin, server)
        log.info("noise floor alpha_bar <= %.4g per native pixel (%s); the server's schedule (%s) gives %.4g at cut "
                 "%d%s", floor.alpha_bar, floor.origin, describe_schedule(schedule), level.alpha_bar, cut,
                 f", {seen:.4g} per native pixel ({spec})" if spec else "")
    elif changed:
        detail = f"{describe_schedule(schedule)}, alpha_bar {level.alpha_bar:.4g} at cut {cut} <= floor {floor.alpha_bar:.4g}"
        log.warning("the server's schedule (%s) differs from the one first accepted; it keeps releases at or above "
                    "your noise floor, so it is used", detail)
        ledger.record_schedule_change(schedule, server, detail)
    return level


def release_floor(ledger: Ledger, schedule: ScheduleConfig, cut: int, server: str, images: torch.Tensor) -> float:
    """The schedule checked for a send of ``images`` (at the served spec), then the most alpha_bar one of its elements
    may have: the client's floor per native pixel, lowered by the served spec's look gain."""
    gain = release_look_gain(ledger, images)
    check_schedule(ledger, schedule, cut, server, look=gain)
    return per_element(client_floor(ledger, cut).alpha_bar, gain)
