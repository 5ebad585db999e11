"""Configuration: pydantic settings read from flags > ``COLLAFUSE_*`` env vars > a config file > defaults.

Everything here is pydantic-settings' own machinery: the flags come from its
``CliSettingsSource`` (attached to the CLI's argparse parser, so sub-commands keep
working), the ``--config`` file from its YAML/JSON/TOML sources, the env vars from its
env source. A field, its flag, its env var and its config-file key are one thing.
``to_cli_args`` is the reverse: the flags that rebuild a settings object in a child process.
"""

from __future__ import annotations

import argparse
import contextvars
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

import yaml
from pydantic import ValidationError
from pydantic_settings import (
    BaseSettings,
    CliApp,
    CliSettingsSource,
    JsonConfigSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
    YamlConfigSettingsSource,
)

S = TypeVar("S", bound="CollafuseSettings")

# The --config file of the settings being built: settings_customise_sources is a classmethod with a
# fixed signature, so the path reaches it through a context variable set only around construction.
_CONFIG_FILE: contextvars.ContextVar[Path | None] = contextvars.ContextVar("collafuse_config_file", default=None)
CONFIG_FLAG = "--config"


class ConfigError(ValueError):
    """Configuration that cannot be used; the message says which value and why."""


def describe_validation_error(exc: ValidationError) -> str:
    """``setting: problem; ...`` for every error of a pydantic validation."""
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg'].removeprefix('Value error, ')}" for err in exc.errors()
    )


class CollafuseSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="COLLAFUSE_",
        extra="forbid",
        validate_default=True,
        cli_kebab_case=True,  # --batch-size
        cli_implicit_flags=True,  # --wait-for-server / --no-wait-for-server
        cli_hide_none_type=True,
        cli_avoid_json=True,
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The CLI source, when given, is put in front of these by pydantic-settings.
        config_file = _CONFIG_FILE.get()
        if config_file is None:
            return (init_settings, env_settings)
        return (init_settings, env_settings, config_file_source(settings_cls, config_file))


# Fields that never go on a command line (argv is visible to every user of the machine): children get
# them through their COLLAFUSE_* environment variable instead.
SECRET_FIELDS = frozenset({"token"})


# ---- config files ---------------------------------------------------------------------------------


class _ConfigFileKeys:
    """What the three file sources add to pydantic-settings': dashed keys, and parse errors as ConfigError."""

    keys: list[str]

    def _read_file(self, file_path: Any) -> dict[str, Any]:
        try:
            data = super()._read_file(file_path)  # type: ignore[misc]
        except (ValueError, yaml.YAMLError) as exc:  # JSON and TOML decode errors are ValueErrors
            raise ConfigError(f"config file {file_path} is not valid {Path(str(file_path)).suffix[1:]}: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"config file {file_path} must hold a mapping of setting names to values")
        normalised = {str(key).replace("-", "_"): value for key, value in data.items()}
        self.keys = list(normalised)
        return normalised


class _YamlFile(_ConfigFileKeys, YamlConfigSettingsSource):
    pass


class _JsonFile(_ConfigFileKeys, JsonConfigSettingsSource):
    pass


class _TomlFile(_ConfigFileKeys, TomlConfigSettingsSource):
    pass


_FILE_SOURCES: dict[str, type[_ConfigFileKeys]] = {".yaml": _YamlFile, ".yml": _YamlFile, ".json": _JsonFile, ".toml": _TomlFile}


def config_file_source(settings_cls: type[BaseSettings], path: Path) -> PydanticBaseSettingsSource:
    """pydantic-settings' source for a YAML/JSON/TOML file of settings; unknown keys are a ConfigError."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    source_cls = _FILE_SOURCES.get(path.suffix.lower())
    if source_cls is None:
        raise ConfigError(f"config file {path}: use a .yaml, .json or .toml file")
    source = source_cls(settings_cls, path)  # type: ignore[call-arg]
    unknown = sorted(set(source.keys) - set(settings_cls.model_fields))
    if unknown:
        raise ConfigError(f"config file {path}: unknown settings {unknown}; known: {sorted(settings_cls.model_fields)}")
    assert isinstance(source, PydanticBaseSettingsSource)
    return source


# ---- building settings ----------------------------------------------------------------------------


def load_settings(
    cls: type[S], cli: CliSettingsSource[Any] | None = None, config_file: Path | None = None, **values: Any
) -> S:
    """Settings with precedence ``values`` > flags (``cli``) > env > ``config_file`` > defaults.

    Every problem becomes a ``ConfigError`` that names the setting.
    """
    token = _CONFIG_FILE.set(config_file)
    try:
        # BaseSettings.__init__ takes _cli_settings_source; the pydantic mypy plugin only knows the fields.
        return cls(_cli_settings_source=cli, **values)  # type: ignore[call-arg]
    except ValidationError as exc:
        raise ConfigError(f"invalid settings: {describe_validation_error(exc)}") from exc
    finally:
        _CONFIG_FILE.reset(token)


class SettingsFlags(Generic[S]):
    """The flags of one settings class on an argparse parser (one ``--flag-name`` per field, ``--help``
    lists each with its default and env var), plus ``--config FILE``."""

    def __init__(self, cls: type[S], parser: argparse.ArgumentParser) -> None:
        self.cls = cls
        parser.add_argument(CONFIG_FLAG, dest="config", type=Path, default=None,
                            help="YAML/JSON/TOML file of settings (lowest precedence after defaults)")
        self._source = CliSettingsSource[S](cls, root_parser=parser, cli_show_env_vars=True)

    def load(self, args: argparse.Namespace) -> S:
        """Settings from the parsed flags, the env and the ``--config`` file of ``args``."""
        flags = {name: value for name, value in vars(args).items() if name != "config"}
        return load_settings(self.cls, self._source(parsed_args=flags), getattr(args, "config", None))


def parse_settings(cls: type[S], argv: Sequence[str], **parser_kwargs: Any) -> S:
    """Settings of ``cls`` from a command line (flags and ``--config``), the env and the defaults."""
    parser = argparse.ArgumentParser(**parser_kwargs)
    flags = SettingsFlags(cls, parser)
    return flags.load(parser.parse_args(list(argv)))


def build_settings(cls: type[S], **values: Any) -> S:
    """Settings of ``cls`` from ``values`` and defaults alone (no env, no file): how a parent process builds
    its children's settings, so that a misspelt or renamed field fails at once, in the parent."""
    try:
        return cls.model_validate(values)  # model_validate skips BaseSettings' sources
    except ValidationError as exc:
        raise ConfigError(f"invalid {cls.__name__}: {describe_validation_error(exc)}") from exc


def to_cli_args(settings: CollafuseSettings) -> list[str]:
    """The flags that make the CLI of ``type(settings)`` rebuild ``settings`` (defaults left out).

    Secret fields (``SECRET_FIELDS``) are refused: pass them as ``COLLAFUSE_<NAME>`` env vars.
    """
    secrets = sorted(name for name in SECRET_FIELDS if getattr(settings, name, None) is not None)
    if secrets:
        raise ConfigError(f"{secrets} must not go on a command line: pass them as COLLAFUSE_<NAME> env vars")
    return CliApp.serialize(settings, list_style="argparse")
