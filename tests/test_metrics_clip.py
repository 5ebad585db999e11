"""CLIP features for the FCD: real transformers models from local weights, and open_clip checkpoints.

No pretrained CLIP weights exist on this machine, so the models here are randomly initialised
ones of CLIP's architecture (smaller width and depth, ViT-B/32's patch and image size): the code
path is the one real weights take. An open_clip checkpoint is checked against an independent
re-statement of open_clip's ``VisionTransformer`` forward built on ``nn.MultiheadAttention``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from eval_support import make_eval_folders, run_eval
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F

from collafuse.evaluation.data.digits import digits_arrays
from collafuse.evaluation.metrics.clip import ClipFeatures, clip_preprocess
from collafuse.evaluation.metrics.clip_checkpoint import Activation, load_open_clip_vision
from collafuse.evaluation.metrics.errors import MetricsError
from collafuse.evaluation.metrics.features import folder_features

WIDTH, DEPTH, PATCH, IMAGE, PROJ = 128, 2, 32, 224, 16  # 2 heads of 64, a 7x7 grid like ViT-B/32


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_eval_folders(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("weights") / "clip-vit-tiny"
    torch.manual_seed(0)
    config = transformers.CLIPVisionConfig(hidden_size=WIDTH, intermediate_size=4 * WIDTH, projection_dim=PROJ,
                                           num_hidden_layers=DEPTH, num_attention_heads=WIDTH // 64,
                                           image_size=IMAGE, patch_size=PATCH)
    transformers.CLIPVisionModelWithProjection(config).save_pretrained(folder)
    return folder


def open_clip_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random visual tower in open_clip's layout (plus a text-tower tensor the converter must ignore)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 0.05) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    grid = IMAGE // PATCH
    state = {
        "visual.class_embedding": rand(WIDTH), "visual.positional_embedding": rand(grid * grid + 1, WIDTH),
        "visual.conv1.weight": rand(WIDTH, 3, PATCH, PATCH), "visual.proj": rand(WIDTH, PROJ),
        "visual.ln_pre.weight": 1 + rand(WIDTH), "visual.ln_pre.bias": rand(WIDTH),
        "visual.ln_post.weight": 1 + rand(WIDTH), "visual.ln_post.bias": rand(WIDTH),
        "token_embedding.weight": rand(10, WIDTH), "logit_scale": torch.tensor(4.6),
    }
    for i in range(DEPTH):
        p = f"visual.transformer.resblocks.{i}."
        state.update({
            p + "ln_1.weight": 1 + rand(WIDTH), p + "ln_1.bias": rand(WIDTH),
            p + "ln_2.weight": 1 + rand(WIDTH), p + "ln_2.bias": rand(WIDTH),
            p + "attn.in_proj_weight": rand(3 * WIDTH, WIDTH), p + "attn.in_proj_bias": rand(3 * WIDTH),
            p + "attn.out_proj.weight": rand(WIDTH, WIDTH), p + "attn.out_proj.bias": rand(WIDTH),
            p + "mlp.c_fc.weight": rand(4 * WIDTH, WIDTH), p + "mlp.c_fc.bias": rand(4 * WIDTH),
            p + "mlp.c_proj.weight": rand(WIDTH, 4 * WIDTH), p + "mlp.c_proj.bias": rand(WIDTH),
        })
    return state


def open_clip_reference(state: dict[str, torch.Tensor], pixels: torch.Tensor, quick_gelu: bool) -> torch.Tensor:
    """open_clip's VisionTransformer.forward (pre-norm resblocks with nn.MultiheadAttention), restated."""
    x = F.conv2d(pixels, state["visual.conv1.weight"], stride=PATCH).flatten(2).transpose(1, 2)
    x = torch.cat([state["visual.class_embedding"].expand(len(x), 1, -1), x], dim=1) + state["visual.positional_embedding"]
    x = F.layer_norm(x, (WIDTH,), state["visual.ln_pre.weight"], state["visual.ln_pre.bias"])
    for i in range(DEPTH):
        p = f"visual.transformer.resblocks.{i}."
        attn = nn.MultiheadAttention(WIDTH, WIDTH // 64, batch_first=True)
        attn.load_state_dict({k.removeprefix(p + "attn."): v for k, v in state.items() if k.startswith(p + "attn.")})
        h = F.layer_norm(x, (WIDTH,), state[p + "ln_1.weight"], state[p + "ln_1.bias"])
        x = x + attn(h, h, h, need_weights=False)[0]
        h = F.linear(F.layer_norm(x, (WIDTH,), state[p + "ln_2.weight"], state[p + "ln_2.bias"]),
                     state[p + "mlp.c_fc.weight"], state[p + "mlp.c_fc.bias"])
        h = h * torch.sigmoid(1.702 * h) if quick_gelu else F.gelu(h)
        x = x + F.linear(h, state[p + "mlp.c_proj.weight"], state[p + "mlp.c_proj.bias"])
    return F.layer_norm(x[:, 0], (WIDTH,), state["visual.ln_post.weight"], state["visual.ln_post.bias"]) @ state["visual.proj"]


def test_without_weights_the_error_says_what_to_pass(tmp_path: Path, folders: Path, capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COLLAFUSE_CLIP_WEIGHTS", raising=False)
    code, _, err = run_eval(["fid", str(folders / "real"), str(folders / "fake"), "--features", "clip"], capsys)
    assert code == 2 and "--clip-weights" in err and "transformers" in err and "open_clip" in err
    with pytest.raises(MetricsError, match="do not exist"):
        ClipFeatures(tmp_path / "no-such-weights")
    (tmp_path / "empty-folder").mkdir()
    with pytest.raises(MetricsError, match="no config.json"):
        ClipFeatures(tmp_path / "empty-folder")


def test_features_from_a_hugging_face_folder_are_the_models_image_embeds(hf_folder: Path, folders: Path) -> None:
    extractor = ClipFeatures(hf_folder)
    assert extractor.num_features == PROJ
    features = folder_features(extractor, folders / "real", progress=False).features
    assert features.shape == (12, PROJ)
    model = transformers.CLIPVisionModelWithProjection.from_pretrained(str(hf_folder)).eval()
    images = torch.from_numpy(np.stack([digits_arrays(16)[0][i] for i in range(12)])).float()
    with torch.no_grad():
        direct = model(pixel_values=clip_preprocess(images)).image_embeds.numpy()
    # folder_features reads the PNGs back (sorted by path), so compare as sets of rows
    assert np.allclose(np.sort(features, axis=0), np.sort(direct, axis=0), atol=1e-4)


def test_a_full_clip_model_folder_gives_its_image_features(tmp_path: Path) -> None:
    """A copy of openai/clip-vit-base-patch32 is a whole CLIPModel (text and image towers)."""
    torch.manual_seed(1)
    vision = {"hidden_size": WIDTH, "intermediate_size": 4 * WIDTH, "num_hidden_layers": DEPTH,
              "num_attention_heads": WIDTH // 64, "image_size": IMAGE, "patch_size": PATCH}
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 99}
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=PROJ)
    full = transformers.CLIPModel(config).eval()
    full.save_pretrained(tmp_path / "clip")
    extractor = ClipFeatures(tmp_path / "clip")
    images = torch.from_numpy(digits_arrays(16)[0][:4]).float()
    with torch.no_grad():
        expected = full.get_image_features(pixel_values=clip_preprocess(images))
    # transformers 4 returns the projected features; 5 returns an output whose pooler_output holds them
    expected = getattr(expected, "pooler_output", expected)
    assert expected.shape == (4, PROJ)
    assert extractor.num_features == PROJ
    assert torch.allclose(extractor(images), expected, atol=1e-5)


def test_fcd_through_the_cli(hf_folder: Path, folders: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["fid", str(folders / "real"), str(folders / "fake"), "--features", "clip", "--clip-weights", str(hf_folder),
            "--no-cache", "--kid-subsets", "5"]
    code, result, _ = run_eval(args, capsys)
    assert code == 0 and result is not None
    assert result["fcd"] == result["fid"] and result["feature_dim"] == PROJ and float(result["fcd"]) > 0
    code, same, _ = run_eval(["fid", str(folders / "real"), str(folders / "real"), "--features", "clip", "--clip-weights",
                          str(hf_folder), "--no-cache", "--kid-subsets", "5"], capsys)
    assert code == 0 and same is not None and abs(float(same["fcd"])) < 1e-3


@pytest.mark.parametrize("activation", ["quick_gelu", "gelu"])
def test_an_open_clip_checkpoint_computes_what_open_clip_computes(tmp_path: Path, activation: Activation) -> None:
    state = open_clip_state()
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(state, path)
    model = load_open_clip_vision(path, activation)
    pixels = torch.randn(3, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(pixel_values=pixels).image_embeds
        reference = open_clip_reference(state, pixels, quick_gelu=activation == "quick_gelu")
    assert torch.allclose(ours, reference, atol=1e-5, rtol=1e-4)
    other = open_clip_reference(state, pixels, quick_gelu=activation != "quick_gelu")
    assert not torch.allclose(ours, other, atol=1e-5, rtol=1e-4)  # the activation matters, so the flag does


def test_checkpoint_formats_load_the_same_weights(tmp_path: Path) -> None:
    state = open_clip_state(seed=3)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in state.items()}}, tmp_path / "epoch_3.pt")
    pixels = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(2))
    outputs = []
    for name in ("model.safetensors", "epoch_3.pt"):
        extractor = ClipFeatures(tmp_path / name)
        assert extractor.num_features == PROJ
        with torch.no_grad():
            outputs.append(extractor.model(pixel_values=pixels).image_embeds)
    assert torch.equal(outputs[0], outputs[1])


def test_checkpoints_that_are_not_a_clip_vit_are_refused_plainly(tmp_path: Path) -> None:
    resnet = {"visual.conv1.weight": torch.zeros(8, 3, 3, 3), "visual.attnpool.positional_embedding": torch.zeros(50, 8)}
    torch.save(resnet, tmp_path / "rn50.pt")
    with pytest.raises(MetricsError, match="ViT image tower"):
        ClipFeatures(tmp_path / "rn50.pt")
    state = open_clip_state()
    state["visual.transformer.resblocks.0.ls_1.gamma"] = torch.ones(WIDTH)
    torch.save(state, tmp_path / "layer-scale.pt")
    with pytest.raises(MetricsError, match="ls_1"):
        ClipFeatures(tmp_path / "layer-scale.pt")
    (tmp_path / "garbage.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(MetricsError, match="cannot read CLIP checkpoint"):
        ClipFeatures(tmp_path / "garbage.bin")


def test_preprocessing_resizes_the_short_side_and_centre_crops() -> None:
    wide = torch.zeros(2, 1, 32, 64)
    out = clip_preprocess(wide)
    assert out.shape == (2, 3, 224, 224)
    # mid-grey (pixel 127.5 -> 128 after rounding) normalised per channel by CLIP's mean and std
    expected = (128 / 255 - 0.48145466) / 0.26862954
    assert float(out[0, 0, 100, 100]) == pytest.approx(expected, abs=1e-4)
