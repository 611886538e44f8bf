"""Typed dataclasses from YAML / dicts, strict about keys and types (no torch: ``mnemoguard config`` stays fast).

An unknown key is an error that lists the valid keys (nanoGPT's configurator); ``key.path=value`` overrides are parsed
as YAML scalars; ``Literal`` fields accept only their choices. Every error is a :class:`ConfigError` naming the key,
what was expected and what was found.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

__all__ = ["ConfigError", "from_dict", "load_dataclass", "merge_dicts", "parse_overrides", "read_mapping"]


class ConfigError(ValueError):
    """A recipe that does not fit the schema: says which key, what was expected and what was found."""


_SCIENTIFIC = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def _convert_union(value: Any, tp: Any, where: str) -> Any:
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    errors = []
    for arg in args:
        if arg is type(None):
            continue
        try:
            return convert(value, arg, where)
        except ConfigError as e:
            errors.append(str(e))
    raise ConfigError(errors[0] if errors else f"{where}: unexpected value {value!r}")


def _convert_tuple(value: Any, tp: Any, where: str) -> tuple:
    items = typing.get_args(tp)
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where}: expected a list, found {type(value).__name__} {value!r}")
    if len(items) == 2 and items[1] is Ellipsis:
        return tuple(convert(v, items[0], f"{where}[{i}]") for i, v in enumerate(value))
    if len(value) != len(items):
        raise ConfigError(f"{where}: expected {len(items)} values, found {len(value)}: {value!r}")
    return tuple(convert(v, t, f"{where}[{i}]") for i, (v, t) in enumerate(zip(value, items)))


def _convert_scalar(value: Any, tp: Any, where: str) -> Any:
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, found {type(value).__name__} {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, found {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _SCIENTIFIC.match(value.strip()):
            return float(value)  # PyYAML (YAML 1.1) reads "1e-4" as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, found {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, found {type(value).__name__} {value!r}")
        return value
    if tp is Any:
        return value
    raise ConfigError(f"{where}: unsupported type {tp!r}")


def convert(value: Any, tp: Any, where: str) -> Any:
    """``value`` as type ``tp`` (dataclasses, unions, Literal, list, tuple, dict and scalars), or a ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return _convert_union(value, tp, where)
    if origin is dict:
        key_tp, value_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, found {type(value).__name__} {value!r}")
        return {convert(k, key_tp, where): convert(v, value_tp, f"{where}.{k}") for k, v in value.items()}
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: expected one of {list(choices)}, found {value!r}")
        return value
    if origin is tuple:
        return _convert_tuple(value, tp, where)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            value = dataclasses.asdict(value)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} keys, found {type(value).__name__}")
        return from_dict(tp, value, where)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, found {type(value).__name__} {value!r}")
        return [convert(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    return _convert_scalar(value, tp, where)


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """An instance of dataclass ``cls`` from ``data``; unknown keys and wrong types are ConfigErrors naming the key
    (``where`` is the dotted path of ``data`` in the recipe)."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        prefix, scope = (f"{where}.", f" in {where}") if where else ("", "")
        listed = ", ".join(prefix + str(k) for k in unknown)
        raise ConfigError(f"unknown key(s) {listed}; valid keys{scope}: {', '.join(names)}")
    kwargs = {key: convert(value, hints[key], f"{where}.{key}" if where else key) for key, value in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:  # a __post_init__ check
        message, prefix = str(e), where or cls.__name__
        raise ConfigError(message if message.startswith(prefix) else f"{prefix}: {message}") from None


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {k} is not a section")
    node[keys[-1]] = value


def parse_overrides(overrides: list[str] | None) -> dict[str, Any]:
    """``["training.seed=3", "model.lora.enabled=true"]`` -> nested dict (values parsed as YAML scalars)."""
    data: dict[str, Any] = {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key.path=value, found {item!r}")
        key, raw = item.split("=", 1)
        _set_path(data, key.strip(), yaml.safe_load(raw))
    return data


def merge_dicts(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive merge: values of ``update`` win; nested mappings are merged key by key."""
    out = dict(base)
    for k, v in update.items():
        out[k] = merge_dicts(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_mapping(source: Any, what: str = "recipe") -> dict[str, Any]:
    """A YAML file path, a dict or ``None`` -> a dict (``what`` names the file kind in error messages)."""
    if source is None:
        return {}
    if isinstance(source, dict):
        return source
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"{what} file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level, found {type(data).__name__}")
        return data
    raise ConfigError(f"{what}: expected a YAML path or a mapping, found {type(source).__name__}")


def load_dataclass(cls: type, source: Any = None, overrides: list[str] | None = None, what: str = "recipe") -> Any:
    """Any config dataclass from an instance, a YAML file, a dict or ``None`` (defaults), then ``key.path=value``
    overrides; unknown keys and wrong types are :class:`ConfigError` s that name the key (``what`` names the file
    kind in messages)."""
    data = dataclasses.asdict(source) if isinstance(source, cls) else read_mapping(source, what)
    return from_dict(cls, merge_dicts(data, parse_overrides(overrides)))
