"""The client owns its noise floor (docs/design.md §7): a server-sent schedule is an input to check, never an order.

A cut counts steps; what protects an image is the noise level at that step, alpha_bar_cut
(a release is sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps). A server that sends T = 10,000
or tiny betas makes "cut 200" an almost clean image. So the client keeps, in its ledger,
the schedule it first accepted (trust on first use) and its *floor*: the largest alpha_bar a
release may have. The floor is ``--max-release-alpha-bar`` when given, else alpha_bar at
``--cut`` under the first accepted schedule. Every join and every release checks the
schedule in force against it; a schedule or cut that would release with less noise is
refused, naming what the server asked for.
"""

from __future__ import annotations

import logging

from collafuse.client.errors import LedgerRefusal
from collafuse.client.ledger import Ledger, ReleaseLevel
from collafuse.common.schedule import ScheduleConfig

log = logging.getLogger(__name__)


class NoiseFloorRefusal(LedgerRefusal):
    """A schedule or cut would release with less noise than the client's floor."""


def describe_schedule(schedule: ScheduleConfig) -> str:
    return (
        f"T={schedule.num_train_timesteps}, {schedule.beta_schedule} betas "
        f"{schedule.beta_start:g}..{schedule.beta_end:g}"
    )


def check_schedule(
    ledger: Ledger, schedule: ScheduleConfig, cut: int, server: str, max_alpha_bar: float | None = None
) -> ReleaseLevel:
    """The level a release at ``cut`` would have under ``schedule``, once it is checked against the floor.

    The first call pins ``schedule`` and the floor (``max_alpha_bar``, else alpha_bar at ``cut``);
    ``max_alpha_bar`` given later replaces the floor (the user's explicit word, logged in the ledger).
    Raises ``NoiseFloorRefusal`` when alpha_bar at ``cut`` exceeds the floor; nothing is changed then.
    """
    level = ReleaseLevel.of(schedule, cut)
    if cut >= schedule.num_train_timesteps:
        return level  # the independent client model releases nothing: no floor to check or pin
    pinned = ledger.pinned_schedule()
    if max_alpha_bar is not None:
        floor, origin = max_alpha_bar, "--max-release-alpha-bar"
    elif pinned is not None:
        floor, origin = pinned.floor_alpha_bar, pinned.floor_origin
    else:
        floor, origin = level.alpha_bar, f"cut {cut} under the first schedule accepted ({describe_schedule(schedule)})"
    if level.alpha_bar > floor:
        asked = "server schedule" if pinned is None or pinned.fingerprint != schedule.config_fingerprint() else "schedule"
        was = ""
        if pinned is not None and pinned.fingerprint != schedule.config_fingerprint():
            first = ScheduleConfig.from_wire(pinned.config_json, pinned.fingerprint)
            was = f" (the schedule first accepted was {describe_schedule(first)})"
        raise NoiseFloorRefusal(
            f"{asked} {describe_schedule(schedule)} gives alpha_bar {level.alpha_bar:.4g} (noise std "
            f"{(1 - level.alpha_bar) ** 0.5:.3f}) at cut {cut}, your floor is {floor:.4g} (noise std "
            f"{(1 - floor) ** 0.5:.3f}, from {origin}){was}: refusing to release with less noise. Use a larger "
            "--cut, or state another floor with --max-release-alpha-bar if you accept less noise."
        )
    if pinned is None:
        ledger.pin_schedule(schedule, floor, origin, server)
        log.info("pinned the schedule %s and the noise floor alpha_bar <= %.4g (%s); releases below it are refused "
                 "(state your own with --max-release-alpha-bar)", describe_schedule(schedule), floor, origin)
    else:
        if max_alpha_bar is not None and max_alpha_bar != pinned.floor_alpha_bar:
            ledger.set_floor(max_alpha_bar, origin, server)
            log.warning("noise floor changed from alpha_bar %.4g to %.4g (--max-release-alpha-bar)",
                        pinned.floor_alpha_bar, max_alpha_bar)
        if pinned.fingerprint != schedule.config_fingerprint():
            detail = f"{describe_schedule(schedule)}, alpha_bar {level.alpha_bar:.4g} at cut {cut} <= floor {floor:.4g}"
            log.warning("the server's schedule (%s) differs from the one first accepted; it keeps releases at or above "
                        "your noise floor, so it is used", detail)
            ledger.record_schedule_change(schedule, server, detail)
    return level
