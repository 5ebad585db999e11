"""Starting the local model from the shared model's weights (``--init-from-server``): fetch, check, load.

The server's bytes are an input, never an order: the client builds the named preset from its own table
(common/models.py), bounds the download by that model's size before keeping a byte, checks the SHA-256 the header
announced, reads the file as safetensors (tensors only: loading runs no code) and accepts only the exact keys,
shapes and float32 dtype of the model it built, every value finite. Anything else is a ClientError that says what
was wrong; nothing of the client's own state is touched until the weights passed every check.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import cast

import safetensors
import safetensors.torch
import torch
from diffusers.models import UNet2DModel

from collafuse.client.connection import ServerConnection
from collafuse.client.errors import ClientError
from collafuse.common.models import PRESETS, build_unet
from collafuse.v1 import collafuse_pb2

log = logging.getLogger(__name__)

# The safetensors file's JSON header beside the tensors' bytes (names, shapes, offsets): generous for any preset.
HEADER_ALLOWANCE = 1 << 20
RUN_WITHOUT = "run the client without --init-from-server to train its local model from scratch"


@dataclass(frozen=True)
class InitialWeights:
    """The shared model's weights, checked and loaded into a model of the client's own building."""

    model: UNet2DModel
    preset: str
    step: int
    sha256: str


def _tensor_bytes(model: torch.nn.Module) -> int:
    return sum(v.numel() * v.element_size() for v in model.state_dict().values())


def fetch_initial_weights(connection: ServerConnection, client_id: str, image_shape: tuple[int, int, int],
                          num_classes: int) -> InitialWeights:
    """FetchModel, checked: the model the local training starts from."""
    built: dict[str, UNet2DModel] = {}

    def max_bytes(header: collafuse_pb2.ModelHeader) -> int:
        if header.preset not in PRESETS:
            raise ClientError(f"the server's shared model is of preset {header.preset[:64]!r}, which this client "
                              f"does not know (it builds one of {sorted(PRESETS)}); {RUN_WITHOUT}")
        try:
            built["model"] = build_unet(header.preset, image_shape, num_classes)
        except ValueError as exc:
            raise ClientError(f"the server's shared model preset {header.preset!r} does not fit this client's "
                              f"{image_shape} images: {exc}; {RUN_WITHOUT}") from exc
        return _tensor_bytes(cast(torch.nn.Module, built["model"])) + HEADER_ALLOWANCE

    header, data = connection.fetch_model(client_id, max_bytes)
    return load_initial_weights(header, data, built["model"])


def load_initial_weights(header: collafuse_pb2.ModelHeader, data: bytes, model: UNet2DModel) -> InitialWeights:
    """``data`` loaded into ``model`` (built from the header's preset by the caller) once every check passed."""
    if header.step <= 0:
        raise ClientError(f"the server's shared model claims step {header.step}: it has not trained; {RUN_WITHOUT}")
    digest = hashlib.sha256(data).hexdigest()
    if digest != header.sha256.lower():
        raise ClientError(f"the shared model's bytes hash to {digest[:16]}..., not the {header.sha256[:16]!r}... "
                          f"the server announced: the download is corrupt; try again, or {RUN_WITHOUT}")
    try:
        tensors = safetensors.torch.load(data)
    except (safetensors.SafetensorError, ValueError) as exc:
        raise ClientError(f"the shared model is not a readable safetensors file ({exc}); {RUN_WITHOUT}") from exc
    module = cast(torch.nn.Module, model)
    expected = module.state_dict()
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ClientError(f"the shared model's tensors do not match preset {header.preset!r}: missing "
                          f"{missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected "
                          f"{[k[:64] for k in extra[:3]]}{'...' if len(extra) > 3 else ''}; {RUN_WITHOUT}")
    for name, value in tensors.items():
        want = expected[name]
        if value.dtype != torch.float32 or value.shape != want.shape:
            raise ClientError(f"the shared model's {name} is {value.dtype} {tuple(value.shape)}, not float32 "
                              f"{tuple(want.shape)} as preset {header.preset!r} has it; {RUN_WITHOUT}")
        if not bool(torch.isfinite(value).all()):
            raise ClientError(f"the shared model's {name} holds NaN or Inf values; {RUN_WITHOUT}")
    module.load_state_dict(tensors, strict=True)
    log.info("the local model starts from the shared model (preset %s, server step %d, sha256 %s...)",
             header.preset, header.step, digest[:12])
    return InitialWeights(model, header.preset, int(header.step), digest)
