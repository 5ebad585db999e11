"""Training a small ``AutoencoderKL`` on an image folder its operator may share (public data, never a client's
private folder): how the demo and the tests get an autoencoder offline (``collafuse-autoencoder train``).

Reconstruction loss (L1 + MSE) plus a small KL term; the scaling factor is set from the data, 1/std of the
latents' posterior means, as Stable Diffusion does, so that the scaled latents have unit std
(common/autoencoder.py::check_latent_scale). The reconstruction PSNR on held-out images is logged and written
to ``<out>/autoencoder_training.json`` beside the ``save_pretrained`` folder.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.models import AutoencoderKL
from pydantic import BaseModel, Field, field_validator
from tqdm.auto import tqdm

from collafuse.common.autoencoder import AutoencoderError
from collafuse.common.data import DataError, load_image_folder
from collafuse.common.files import write_json_atomic

log = logging.getLogger(__name__)

TRAINING_REPORT = "autoencoder_training.json"


class AutoencoderTrainOptions(BaseModel):
    """What ``collafuse-autoencoder train`` trains (its flags)."""

    steps: int = Field(500, ge=1, description="optimizer steps")
    image_size: int | None = Field(None, ge=4, le=1024, description="side the images are resized to (unset: their "
                                   "own, if they share one)")
    channels: int | None = Field(None, description="1 (grey) or 3 (RGB) (unset: 3 if any image has colour)")
    latent_channels: int = Field(4, ge=1, le=64, description="channels of the latent")
    block_out_channels: tuple[int, ...] = Field((32, 64, 64), min_length=1, max_length=5, description="encoder "
                                                "widths; the latent is 2**(levels-1) times smaller per side")
    batch_size: int = Field(32, ge=1, description="training minibatch")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate")
    kl_weight: float = Field(1e-4, ge=0, description="weight of the KL term (small: a near-deterministic autoencoder)")
    heldout_fraction: float = Field(0.1, gt=0, lt=1, description="share of the images held out for the PSNR")
    seed: int = Field(0, description="seed of the weights, the split and the minibatches")
    device: str = Field("cpu", description="torch device")

    @field_validator("channels")
    @classmethod
    def _channels(cls, value: int | None) -> int | None:
        if value not in (None, 1, 3):
            raise ValueError("channels must be 1 (grey) or 3 (RGB)")
        return value

    @field_validator("block_out_channels")
    @classmethod
    def _widths(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(w < 8 or w % 8 for w in value):
            raise ValueError("block_out_channels must be multiples of 8 (the group norms use 8 groups)")
        return value


@dataclass(frozen=True)
class AutoencoderTrainResult:
    out: Path
    images: int
    heldout: int
    steps: int
    seconds: float
    final_loss: float
    heldout_psnr: float  # dB, images in [-1, 1] (peak-to-peak 2)
    latent_std: float  # of the raw latents' posterior means over the training images
    scaling_factor: float
    image_shape: tuple[int, int, int]
    latent_shape: tuple[int, int, int]


def build_small_autoencoder(channels: int, options: AutoencoderTrainOptions) -> AutoencoderKL:
    levels = len(options.block_out_channels)
    return AutoencoderKL(
        in_channels=channels,
        out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=options.block_out_channels,
        layers_per_block=1,
        latent_channels=options.latent_channels,
        norm_num_groups=8,
        scaling_factor=1.0,
    )


def psnr(reconstructed: torch.Tensor, images: torch.Tensor) -> float:
    """Mean PSNR (dB) per image of images in [-1, 1] (peak-to-peak 2)."""
    mse = (reconstructed.clamp(-1, 1) - images).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return float((10 * torch.log10(4.0 / mse)).mean())


def _channels_of(data: Path) -> int:
    from collafuse.common.image_spec import infer_image_spec

    return infer_image_spec(data, ["tiny"]).channels


def train_autoencoder(data: Path, out: Path, options: AutoencoderTrainOptions | None = None, *,
                      show_progress: bool | None = None) -> AutoencoderTrainResult:
    """Train a small AutoencoderKL on the images under ``data`` and ``save_pretrained`` it to ``out``."""
    options = options or AutoencoderTrainOptions()
    channels = options.channels or _channels_of(data)
    dataset = load_image_folder(data, channels, options.image_size)
    images = dataset.images.float()
    n = len(images)
    if n < 2:
        raise DataError(f"{data} holds {n} image(s): the autoencoder needs at least two (one is held out)")
    side = images.shape[-1]
    factor = 2 ** (len(options.block_out_channels) - 1)
    if side % factor:
        raise AutoencoderError(f"image side {side} is not divisible by {factor} (2**(levels-1) of "
                               f"{len(options.block_out_channels)} block_out_channels): pass --image-size")
    generator = torch.Generator().manual_seed(options.seed)
    order = torch.randperm(n, generator=generator)
    heldout_n = max(1, round(n * options.heldout_fraction))
    heldout, train = images[order[:heldout_n]], images[order[heldout_n:]]
    torch.manual_seed(options.seed)
    device = torch.device(options.device)
    model = build_small_autoencoder(channels, options)
    model.to(device)  # type: ignore[arg-type]  # diffusers' typed wrapper of Module.to
    optimizer = torch.optim.Adam(model.parameters(), lr=options.lr)
    log.info("training an AutoencoderKL (%d parameters, %dx%dx%d -> %dx%dx%d) on %d image(s) from %s, %d held out, "
             "%d step(s)", sum(p.numel() for p in model.parameters()), channels, side, side,
             options.latent_channels, side // factor, side // factor, len(train), data, heldout_n, options.steps)
    started = time.perf_counter()
    loss_value = math.nan
    model.train()
    with tqdm(total=options.steps, desc="autoencoder", unit="step",
              disable=None if show_progress is None else not show_progress) as bar:
        for _ in range(options.steps):
            batch_index = torch.randint(len(train), (min(options.batch_size, len(train)),), generator=generator)
            x = train[batch_index].to(device)
            posterior = model.encode(x).latent_dist
            reconstructed = model.decode(posterior.sample()).sample
            kl = posterior.kl().mean() / x[0].numel()
            loss = F.l1_loss(reconstructed, x) + F.mse_loss(reconstructed, x) + options.kl_weight * kl
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise AutoencoderError(f"autoencoder training diverged (loss {loss_value}); lower --lr")
            bar.set_postfix(loss=f"{loss_value:.4f}")
            bar.update(1)
    seconds = time.perf_counter() - started
    model.eval()
    with torch.no_grad():
        means = torch.cat([model.encode(chunk.to(device)).latent_dist.mode().cpu() for chunk in train.split(64)])
        latent_std = float(means.std())
        recon = torch.cat([model.decode(model.encode(chunk.to(device)).latent_dist.mode()).sample.cpu()
                           for chunk in heldout.split(64)])
    heldout_psnr = psnr(recon, heldout)
    if not latent_std > 0:
        raise AutoencoderError("the trained autoencoder's latents are constant: train for more --steps")
    scaling_factor = 1.0 / latent_std
    model.register_to_config(scaling_factor=scaling_factor)
    out.mkdir(parents=True, exist_ok=True)
    model.to("cpu")  # type: ignore[arg-type]
    model.save_pretrained(out)
    result = AutoencoderTrainResult(
        out=out, images=n, heldout=heldout_n, steps=options.steps, seconds=seconds, final_loss=loss_value,
        heldout_psnr=heldout_psnr, latent_std=latent_std, scaling_factor=scaling_factor,
        image_shape=(channels, side, side), latent_shape=(options.latent_channels, side // factor, side // factor),
    )
    write_json_atomic(out / TRAINING_REPORT, {**asdict(result), "out": str(out), "data": str(data),
                                               "options": options.model_dump(mode="json")})
    log.info("autoencoder trained in %.1fs: held-out reconstruction PSNR %.2f dB over %d image(s), latent std %.4g "
             "-> scaling factor %.4g; saved to %s", seconds, heldout_psnr, heldout_n, latent_std, scaling_factor, out)
    return result
