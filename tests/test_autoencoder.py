"""The shared frozen autoencoder (common/autoencoder.py) and ``collafuse-autoencoder train`` (issue 18)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from diffusers.models import AutoencoderKL, AutoencoderTiny, VQModel

from collafuse.common.autoencoder import (
    LATENT_STD_RANGE,
    AutoencoderError,
    FrozenAutoencoder,
    check_latent_scale,
    load_autoencoder,
)
from collafuse.common.autoencoder_train import TRAINING_REPORT, AutoencoderTrainOptions, train_autoencoder
from collafuse.common.data import DataError, load_image_folder, save_png
from collafuse.deploy import autoencoder as cli
from collafuse.evaluation.data.digits import digits_arrays

# A small, fast autoencoder: 16x16 grey digits -> 4x8x8 latents.
FAST = AutoencoderTrainOptions(steps=4, batch_size=16, block_out_channels=(8, 16), seed=0)


def write_digits(folder: Path, count: int = 64, size: int = 16) -> Path:
    images, labels = digits_arrays(size)
    for i in range(count):
        save_png(images[i], folder / str(labels[i]) / f"{i:04d}.png")
    return folder


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_digits(tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="module")
def trained(digits: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ae") / "ae"
    train_autoencoder(digits, out, FAST, show_progress=False)
    return out


def test_a_trained_autoencoder_loads_and_round_trips(trained: Path, digits: Path) -> None:
    ae = load_autoencoder(trained)
    assert ae.class_name == "AutoencoderKL" and not ae.model.training
    assert all(not p.requires_grad for p in ae.model.parameters())
    images = load_image_folder(digits, 1, 16).images[:10]
    assert ae.latent_shape((1, 16, 16)) == (4, 8, 8)
    latents = ae.encode(images)
    assert latents.shape == (10, 4, 8, 8)
    assert torch.equal(latents, ae.encode(images)), "encoding must be deterministic (the posterior mean)"
    decoded = ae.decode(latents)
    assert decoded.shape == images.shape and decoded.min() >= -1 and decoded.max() <= 1


def test_training_reports_the_heldout_psnr_and_sets_the_scale_from_the_data(trained: Path, digits: Path) -> None:
    report = json.loads((trained / TRAINING_REPORT).read_text())
    assert report["heldout"] >= 1 and report["images"] == 64
    assert 0 < report["heldout_psnr"] < 100
    config = json.loads((trained / "config.json").read_text())
    assert config["scaling_factor"] == pytest.approx(1 / report["latent_std"])
    # the scale check passes on the autoencoder's own data: about unit std
    ae = load_autoencoder(trained)
    std = check_latent_scale(ae.encode(load_image_folder(digits, 1, 16).images))
    assert 0.8 < std < 1.25


def test_an_autoencoder_scaled_ten_times_too_large_is_refused(trained: Path, digits: Path, tmp_path: Path) -> None:
    inflated = tmp_path / "inflated"
    shutil.copytree(trained, inflated)
    config = json.loads((inflated / "config.json").read_text())
    config["scaling_factor"] *= 10
    (inflated / "config.json").write_text(json.dumps(config))
    ae = load_autoencoder(inflated)
    with pytest.raises(AutoencoderError, match="noise floor is a noise level per element") as info:
        check_latent_scale(ae.encode(load_image_folder(digits, 1, 16).images), "your data")
    assert f"[{LATENT_STD_RANGE[0]}, {LATENT_STD_RANGE[1]}]" in str(info.value)
    # ... and its identity differs from the original's (config differs, weights the same)
    original = load_autoencoder(trained).identity
    assert ae.identity.weights_sha256 == original.weights_sha256 and ae.identity.digest() != original.digest()


def test_the_identity_is_a_content_hash_of_the_weights(trained: Path) -> None:
    first, second = load_autoencoder(trained), load_autoencoder(trained)
    assert first.identity == second.identity
    with torch.no_grad():
        next(second.model.parameters()).view(-1)[0] += 1e-3
    second._identity = None
    assert second.identity.weights_sha256 != first.identity.weights_sha256
    assert json.loads(first.identity.config_json)["latent_channels"] == 4


def test_bad_folders_are_refused_clearly(tmp_path: Path) -> None:
    with pytest.raises(AutoencoderError, match="does not exist"):
        load_autoencoder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AutoencoderError, match="holds no config.json"):
        load_autoencoder(tmp_path / "empty")
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(AutoencoderError, match="UNet2DModel"):
        load_autoencoder(tmp_path / "unet")


def test_shape_mismatches_are_refused(trained: Path) -> None:
    ae = load_autoencoder(trained)
    with pytest.raises(AutoencoderError, match="1-channel"):
        ae.latent_shape((3, 16, 16))
    with pytest.raises(AutoencoderError, match="divisible"):
        ae.latent_shape((1, 15, 15))
    with pytest.raises(AutoencoderError, match="decode takes latents"):
        ae.decode(torch.zeros(1, 3, 8, 8))


def test_check_latent_scale_bounds() -> None:
    torch.manual_seed(0)
    assert check_latent_scale(torch.randn(1000)) == pytest.approx(1.0, abs=0.1)
    for factor in (0.3, 3.0):
        with pytest.raises(AutoencoderError, match="outside"):
            check_latent_scale(factor * torch.randn(1000))


def test_a_folder_with_one_image_is_refused(tmp_path: Path) -> None:
    write_digits(tmp_path / "one", count=1)
    with pytest.raises(DataError, match="at least two"):
        train_autoencoder(tmp_path / "one", tmp_path / "out", FAST, show_progress=False)


@pytest.mark.parametrize("kind", ["AutoencoderTiny", "VQModel"])
def test_tiny_and_vq_autoencoders_load_by_class_name(kind: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model: torch.nn.Module
    if kind == "AutoencoderTiny":
        model = AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                                num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1), latent_channels=4)
    else:
        model = VQModel(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=3, norm_num_groups=8,
                        num_vq_embeddings=16, scaling_factor=0.5)
    model.save_pretrained(tmp_path / kind)  # type: ignore[operator]
    ae = load_autoencoder(tmp_path / kind)
    assert ae.class_name == kind
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    latents = ae.encode(images)
    assert tuple(latents.shape[1:]) == ae.latent_shape((3, 16, 16))
    assert ae.decode(latents).shape == images.shape


# Stable Diffusion's published VAE config (runwayml/stable-diffusion-v1-5, vae/config.json).
SD_VAE_CONFIG = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "sample_size": 512, "scaling_factor": 0.18215, "act_fn": "silu",
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
}


def test_the_stable_diffusion_vae_architecture_loads_from_the_pipeline_layout(tmp_path: Path) -> None:
    started = time.perf_counter()
    torch.manual_seed(0)
    AutoencoderKL(**SD_VAE_CONFIG).save_pretrained(tmp_path / "sd" / "vae")
    (tmp_path / "sd" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    ae = load_autoencoder(tmp_path / "sd")
    assert ae.class_name == "AutoencoderKL" and ae.scaling_factor == pytest.approx(0.18215)
    assert ae.latent_shape((3, 64, 64)) == (4, 8, 8)
    images = torch.rand(1, 3, 64, 64) * 2 - 1
    latents = ae.encode(images)
    assert latents.shape == (1, 4, 8, 8)
    assert ae.decode(latents).shape == (1, 3, 64, 64)
    assert len(ae.identity.weights_sha256) == 64
    assert time.perf_counter() - started < 60


def test_frozen_autoencoder_refuses_other_classes() -> None:
    with pytest.raises(AutoencoderError, match="unsupported"):
        FrozenAutoencoder(torch.nn.Linear(1, 1), "Linear")


def test_the_cli_trains_and_inspects(digits: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli-ae"
    assert cli.main(["train", "--data", str(digits), "--out", str(out), "--steps", "2", "--latent-channels", "3",
                     "--batch-size", "8"]) == 0
    trained = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert trained["latent_shape"] == [3, 4, 4] and trained["heldout_psnr"] > 0
    assert cli.main(["inspect", str(out)]) == 0
    inspected = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert inspected["class_name"] == "AutoencoderKL" and inspected["config"]["latent_channels"] == 3
    assert cli.main(["train", "--data", str(digits), "--out", str(out), "--steps", "0"]) == 2
    assert cli.main(["train", "--data", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
