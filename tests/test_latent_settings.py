"""--autoencoder on the server, the client and the simulation (issue 18): declared once, announced by the server
(its identity in the Register reply and the fingerprint), the served spec the latent's, and a client whose
autoencoder differs refuses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from client_fake_server import make_image_folder
from diffusers.models import AutoencoderKL
from server_support import CLASSES, register, start, stub

from collafuse.client.errors import AutoencoderMismatch
from collafuse.client.lifecycle import ClientLifecycle
from collafuse.common.autoencoder import latent_fingerprint, load_autoencoder
from collafuse.common.config import ClientSettings, ServerSettings
from collafuse.common.schedule import fingerprint
from collafuse.common.settings import parse_settings
from collafuse.deploy import sim
from collafuse.deploy.sim import SimSettings
from collafuse.server.errors import StartupError


def save_autoencoder(folder: Path, seed: int = 0, latent_channels: int = 4) -> Path:
    """A small random AutoencoderKL for 1-channel images (8x8 -> latent_channels x 4 x 4)."""
    torch.manual_seed(seed)
    AutoencoderKL(in_channels=1, out_channels=1, block_out_channels=(8, 16), latent_channels=latent_channels,
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  layers_per_block=1, norm_num_groups=8, scaling_factor=1.0).save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize("cls", [ServerSettings, ClientSettings, SimSettings])
def test_the_setting_is_a_flag_and_an_env_var(cls: type, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_settings(cls, []).autoencoder is None  # pixel space is the default
    assert parse_settings(cls, ["--autoencoder", str(tmp_path / "ae")]).autoencoder == tmp_path / "ae"
    monkeypatch.setenv("COLLAFUSE_AUTOENCODER", str(tmp_path / "env-ae"))
    assert parse_settings(cls, []).autoencoder == tmp_path / "env-ae"


def test_the_simulation_hands_its_autoencoder_to_every_process(tmp_path: Path) -> None:
    settings = SimSettings(out=tmp_path, autoencoder=tmp_path / "ae", image_size=8, channels=1)
    assert sim.server_settings(settings, 1, CLASSES).autoencoder == tmp_path / "ae"
    assert sim.client_settings(settings, 0, tmp_path / "shard", 1).autoencoder == tmp_path / "ae"


def test_the_server_announces_its_autoencoder_and_serves_the_latent_spec(tmp_path: Path) -> None:
    ae_path = save_autoencoder(tmp_path / "ae")
    identity = load_autoencoder(ae_path).identity
    server = start(tmp_path / "store", start_trainer=False, autoencoder=ae_path)
    try:
        reply = register(stub(server), "client-a")
        spec = reply.image_spec
        assert (spec.channels, spec.height, spec.width) == (4, 4, 4)
        announced = reply.autoencoder
        assert (announced.class_name, announced.weights_sha256) == ("AutoencoderKL", identity.weights_sha256)
        assert json.loads(announced.config_json)["latent_channels"] == 4
        schedule = server.settings.schedule()
        pixel_only = fingerprint(schedule, (4, 4, 4), CLASSES)
        assert reply.fingerprint == latent_fingerprint(pixel_only, identity) != pixel_only
        assert server.trainer.image_shape == (4, 4, 4)
    finally:
        server.stop(0)


def test_a_pixel_server_announces_nothing_and_keeps_its_fingerprint(tmp_path: Path) -> None:
    server = start(tmp_path / "store", start_trainer=False)
    try:
        reply = register(stub(server), "client-a")
        assert not reply.HasField("autoencoder")
        assert reply.fingerprint == fingerprint(server.settings.schedule(), (1, 8, 8), CLASSES)
    finally:
        server.stop(0)


def test_a_bad_autoencoder_stops_the_server_at_start(tmp_path: Path) -> None:
    with pytest.raises(StartupError, match="--autoencoder: .*does not exist"):
        start(tmp_path / "store", start_trainer=False, autoencoder=tmp_path / "missing")
    rgb = tmp_path / "rgb"
    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2, norm_num_groups=8,
                  up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1).save_pretrained(rgb)
    with pytest.raises(StartupError, match="3-channel images, not 1"):
        start(tmp_path / "store2", start_trainer=False, autoencoder=rgb)


def client_settings(tmp_path: Path, target: str, autoencoder: Path | None, work: str = "work") -> ClientSettings:
    return ClientSettings(data=tmp_path / "data", server=target, workdir=tmp_path / work, cut=20, retries=2,
                          rpc_timeout=10, device="cpu", autoencoder=autoencoder)


def test_a_client_joins_only_a_server_with_its_own_autoencoder(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "data", classes=("a",), per_class=2)
    ours = save_autoencoder(tmp_path / "ours")
    other = save_autoencoder(tmp_path / "other", seed=1)  # same config, other weights
    server = start(tmp_path / "store", start_trainer=False, autoencoder=ours)
    try:
        with ClientLifecycle(client_settings(tmp_path, server.address, other)) as client, \
                pytest.raises(AutoencoderMismatch, match=r"autoencoder differs from this client's \(weights"):
            client.register()
        with ClientLifecycle(client_settings(tmp_path, server.address, None)) as client, \
                pytest.raises(AutoencoderMismatch, match="runs in latent space .* no --autoencoder"):
            client.register()
        with ClientLifecycle(client_settings(tmp_path, server.address, ours)) as client:
            info = client.register()
            assert info.image_shape == (4, 4, 4)
            assert info.autoencoder == load_autoencoder(ours).identity
        # Offline steps use the cached reply: it is checked against the client's autoencoder as well.
        with ClientLifecycle(client_settings(tmp_path, server.address, other)) as client, \
                pytest.raises(AutoencoderMismatch, match="differs"):
            client.load_data()
    finally:
        server.stop(0)
    pixel = start(tmp_path / "pixel-store", start_trainer=False)
    try:
        with ClientLifecycle(client_settings(tmp_path, pixel.address, ours, "pixel-work")) as client, \
                pytest.raises(AutoencoderMismatch, match="server runs in pixel space"):
            client.register()
    finally:
        pixel.stop(0)
