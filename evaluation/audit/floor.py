"""The client's own noise floor, as the audit holds payloads against it (client/noise_floor.py, docs/design.md §7).

A payload is checked against what the *client* allows, never against the schedule the server served: a server
that serves tiny betas makes "cut 200" an almost clean image, and a payload at the served level is then honest to
the server's schedule and far below the client's floor. The floor per native pixel is the client's
(``client_floor``: alpha_bar at its cut under its reference schedule ``--reference-*``, or
``--max-release-alpha-bar``, tightened by the level it pinned); a served spec with look gain g (replicated
channels, upsampled pixels: common/image_spec.py::look_gain) shows each native pixel g times, so an element may
carry at most ``per_element(floor, g)`` (what ``release_floor`` lets the client send).

With the client's workdir (its ledger) the audit reads the floor settings the client joined with; without it,
the settings given to ``collafuse-audit`` (``--reference-*``, ``--max-release-alpha-bar``; by default the
client's defaults: the standard DDPM linear schedule, T = 1000).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from collafuse.client.ledger import LEDGER_FILE, FloorConfig, Ledger
from collafuse.client.noise_floor import (
    client_floor,
    describe_schedule,
    per_element,
    reference_floor,
    replicated_gain,
)
from collafuse.common.image_spec import look_gain

Shape = tuple[int, int, int]


@dataclass(frozen=True)
class ClientFloor:
    """The most alpha_bar the client allows per native pixel at its cut, the look gain of the served spec, and the
    most alpha_bar an element of a payload may then have."""

    alpha_bar: float  # per native pixel
    origin: str
    gain: float
    gain_origin: str

    @property
    def per_element(self) -> float:
        return per_element(self.alpha_bar, self.gain)

    def native_level(self, alpha_bar: float | torch.Tensor) -> torch.Tensor:
        """A payload's level per element -> what it tells per native pixel (g looks)."""
        ab = torch.as_tensor(alpha_bar, dtype=torch.float64)
        if self.gain <= 1.0:
            return ab
        return torch.where(ab >= 1.0, ab, self.gain * ab / (1.0 - ab + self.gain * ab))

    def to_json(self) -> dict[str, Any]:
        return {"alpha_bar_per_native_pixel": self.alpha_bar, "origin": self.origin, "look_gain": self.gain,
                "look_gain_origin": self.gain_origin, "alpha_bar_per_element": self.per_element}


def served_gain(native_shapes: Sequence[Shape], served: Shape, served_images: torch.Tensor | None = None) -> tuple[float, str]:
    """The look gain of the served spec over these native shapes (the largest), at least 3 when grey images leave as
    RGB (client/noise_floor.py::release_look_gain)."""
    gain, origin = 1.0, "the served spec is no larger than the client's images"
    for shape in sorted(set(native_shapes)):
        g = look_gain(shape, served)
        if g > gain:
            gain, origin = g, f"native {shape[0]}x{shape[1]}x{shape[2]} served as {served[0]}x{served[1]}x{served[2]}"
    if served_images is not None and replicated_gain(served_images) > gain:
        gain, origin = replicated_gain(served_images), "grey images sent as RGB (three equal channels)"
    return gain, origin


def client_floor_at(client_dir: Path | None, cut: int, served: Shape, gain: float, gain_origin: str,
                    fallback: FloorConfig) -> ClientFloor:
    """The client's floor at ``cut``: from its ledger when ``client_dir`` holds one, else from ``fallback``."""
    recorded = None
    if client_dir is not None and (Path(client_dir) / LEDGER_FILE).is_file():
        with Ledger(Path(client_dir)) as ledger:
            floor = client_floor(ledger, cut)
            alpha_bar, origin = floor.alpha_bar, f"{floor.origin} (the client's ledger)"
            recorded = ledger.look_gain(served)
    elif fallback.max_alpha_bar is not None:
        alpha_bar, origin = fallback.max_alpha_bar, "--max-release-alpha-bar given to the audit"
    else:
        alpha_bar = reference_floor(fallback.reference, cut)
        origin = f"cut {cut} under the reference schedule {describe_schedule(fallback.reference)} (no ledger)"
    if recorded is not None and recorded > gain:
        gain, gain_origin = recorded, "the look gain the client recorded when it joined"
    return ClientFloor(alpha_bar, origin, gain, gain_origin)
