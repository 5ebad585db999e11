"""Configuration precedence: flags > COLLAFUSE_* env > config file > defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from collafuse.common.config import ClientSettings, ServerSettings
from collafuse.common.settings import ConfigError, parse_settings

parse = parse_settings


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


@pytest.mark.parametrize("suffix,text", [
    (".yaml", "batch-size: 8\nclasses: [a, b]\n"),
    (".json", '{"batch_size": 8, "classes": ["a", "b"]}'),
    (".toml", 'batch-size = 8\nclasses = ["a", "b"]\n'),
])
def test_config_files_of_every_format(tmp_path: Path, suffix: str, text: str) -> None:
    config = tmp_path / f"server{suffix}"
    config.write_text(text)
    settings = parse(ServerSettings, ["--config", str(config)])
    assert settings.batch_size == 8 and settings.classes == ["a", "b"]


def test_help_lists_every_setting_with_its_default(capsys: pytest.CaptureFixture[str]) -> None:
    for cls in (ServerSettings, ClientSettings):
        with pytest.raises(SystemExit):
            parse(cls, ["--help"])
        text = " ".join(capsys.readouterr().out.split())
        for name in cls.model_fields:
            assert f"--{name.replace('_', '-')} " in text, name
        assert "(default: 0.002)" in text and "--config" in text and "COLLAFUSE_LR" in text


@pytest.mark.parametrize("value", ["0", "-1"])
def test_client_guidance_must_be_positive(value: str) -> None:
    # Issue 8 item 5: guidance 0 would run the client half at 0 while the server maps 0 to 1.0.
    with pytest.raises(ConfigError, match="guidance_scale: Input should be greater than 0"):
        parse(ClientSettings, ["--guidance-scale", value])
    assert parse(ClientSettings, ["--guidance-scale", "0.5"]).guidance_scale == 0.5


def test_nan_guard_rejects_the_schedule_at_start_up() -> None:
    with pytest.raises(ConfigError, match="alpha_bar_1 rounds to 1.0.*raise beta_start"):
        parse(ServerSettings, ["--beta-start", "1e-8"])


def test_shared_settings_are_declared_once() -> None:
    from collafuse.common.config import RuntimeFields, TrainingFields
    from collafuse.common.schedule import ScheduleFields
    from collafuse.deploy.sim import SimSettings

    for cls in (ServerSettings, ClientSettings, SimSettings):
        own = set(vars(cls).get("__annotations__", {}))
        for group in (TrainingFields, RuntimeFields):
            assert issubclass(cls, group)
            # The simulation keeps its own threads default (N processes share the cores).
            assert own & set(group.model_fields) <= {"threads"}, cls
    assert issubclass(ServerSettings, ScheduleFields) and issubclass(SimSettings, ScheduleFields)
