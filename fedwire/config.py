"""Typed YAML configs for both sides of the wire, validated at start.

A config is a tree of dataclasses. `parse_config` walks the YAML mapping against the
dataclass fields and fails with the dotted field path and the reason, so a bad file
stops the service before it touches the network. Range checks live in each
dataclass's `check()` method and raise `ConfigError` naming the field.
"""

from __future__ import annotations

import dataclasses
import types
from dataclasses import dataclass
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import ProtocolError
from .mqtt import TlsFiles

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value is missing, of the wrong type or out of range."""

    def __init__(self, field: str, reason: str, source: str | None = None) -> None:
        self.field = field
        self.reason = reason
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{field}: {reason}")


def require(condition: bool, field: str, reason: str) -> None:
    if not condition:
        raise ConfigError(field, reason)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError("(file)", f"no such file: {path}", str(path)) from None
    except yaml.YAMLError as exc:
        raise ConfigError("(file)", f"not valid YAML: {exc}", str(path)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("(file)", "top level must be a mapping of field: value", str(path))
    return data


def parse_config(cls: type[T], data: dict[str, Any], source: str | None = None, base_dir: Path | None = None) -> T:
    """Build dataclass `cls` from a mapping; relative Path fields resolve against `base_dir`."""
    try:
        return _build(cls, data, "", base_dir)
    except ConfigError as exc:
        raise ConfigError(exc.field, exc.reason, source) from None


def load_config(cls: type[T], path: str | Path, overrides: dict[str, Any] | None = None) -> T:
    """Read YAML `path`, merge `overrides` on top (nested dicts merge), and parse."""
    path = Path(path)
    data = merge_dicts(read_yaml(path), overrides or {})
    return parse_config(cls, data, source=str(path), base_dir=path.parent)


def merge_dicts(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_dicts(merged[key], value)
        else:
            merged[key] = value
    return merged


def config_to_dict(config: Any) -> dict[str, Any]:
    """Plain YAML-able dict of a config (Paths as strings)."""

    def plain(value: Any) -> Any:
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(dataclasses.asdict(config))


def _build(cls: type, data: Any, prefix: str, base_dir: Path | None) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(prefix.rstrip(".") or "(top)", f"expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(prefix + unknown[0], f"unknown field (known: {', '.join(sorted(fields))})")
    values = {}
    for name, field in fields.items():
        path = prefix + name
        if name in data:
            values[name] = _coerce(hints[name], data[name], path, base_dir)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(path, "required field is missing")
    obj = cls(**values)
    check = getattr(obj, "check", None)
    if check is not None:
        try:
            check()
        except (ConfigError, ProtocolError) as exc:  # a wire settings dataclass (TrainSettings) names its field too
            raise ConfigError(prefix + exc.field, exc.reason) from None
    return obj


def _coerce(hint: Any, value: Any, path: str, base_dir: Path | None) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # X | None: X's own error names the field inside it
            return _coerce(options[0], value, path, base_dir)
        errors = []
        for option in options:
            try:
                return _coerce(option, value, path, base_dir)
            except ConfigError as exc:
                errors.append(exc.reason)
        raise ConfigError(path, " or ".join(errors))
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(path, f"must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path + ".", base_dir)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(path, f"expected a list, got {type(value).__name__}")
        return [_coerce(args[0], v, f"{path}[{i}]", base_dir) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(path, f"expected a mapping, got {type(value).__name__}")
        return dict(value)
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, f"expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, f"expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(path, f"expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(path, f"expected a string, got {value!r}")
        return value
    if hint is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(path, f"expected a path, got {value!r}")
        p = Path(value).expanduser()
        return p if p.is_absolute() or base_dir is None else (base_dir / p)
    raise TypeError(f"unsupported config type {hint!r} at {path}")


@dataclass
class TlsConfig:
    """PEM files for an mqtts:// broker; unset files mean the system CA store / no client certificate."""

    ca_cert: Path | None = None
    certfile: Path | None = None
    keyfile: Path | None = None

    def check(self) -> None:
        for name in ("ca_cert", "certfile", "keyfile"):
            path = getattr(self, name)
            require(path is None or path.is_file(), name, f"no such file: {path}")
        require((self.certfile is None) == (self.keyfile is None), "keyfile",
                "certfile and keyfile go together (the client certificate and its key)")

    def files(self) -> TlsFiles:
        return TlsFiles(*(None if p is None else str(p) for p in (self.ca_cert, self.certfile, self.keyfile)))
