"""Configuration precedence: flags > COLLAFUSE_* env > config file > defaults."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from collafuse.common.config import ClientSettings, ServerSettings
from collafuse.common.settings import ConfigError, add_settings_arguments, settings_from_args


def parse(cls, argv: list[str]):  # type: ignore[no-untyped-def]
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser, cls)
    return settings_from_args(cls, parser.parse_args(argv))


def test_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "server.yaml"
    config.write_text("port: 6000\nbatch-size: 32\nmax_steps: 10\n")
    monkeypatch.setenv("COLLAFUSE_PORT", "7000")
    monkeypatch.setenv("COLLAFUSE_MAX_STEPS", "20")
    settings = parse(ServerSettings, ["--config", str(config), "--max-steps", "30"])
    assert settings.batch_size == 32  # file
    assert settings.port == 7000  # env beats file
    assert settings.max_steps == 30  # flag beats env
    assert settings.lr == 2e-3  # default


def test_lists_and_bools(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = parse(ServerSettings, ["--classes", "cat", "dog"])
    assert settings.classes == ["cat", "dog"]
    assert parse(ClientSettings, ["--no-wait-for-server"]).wait_for_server is False


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--port", "notaport"], "port"),
        (["--channels", "2"], "channels must be 1"),
        (["--classes", "a", "a"], "distinct"),
        (["--ema-decay", "1.5"], "ema_decay"),
    ],
)
def test_bad_values_name_the_setting(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse(ServerSettings, argv)


def test_bad_config_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        parse(ServerSettings, ["--config", str(tmp_path / "missing.yaml")])
    unknown = tmp_path / "c.json"
    unknown.write_text('{"prot": 1}')
    with pytest.raises(ConfigError, match="unknown settings"):
        parse(ServerSettings, ["--config", str(unknown)])
    broken = tmp_path / "c.toml"
    broken.write_text("port = = 1")
    with pytest.raises(ConfigError, match="not valid toml"):
        parse(ServerSettings, ["--config", str(broken)])
