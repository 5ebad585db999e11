"""Configuration: pydantic settings read from flags > ``COLLAFUSE_*`` env vars > a config file > defaults.

Each CLI builds its argparse flags from the settings model (``add_settings_arguments``),
so a field, its env var, its config-file key and its flag are one thing.
"""

from __future__ import annotations

import argparse
import contextvars
import json
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

S = TypeVar("S", bound="CollafuseSettings")
_FILE_VALUES: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("collafuse_file_values")


class ConfigError(ValueError):
    """Configuration that cannot be used; the message says which value and why."""


class _FileSource(PydanticBaseSettingsSource):
    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        values = _FILE_VALUES.get({})
        return values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_FILE_VALUES.get({}))


class CollafuseSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="COLLAFUSE_", extra="forbid", validate_default=True)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _FileSource(settings_cls))


def read_config_file(path: Path) -> dict[str, Any]:
    """A YAML, JSON or TOML mapping of field names (dashes or underscores) to values."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        elif path.suffix == ".json":
            data = json.loads(text)
        elif path.suffix == ".toml":
            data = tomllib.loads(text)
        else:
            raise ConfigError(f"config file {path}: use a .yaml, .json or .toml file")
    except (yaml.YAMLError, json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid {path.suffix[1:]}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of setting names to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def load_settings(cls: type[S], flags: dict[str, Any] | None = None, config_file: Path | None = None) -> S:
    """Build settings with precedence flags > env > file > defaults; errors become ``ConfigError``."""
    file_values = read_config_file(config_file) if config_file else {}
    unknown = set(file_values) - set(cls.model_fields)
    if unknown:
        raise ConfigError(f"config file {config_file}: unknown settings {sorted(unknown)}; known: {sorted(cls.model_fields)}")
    token = _FILE_VALUES.set(file_values)
    try:
        return cls(**(flags or {}))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"invalid settings: {problems}") from exc
    finally:
        _FILE_VALUES.reset(token)


def _is_bool(annotation: Any) -> bool:
    if annotation is bool:
        return True
    args = typing.get_args(annotation)
    return isinstance(annotation, types.UnionType | typing._UnionGenericAlias) and bool in args  # type: ignore[attr-defined]


def _is_list(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (list, tuple):
        return True
    return any(typing.get_origin(a) in (list, tuple) for a in typing.get_args(annotation))


def add_settings_arguments(parser: argparse.ArgumentParser, cls: type[BaseModel], skip: set[str] | None = None) -> None:
    """One ``--flag-name`` per field; unset flags stay out of the namespace (argparse.SUPPRESS)."""
    group = parser.add_argument_group("settings (env COLLAFUSE_<NAME>, or keys of --config)")
    for name, field in cls.model_fields.items():
        if skip and name in skip:
            continue
        flag = "--" + name.replace("_", "-")
        default = field.default if field.default is not None else "unset"
        help_text = f"{field.description or ''} [default: {default}]".strip()
        if _is_bool(field.annotation):
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        elif _is_list(field.annotation):
            group.add_argument(flag, dest=name, nargs="+", default=argparse.SUPPRESS, help=help_text)
        else:
            group.add_argument(flag, dest=name, default=argparse.SUPPRESS, help=help_text)
    parser.add_argument("--config", type=Path, default=None, help="YAML/JSON/TOML file of settings (lowest precedence after defaults)")


def settings_from_args(cls: type[S], args: argparse.Namespace) -> S:
    flags = {k: v for k, v in vars(args).items() if k in cls.model_fields}
    return load_settings(cls, flags, getattr(args, "config", None))
