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
from typing import Any, Generic, Literal, TypeVar

import yaml
from pydantic import BaseModel, Field, ValidationError
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
Device = Literal["auto", "cpu", "cuda"]

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


class TrainOptions(BaseModel):
    """The knobs of the training core (common/train_loop.py), declared once: the server's, the client's and the
    simulation's settings include them, and ``from_settings`` hands every one of them to the core."""

    lr: float = Field(2e-3, gt=0, description="AdamW learning rate (after the warm-up)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    ema_decay: float = Field(0.995, ge=0, lt=1, description="EMA decay of the model used for sampling")
    warmup_steps: int = Field(0, ge=0, description="linear learning-rate warm-up steps (0: constant lr)")
    grad_clip: float = Field(0.0, ge=0, description="clip the gradient norm to this (0: no clipping)")
    mixed_precision: Literal["auto", "bf16", "off"] = Field(
        "auto", description="bf16 autocast in training: auto uses it on a GPU that supports bf16 (never on the "
        "CPU), off trains in float32")
    max_nonfinite_steps: int = Field(10, ge=1, description="stop training after this many NaN/Inf losses in a row")
    seed: int = Field(0, description="seed of the initial weights, of training and of sampling")

    @classmethod
    def from_settings(cls, settings: TrainOptions) -> TrainOptions:
        """The core's knobs out of a server's, client's or simulation's settings (which include them all)."""
        return cls.model_validate(settings.model_dump(include=set(cls.model_fields)))


class TrainingFields(TrainOptions):
    """Training settings the server, the client and the simulation share: the core's knobs and the batches."""

    batch_size: int = Field(64, ge=1, description="training minibatch")
    label_dropout: float = Field(0.1, ge=0, le=1, description="classifier-free label drop-out")


class RuntimeFields(BaseModel):
    """Process settings the server, the client and the simulation share."""

    threads: int = Field(0, ge=0, description="torch CPU threads (0: torch's default)")
    device: Device = Field("auto", description="auto takes the GPU when there is one")
    token: str | None = Field(None, description="shared token clients send and the server requires (unset: no auth)")
    log_level: str = Field("INFO", description="logging level")


class TlsFields(BaseModel):
    """Mutual TLS files of the server and the client (common/tls.py; collafuse-tls makes development ones)."""

    tls_cert: Path | None = Field(None, description="PEM certificate of this process (a client's names its client id)")
    tls_key: Path | None = Field(None, description="PEM private key of --tls-cert")
    tls_ca: Path | None = Field(None, description="PEM CA: the server requires client certificates it signed; "
                                "the client verifies the server with it")


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
