"""A shared, frozen autoencoder for CollaFuse in latent space (issue 18).

``load_autoencoder(path)`` opens any diffusers autoencoder folder offline: ``AutoencoderKL`` (Stable Diffusion's
pipeline layout, with the VAE in ``<path>/vae/``, included), ``AutoencoderTiny`` (TAESD) or ``VQModel``; the class
comes from the folder's ``config.json`` (``_class_name``). The model is put in eval mode and frozen, and
``FrozenAutoencoder`` maps images in [-1, 1] to *scaled* latents, ``z = (raw - shift_factor) * scaling_factor``,
and back. Encoding is deterministic (the posterior mean of a KL autoencoder, the unquantised latent of a VQ one).

The diffusion (and the client's noise floor) works on the scaled latents. The floor is a noise level per element,
so an autoencoder whose latents are scaled up would shrink the noise relative to the signal it hides:
``check_latent_scale`` refuses latents whose std is far from unit scale (``LATENT_STD_RANGE``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers.models import AutoencoderKL, AutoencoderTiny, VQModel  # not `diffusers`: see common/models.py

log = logging.getLogger(__name__)

# The autoencoder classes CollaFuse can run through, by the ``_class_name`` of their config.json.
AUTOENCODER_CLASSES: dict[str, type[torch.nn.Module]] = {
    "AutoencoderKL": AutoencoderKL,
    "AutoencoderTiny": AutoencoderTiny,
    "VQModel": VQModel,
}
# Where Stable Diffusion's pipeline layout keeps its VAE.
PIPELINE_VAE_FOLDER = "vae"
# The std of the scaled latents of a client's data must lie in this range (unit scale, within a factor of 2).
LATENT_STD_RANGE: tuple[float, float] = (0.5, 2.0)
# The client clamps its scaled latents to [-LATENT_BOUND, LATENT_BOUND] per element before anything leaves: DP
# accounting needs the data's range (pixels lie in [-1, 1]; an encoder's output has no such bound of its own). At unit
# std, 4 keeps all but a Gaussian's 4-sigma tail; the sensitivities in client/dp.py grow by this factor.
LATENT_BOUND = 4.0


def bounded_latents(latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents clamped to +-LATENT_BOUND: what a client releases from (and the audit takes as the truth)."""
    return latents.clamp(-LATENT_BOUND, LATENT_BOUND)


def data_bound(latent: bool) -> float:
    """The range per element of what the diffusion runs on: pixels in [-1, 1], or clamped scaled latents."""
    return LATENT_BOUND if latent else 1.0


class AutoencoderError(ValueError):
    """An autoencoder cannot be used; the message says what is wrong and what to do."""


@dataclass(frozen=True)
class AutoencoderIdentity:
    """What both sides must share for latents to mean the same thing: the class, its config and its weights."""

    class_name: str
    config_json: str  # the model's config, canonical JSON (sorted keys, no diffusers bookkeeping)
    weights_sha256: str  # SHA-256 over every parameter and buffer, in sorted name order

    def digest(self) -> str:
        """SHA-256 over the whole identity: what goes into the fingerprint both sides recompute."""
        payload = json.dumps({"class": self.class_name, "config": self.config_json, "weights": self.weights_sha256},
                             sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()

    def describe(self) -> str:
        return f"{self.class_name} (weights {self.weights_sha256[:12]}…, identity {self.digest()[:12]}…)"


def latent_fingerprint(pixel_fingerprint: str, identity: AutoencoderIdentity | None) -> str:
    """The fingerprint both sides recompute (common/schedule.py::fingerprint over the served spec) with the
    autoencoder's identity folded in; without an autoencoder (pixel space) it is unchanged."""
    if identity is None:
        return pixel_fingerprint
    payload = json.dumps({"fingerprint": pixel_fingerprint, "autoencoder": identity.digest()}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def identity_mismatch(own: AutoencoderIdentity | None, served: AutoencoderIdentity | None) -> str | None:
    """Why a client with autoencoder ``own`` cannot join a server announcing ``served`` (None: they agree)."""
    if own == served:
        return None
    if served is None:
        return (f"the server runs in pixel space (no --autoencoder), but this client has --autoencoder "
                f"{own.describe() if own else ''}: drop --autoencoder, or join a server started with it")
    if own is None:
        return (f"the server runs in latent space through the autoencoder {served.describe()}, but this client has "
                "no --autoencoder: pass the same autoencoder folder as --autoencoder")
    parts = []
    if own.class_name != served.class_name:
        parts.append(f"class {served.class_name} vs yours {own.class_name}")
    if own.config_json != served.config_json:
        parts.append("another config")
    if own.weights_sha256 != served.weights_sha256:
        parts.append(f"weights {served.weights_sha256[:12]}… vs yours {own.weights_sha256[:12]}…")
    return (f"the server's autoencoder differs from this client's ({'; '.join(parts)}): latents of different "
            "autoencoders mean different images, so the server's model cannot compose with yours. Pass the "
            "server's autoencoder folder as --autoencoder")


def weights_sha256(model: torch.nn.Module) -> str:
    """Content hash of a model's weights: name, dtype, shape and bytes of every tensor, in sorted name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        data = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}|".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def _canonical_config(config: dict[str, Any]) -> str:
    kept = {k: v for k, v in config.items() if not k.startswith("_")}
    return json.dumps(kept, sort_keys=True, default=str)


def autoencoder_folder(path: Path) -> Path:
    """The folder that holds the autoencoder's config.json: ``path`` itself or its pipeline ``vae/`` subfolder."""
    path = Path(path)
    if not path.exists():
        raise AutoencoderError(f"--autoencoder {path} does not exist: pass a diffusers autoencoder folder "
                               "(config.json + weights), e.g. one written by `collafuse-autoencoder train`")
    if (path / "config.json").is_file():
        return path
    if (path / PIPELINE_VAE_FOLDER / "config.json").is_file():
        return path / PIPELINE_VAE_FOLDER
    raise AutoencoderError(f"--autoencoder {path} holds no config.json (nor {PIPELINE_VAE_FOLDER}/config.json, "
                           "Stable Diffusion's pipeline layout): pass a diffusers autoencoder folder")


def _class_name(folder: Path) -> str:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AutoencoderError(f"cannot read {folder / 'config.json'}: {exc}") from exc
    name = config.get("_class_name") if isinstance(config, dict) else None
    if name not in AUTOENCODER_CLASSES:
        raise AutoencoderError(f"{folder / 'config.json'} names class {name!r}; CollaFuse runs through "
                               f"{sorted(AUTOENCODER_CLASSES)} (a diffusers autoencoder folder)")
    return str(name)


class FrozenAutoencoder:
    """A frozen diffusers autoencoder: images in [-1, 1] <-> scaled latents."""

    def __init__(self, model: torch.nn.Module, class_name: str, source: Path | None = None) -> None:
        if class_name not in AUTOENCODER_CLASSES:
            raise AutoencoderError(f"unsupported autoencoder class {class_name!r}; use one of {sorted(AUTOENCODER_CLASSES)}")
        self.model = model.eval().requires_grad_(False)
        self.class_name = class_name
        self.source = source
        loaded: Any = model  # a diffusers ModelMixin: its config is a FrozenDict
        self.config: dict[str, Any] = dict(loaded.config)
        scaling = self.config.get("scaling_factor")
        self.scaling_factor = float(scaling) if scaling is not None else 1.0
        if not self.scaling_factor > 0:
            raise AutoencoderError(f"autoencoder {source}: scaling_factor must be positive, got {scaling}")
        shift = self.config.get("shift_factor")
        self.shift_factor = float(shift) if shift is not None else 0.0
        self.in_channels = int(self.config.get("in_channels", 3))
        self._identity: AutoencoderIdentity | None = None

    # ---- what the model is -----------------------------------------------------------------------------------

    @property
    def identity(self) -> AutoencoderIdentity:
        if self._identity is None:
            self._identity = AutoencoderIdentity(self.class_name, _canonical_config(self.config),
                                                 weights_sha256(self.model))
        return self._identity

    @property
    def downsample(self) -> int:
        """How many image pixels one latent pixel spans per side."""
        if self.class_name == "AutoencoderTiny":
            levels = len(self.config["encoder_block_out_channels"])
        else:
            levels = len(self.config["block_out_channels"])
        return int(2 ** (levels - 1))

    @property
    def latent_channels(self) -> int:
        if self.class_name == "VQModel":
            return int(self.config.get("vq_embed_dim") or self.config["latent_channels"])
        return int(self.config["latent_channels"])

    def latent_shape(self, image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """(C, H, W) of the latent of an image of shape (C, H, W)."""
        channels, height, width = image_shape
        if channels != self.in_channels:
            raise AutoencoderError(f"the autoencoder takes {self.in_channels}-channel images, not {channels}: serve "
                                   f"--channels {self.in_channels} or use an autoencoder made for {channels} channel(s)")
        factor = self.downsample
        if height % factor or width % factor:
            raise AutoencoderError(f"image side {height}x{width} is not divisible by the autoencoder's downsampling "
                                   f"factor {factor}: pick an --image-size that is a multiple of {factor}")
        return (self.latent_channels, height // factor, width // factor)

    def to(self, device: torch.device | str) -> FrozenAutoencoder:
        self.model.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ---- the maps --------------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (N, C, H, W) in [-1, 1] -> scaled latents (deterministic)."""
        if images.ndim != 4:
            raise AutoencoderError(f"encode takes a batch (N, C, H, W), got shape {tuple(images.shape)}")
        self.latent_shape(tuple(images.shape[1:]))  # type: ignore[arg-type]  # checks channels and divisibility
        x = images.to(self.device, torch.float32)
        model: Any = self.model
        out = model.encode(x)
        raw = out.latent_dist.mode() if self.class_name == "AutoencoderKL" else out.latents
        return (raw - self.shift_factor) * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (N, C, h, w) -> images in [-1, 1]."""
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise AutoencoderError(f"decode takes latents (N, {self.latent_channels}, h, w), got shape "
                                   f"{tuple(latents.shape)}")
        raw = latents.to(self.device, torch.float32) / self.scaling_factor + self.shift_factor
        model: Any = self.model
        return model.decode(raw).sample.clamp(-1, 1)

    def encode_batched(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """``encode`` in chunks of ``batch_size``, on the CPU."""
        if not len(images):
            return torch.empty(0, *self.latent_shape(tuple(images.shape[1:])))  # type: ignore[arg-type]
        return torch.cat([self.encode(chunk).cpu() for chunk in images.split(batch_size)])

    def decode_batched(self, latents: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        return torch.cat([self.decode(chunk).cpu() for chunk in latents.split(batch_size)])


def load_autoencoder(path: Path, device: torch.device | str = "cpu") -> FrozenAutoencoder:
    """Load a diffusers autoencoder folder offline (never a hub download), frozen and in eval mode."""
    folder = autoencoder_folder(Path(path))
    name = _class_name(folder)
    cls: Any = AUTOENCODER_CLASSES[name]
    try:
        model = cls.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise AutoencoderError(f"cannot load the {name} in {folder}: {exc}") from exc
    ae = FrozenAutoencoder(model, name, source=Path(path)).to(device)
    log.info("loaded autoencoder %s from %s (scaling factor %.5g, shift %.5g)", ae.identity.describe(), folder,
             ae.scaling_factor, ae.shift_factor)
    return ae


def check_latent_scale(latents: torch.Tensor, source: str = "the autoencoder") -> float:
    """The std of the scaled latents of a client's data; refuses a std outside ``LATENT_STD_RANGE``.

    The noise floor is a noise level per element: latents scaled up by a factor k carry k times the signal under the
    same noise, so the floor's protection shrinks by k (and scaled down, the data drowns). Returns the std.
    """
    if latents.numel() < 2:
        raise AutoencoderError("check_latent_scale needs at least two latent values")
    std = float(latents.detach().float().std())
    low, high = LATENT_STD_RANGE
    if not low <= std <= high:  # NaN too
        raise AutoencoderError(
            f"the latents of {source} have std {std:.4g}, outside [{low}, {high}] (unit scale): the noise floor is a "
            "noise level per element, so latents scaled up shrink the noise relative to the data it hides (and scaled "
            "down, the data drowns in it). Use an autoencoder whose scaling_factor makes its latents of this data about "
            "unit std (collafuse-autoencoder train sets it to 1/std of the latents, as Stable Diffusion does)"
        )
    return std
