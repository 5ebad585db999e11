"""collafuse-sim builds its children's settings objects in the parent and serialises them through one
function; a foreign image folder is served at its own size (issue 7 items 4 and 7)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pydantic import create_model

from collafuse.client.cli import build_parser as client_parser
from collafuse.common.config import ServerSettings
from collafuse.common.image_spec import infer_image_spec, side_multiple, valid_side
from collafuse.common.settings import CollafuseSettings, ConfigError, to_cli_args
from collafuse.deploy import sim
from collafuse.deploy.sim import SimSettings, client_command, client_settings, server_command, server_settings
from collafuse.server.cli import build_parser as server_parser

CLASSES = ["cat", "dog"]


@pytest.fixture(autouse=True)
def _no_collafuse_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("COLLAFUSE_")]:
        monkeypatch.delenv(name)


def _folder(root: Path, size: tuple[int, int], mode: str, per_class: int = 3) -> Path:
    rng = np.random.default_rng(0)
    for name in CLASSES:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
            Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(root / name / f"{i}.png")
    return root


def test_children_settings_survive_the_command_line(tmp_path: Path) -> None:
    settings = SimSettings(out=tmp_path, beta_end=0.03, lr=1e-3, ema_decay=0.9, label_dropout=0.2, batch_size=8,
                           seed=5, device="cpu", log_level="DEBUG", cut=1000, num_train_timesteps=1000,
                           guidance_scale=2.5, server_guidance_scale=1.5, handoff_margin=7,
                           client_local_timesteps="linear", timeout=5000)
    server = server_settings(settings, 4321, CLASSES)
    parser, flags = server_parser()
    assert flags.load(parser.parse_args(server_command(settings, 4321, CLASSES).args)) == server
    assert server.beta_end == 0.03 and server.lr == 1e-3 and server.classes == CLASSES and server.device == "cpu"

    client = client_settings(settings, 2, tmp_path / "shard", 4321)
    argv = client_command(settings, 2, tmp_path / "shard", 4321).args
    parser, by_command = client_parser()
    args = parser.parse_args(argv)
    command = args.command
    del args.command
    assert command == "run" and by_command[command].load(args) == client
    # Client k's seed is the run's seed + k; an ICM client does not wait for the server.
    assert client.seed == 7 and client.wait_for_server is False and client.ema_decay == 0.9
    # The sampling choices every client makes (the server reads the guidance from each client's request).
    assert client.guidance_scale == 2.5 and client.server_guidance_scale == 1.5 and client.handoff_margin == 7
    assert client.local_timesteps == "linear"
    # A client waits for the server's training as long as the whole run may take (--timeout), not its own 30 min.
    assert client.wait_timeout == 5000


def test_a_renamed_field_fails_in_the_parent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fields: dict[str, Any] = {n: (f.annotation, f) for n, f in ServerSettings.model_fields.items() if n != "max_steps"}
    renamed = create_model("RenamedServerSettings", __base__=CollafuseSettings, max_train_steps=(int, 1), **fields)
    monkeypatch.setattr(sim, "ServerSettings", renamed)
    with pytest.raises(ConfigError, match="max_steps: Extra inputs are not permitted"):
        server_command(SimSettings(out=tmp_path), 4321, CLASSES)


def test_secrets_travel_by_environment_not_argv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLLAFUSE_LR", "0.5")  # the shell's settings do not leak into the children
    settings = SimSettings(out=tmp_path, token="s3cret")
    assert "s3cret" not in " ".join(server_command(settings, 1, CLASSES).args)
    env = sim._env(settings)
    assert env["COLLAFUSE_TOKEN"] == "s3cret" and "COLLAFUSE_LR" not in env
    with pytest.raises(ConfigError, match="must not go on a command line"):
        to_cli_args(ServerSettings(token="s3cret"))


@pytest.mark.parametrize("side,multiple,expected", [(8, 2, 8), (25, 2, 26), (25, 4, 24), (3, 4, 4), (2000, 4, 1024)])
def test_valid_side_rounds_to_the_nearest_side_the_models_take(side: int, multiple: int, expected: int) -> None:
    assert valid_side(side, multiple) == expected


def test_sim_takes_a_foreign_folder_at_its_own_size(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = _folder(tmp_path / "rgb", (25, 25), "RGB")
    caplog.set_level(logging.INFO, "collafuse.sim")
    resolved = sim.with_image_spec(SimSettings(out=tmp_path, dataset=str(data), server_preset="base"))
    assert (resolved.image_size, resolved.channels) == (24, 3)
    assert "side 25 rounded to 24" in caplog.text and "divisible by 4" in caplog.text and "3 channels" in caplog.text
    server = server_settings(SimSettings(out=tmp_path, dataset=str(data)), 1, CLASSES)
    assert (server.image_size, server.channels) == (26, 3)  # tiny and small take any even side
    # Given values win; the digits keep their own 8x8.
    assert sim.with_image_spec(SimSettings(out=tmp_path, dataset=str(data), image_size=16)).image_size == 16
    assert (sim.with_image_spec(SimSettings(out=tmp_path)).image_size, 8) == (8, 8)


def test_grey_png_exported_as_rgb_counts_as_grey(tmp_path: Path) -> None:
    data = tmp_path / "grey"
    (data / "a").mkdir(parents=True)
    Image.new("RGB", (28, 28), (90, 90, 90)).save(data / "a" / "0.png")
    spec = infer_image_spec(data, ["tiny"])
    assert (spec.side, spec.channels, spec.classes) == (28, 1, ["a"])
    assert side_multiple(["tiny", "base"]) == 4


def test_server_started_for_a_dataset_serves_its_spec_and_classes(tmp_path: Path) -> None:
    data = _folder(tmp_path / "rgb", (12, 12), "RGB")
    served = ServerSettings(dataset=data).for_dataset()
    assert (served.image_size, served.channels, served.classes) == (12, 3, CLASSES)
    given = ServerSettings(dataset=data, image_size=16, classes=["x", "cat", "dog"]).for_dataset()
    assert (given.image_size, given.channels, given.classes) == (16, 3, ["x", "cat", "dog"])
