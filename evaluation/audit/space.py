"""Where the audit scores its reconstructions: in pixels, or (a run with ``--autoencoder``) in latents decoded back to
pixels (issue 18).

Every attack works on what the server received. In latent space that is a noised *latent*: the attacks estimate the
client's latent z_0 with the same formulas, and the score decodes each estimate through the run's autoencoder and
compares it with the client's image x_0 in pixels (PSNR/SSIM), which is what a curious server holding the public
autoencoder would look at. The space is set for the duration of one client's audit (``scoring_in``) and read by the
attacks' clamp and by ``score``, so the attack library stays the pure functions it is.

- ``PixelSpace``: estimates are clamped to the data range [-1, 1] and scored against x_0.
- ``LatentSpace``: estimates are clamped to the largest |z| of the client's own latents (a prior at least as tight
  as an attacker's: it only helps the attacks), decoded, and scored against the pixels of the same images; each
  truth row is found among the client's latents by nearest match (the truth the audit passes is always one of them).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Protocol

import torch

from collafuse.common.autoencoder import LATENT_BOUND, FrozenAutoencoder
from collafuse.evaluation.audit.quality import mean_psnr, psnr, ssim


@dataclass
class Reconstruction:
    """An attack's best estimate of x_0 (in pixels) and how close it is."""

    attack: str
    x0_hat: torch.Tensor
    psnr_db: float
    ssim: float
    psnr_per_image: list[float]
    psnr_db_latent: float | None = None  # latent space: the estimate against z_0, before decoding

    def summary(self) -> dict[str, object]:
        out: dict[str, object] = {"attack": self.attack, "psnr_db": self.psnr_db, "ssim": self.ssim}
        if self.psnr_db_latent is not None:
            out["psnr_db_latent"] = self.psnr_db_latent
        return out


class AuditSpace(Protocol):
    """How estimates are bounded and brought to the pixels they are scored in."""

    name: str
    bound: float  # estimates are clamped to [-bound, bound]
    dp_bound: float  # the data's range per element that the client's DP accounting uses (client/dp.py)

    def to_pixels(self, x0_hat: torch.Tensor, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(estimate, truth) in pixels in [-1, 1], float, on the CPU."""
        ...


class PixelSpace:
    name = "pixels"
    bound = 1.0
    dp_bound = 1.0

    def to_pixels(self, x0_hat: torch.Tensor, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x0_hat.detach().float().clamp(-1, 1).cpu(), x0.detach().float().cpu()


class LatentSpace:
    """A client's latents z_0 = encode(x_0) and its pixels x_0, row for row, and the autoencoder that maps them."""

    name = "latents"
    dp_bound = LATENT_BOUND  # the client clamps its latents to it before they leave

    def __init__(self, autoencoder: FrozenAutoencoder, latents: torch.Tensor, pixels: torch.Tensor) -> None:
        if len(latents) != len(pixels) or not len(latents):
            raise ValueError(f"{len(latents)} latents for {len(pixels)} images: give one latent per image")
        self.autoencoder = autoencoder
        self.latents = latents.detach().float().cpu()
        self.pixels = pixels.detach().float().cpu()
        self.bound = float(self.latents.abs().max())

    def pixels_of(self, z0: torch.Tensor) -> torch.Tensor:
        """The pixels of each truth row (one of the client's latents, to float rounding)."""
        flat = self.latents.flatten(1).double()
        rows = z0.detach().cpu().flatten(1).double()
        distance = torch.cdist(rows, flat)
        nearest = distance.argmin(dim=1)
        worst = float(distance.gather(1, nearest[:, None]).max()) if len(rows) else 0.0
        if worst > 1e-3 * math.sqrt(flat.shape[1]):
            raise ValueError(f"a truth row is {worst:.3g} from every latent of the client: the audit's truth must be "
                             "the client's own encoded images")
        return self.pixels[nearest]

    def to_pixels(self, x0_hat: torch.Tensor, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z_hat = x0_hat.detach().float().clamp(-self.bound, self.bound)
        return self.autoencoder.decode_batched(z_hat).float(), self.pixels_of(x0)


PIXELS = PixelSpace()  # stateless: one instance serves every pixel audit
_SPACE: ContextVar[AuditSpace | None] = ContextVar("audit_space", default=None)


def current_space() -> AuditSpace:
    return _SPACE.get() or PIXELS


@contextmanager
def scoring_in(space: AuditSpace) -> Iterator[AuditSpace]:
    """Audit in ``space`` within the block (one client's payloads)."""
    token = _SPACE.set(space)
    try:
        yield space
    finally:
        _SPACE.reset(token)


def clamp_estimate(x: torch.Tensor) -> torch.Tensor:
    """An estimate of x_0 bounded to the data range of the current space."""
    bound = current_space().bound
    return x.clamp(-bound, bound)


def score(attack: str, x0_hat: torch.Tensor, x0: torch.Tensor) -> Reconstruction:
    """PSNR/SSIM of an estimate against the truth, in pixels (a latent estimate is decoded first)."""
    space = current_space()
    estimate, truth = space.to_pixels(x0_hat, x0)
    structure = float(ssim(estimate, truth).mean()) if min(truth.shape[-2:]) >= 6 else math.nan
    latent_db = None
    if isinstance(space, LatentSpace):
        bounded = x0_hat.detach().float().cpu().clamp(-space.bound, space.bound)
        # The latent figure uses the latents' own range (PSNR's data range), not the pixels' 2.
        mse = float((bounded.double() - x0.detach().cpu().double()).pow(2).mean())
        latent_db = 300.0 if mse <= 0 else min(300.0, 10 * math.log10((2 * space.bound) ** 2 / mse))
    return Reconstruction(attack, estimate, mean_psnr(estimate, truth), structure, psnr(estimate, truth).tolist(),
                          latent_db)
