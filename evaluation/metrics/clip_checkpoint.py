"""open_clip / OpenAI CLIP checkpoints -> transformers' ``CLIPVisionModelWithProjection``.

The FCD needs only CLIP's image tower. open_clip itself cannot be used on every machine (it
imports torchvision, whose wheel must match torch exactly), so a checkpoint in open_clip's
layout — ``open_clip_pytorch_model.bin``/``.safetensors`` from the hub, a training checkpoint
with a ``state_dict``, or OpenAI's original TorchScript ``ViT-B-32.pt`` — is converted here
to the equivalent transformers model: same weights, same computation. The vision transformer
of both is

    x = conv1(pixels) -> [class; patches] + positional -> ln_pre -> resblocks -> ln_post(x[:, 0]) @ proj

with each resblock ``x += attn(ln_1(x)); x += mlp(ln_2(x))``; the only renaming that is not
one-to-one is ``attn.in_proj`` (q, k and v stacked, as ``nn.MultiheadAttention`` keeps them),
which transformers splits into ``q_proj``, ``k_proj`` and ``v_proj``.

The architecture is read off the tensor shapes (width, patch size, depth, grid); the head
count follows CLIP's rule of 64 channels per head. The activation is not in the weights:
OpenAI's CLIP (the FCD reference) uses QuickGELU, open_clip's LAION-trained ``ViT-B-32`` uses
GELU, so the caller says which.
"""

from __future__ import annotations

import re
import warnings
import zipfile
from pathlib import Path
from typing import Any, Literal

import torch

from collafuse.evaluation.metrics.errors import MetricsError

Activation = Literal["quick_gelu", "gelu"]
HEAD_WIDTH = 64  # CLIP's vision transformers use 64 channels per attention head

_BLOCK = re.compile(r"^visual\.transformer\.resblocks\.(\d+)\.(.+)$")
# open_clip resblock parameter -> transformers encoder-layer parameter (in_proj is split separately)
_BLOCK_NAMES = {
    "ln_1.weight": "layer_norm1.weight", "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight", "ln_2.bias": "layer_norm2.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight", "attn.out_proj.bias": "self_attn.out_proj.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight", "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight", "mlp.c_proj.bias": "mlp.fc2.bias",
}
_TOP_NAMES = {
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",  # sic: transformers' spelling
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
}


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of an open_clip/OpenAI checkpoint file (pickle, safetensors or TorchScript)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        loaded: Any = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for "not a plain pickle"
        if not zipfile.is_zipfile(path):
            raise MetricsError(f"cannot read CLIP checkpoint {path}: {exc}") from exc
        try:  # OpenAI's original release is a TorchScript archive
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*torch.jit.load.*is deprecated", category=DeprecationWarning)
                loaded = torch.jit.load(str(path), map_location="cpu").state_dict()
        except (RuntimeError, ValueError) as jit_exc:
            raise MetricsError(f"cannot read CLIP checkpoint {path}: {exc}; as TorchScript: {jit_exc}") from jit_exc
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]  # an open_clip training checkpoint
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise MetricsError(f"CLIP checkpoint {path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in loaded.items()}


def vision_config(state: dict[str, torch.Tensor], activation: Activation) -> dict[str, Any]:
    """CLIPVisionConfig arguments read off the visual tower's tensor shapes."""
    needed = ["visual.conv1.weight", "visual.positional_embedding", "visual.proj"]
    missing = [k for k in needed if k not in state]
    if missing:
        raise MetricsError(
            f"the checkpoint has no CLIP vision transformer ({', '.join(missing)} missing): "
            "FCD needs a ViT image tower such as ViT-B-32, not a ResNet one"
        )
    width, channels, patch, _ = state["visual.conv1.weight"].shape
    positions = state["visual.positional_embedding"].shape[0]
    grid = round((positions - 1) ** 0.5)
    if grid * grid != positions - 1:
        raise MetricsError(f"positional embedding of {positions} rows is not 1 + a square grid of patches")
    depth = 1 + max(int(m.group(1)) for m in map(_BLOCK.match, state) if m)
    return {
        "hidden_size": int(width), "num_channels": int(channels), "patch_size": int(patch),
        "image_size": int(grid * patch), "num_hidden_layers": depth,
        "num_attention_heads": int(width) // HEAD_WIDTH,
        "intermediate_size": int(state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
        "projection_dim": int(state["visual.proj"].shape[1]), "hidden_act": activation, "layer_norm_eps": 1e-5,
    }


def to_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename (and split, transpose) the visual tower's tensors into transformers' layout."""
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in state.items():
        if not key.startswith("visual."):
            continue  # the text tower and logit scale are not needed for image features
        block = _BLOCK.match(key)
        if key in _TOP_NAMES:
            out[_TOP_NAMES[key]] = value
        elif key == "visual.proj":
            out["visual_projection.weight"] = value.t().contiguous()
        elif block and block.group(2) in ("attn.in_proj_weight", "attn.in_proj_bias"):
            prefix = f"vision_model.encoder.layers.{block.group(1)}.self_attn."
            kind = block.group(2).rsplit("_", 1)[1]  # weight | bias
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                out[f"{prefix}{name}.{kind}"] = part.contiguous()
        elif block and block.group(2) in _BLOCK_NAMES:
            out[f"vision_model.encoder.layers.{block.group(1)}.{_BLOCK_NAMES[block.group(2)]}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise MetricsError(
            f"the checkpoint's image tower has parts a plain CLIP ViT does not ({', '.join(sorted(unknown)[:5])}"
            f"{', ...' if len(unknown) > 5 else ''}); convert it to a Hugging Face CLIP folder and pass that instead"
        )
    return out


def load_open_clip_vision(path: Path, activation: Activation) -> torch.nn.Module:
    """transformers' CLIPVisionModelWithProjection holding an open_clip/OpenAI checkpoint's image tower."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    state = read_checkpoint(path)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**vision_config(state, activation)))
    result = model.load_state_dict(to_transformers(state), strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing or result.unexpected_keys:
        raise MetricsError(f"CLIP checkpoint {path} does not fill the model: missing {missing[:5]}, "
                           f"unexpected {list(result.unexpected_keys)[:5]}")
    return model.eval()
