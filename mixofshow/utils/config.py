"""Build nested config dataclasses from YAML with errors that name the file and the key.

Messages read ``FILE: dotted.key: what was expected, got VALUE`` (``configs/README.md``).
Numbers may be written in any YAML spelling: YAML 1.1 (PyYAML's resolver) reads ``1e-4`` (no
dot, unsigned exponent) as a string; :data:`Loader` reads it as the float YAML 1.2 and every
user expects, and a float key also accepts a numeric string.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

__all__ = [
    "Bounds",
    "ConfigError",
    "Loader",
    "apply_overrides",
    "check_bounds",
    "from_dict",
    "load_yaml",
    "parse_overrides",
    "parse_yaml_value",
    "to_dict",
]

T = TypeVar("T")

# YAML 1.2 floats that YAML 1.1 leaves as strings: 1e-4, 1E5, 2.5e3, .5e-3 (underscores as 1.1)
_FLOAT_12 = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")


class Loader(yaml.SafeLoader):
    """PyYAML's safe loader, reading ``1e-4``-style numbers as floats."""


Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_12, list("-+0123456789."))


class ConfigError(ValueError):
    """A config file or key is wrong; the message names the file, the key and what is expected."""


def parse_yaml_value(text: str, where: str) -> Any:
    """One YAML value (``--set`` right-hand sides); a syntax error names ``where``."""
    try:
        return yaml.load(text, Loader=Loader)  # noqa: S506 (Loader is a SafeLoader)
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: not a valid YAML value ({_one_line(err)})") from None


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def parse_overrides(items: Iterable[str], flag: str = "--set") -> dict[str, Any]:
    """``["lora.rank=8", ...]`` -> ``{"lora.rank": 8}`` (values read as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"{flag} {item!r}: expected KEY=VALUE, e.g. {flag} lora.rank=8")
        out[key] = parse_yaml_value(value, f"{flag} {item}")
    return out


def apply_overrides(data: dict[str, Any], overrides: Mapping[str, Any], where: str) -> None:
    """Set dotted keys in ``data`` in place; a key under a non-mapping value is a ConfigError."""
    for dotted, value in overrides.items():
        node = data
        *parents, leaf = dotted.split(".")
        for depth, key in enumerate(parents):
            child = node.setdefault(key, {})
            if child is None:  # `key:` left empty in the file
                child = node[key] = {}
            if not isinstance(child, dict):
                section = ".".join(parents[: depth + 1])
                raise ConfigError(
                    f"{where}: cannot set {dotted!r}: {section!r} is a value ({child!r}), not a section of keys"
                )
            node = child
        node[leaf] = value


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)  # noqa: S506
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({_one_line(err)})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {type(data).__name__}")
    return data


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "config", key: str = "") -> T:
    """Instantiate dataclass ``cls`` from ``data``; unknown keys and wrong types raise ConfigError.

    ``where`` names the file, ``key`` the dotted path of ``data`` inside it (empty: the top).
    """
    data = {} if data is None else data
    at = f"{where}: {key}" if key else where
    if not isinstance(data, dict):
        raise ConfigError(f"{at}: expected a mapping, got {type(data).__name__} ({data!r})")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{at}: unknown key {unknown[0]!r}; expected one of: {', '.join(fields)}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(hints[name], value, where, f"{key}.{name}" if key else name)
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{at}: required key {missing[0]!r} is missing")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{at}: {err}") from None


def _number(value: Any) -> Any:
    """A numeric string (``"1e-4"``, ``"0.5"``) as a float; anything else unchanged."""
    if isinstance(value, str) and re.fullmatch(r"\s*[-+]?(?:[0-9][0-9_]*\.?[0-9_]*|\.[0-9_]+)(?:[eE][-+]?[0-9]+)?\s*", value):
        return float(value.replace("_", ""))
    return value


def _convert(tp: Any, value: Any, where: str, key: str) -> Any:
    at = f"{where}: {key}"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, where, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{at}: invalid value {value!r}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where, key)
    if tp is Any:
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{at}: expected a list, got {value!r}")
        (arg, *_) = typing.get_args(tp) or (Any,)
        items = [_convert(arg, v, where, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{at}: expected a mapping, got {value!r}")
        _, val_t = typing.get_args(tp) or (Any, Any)
        return {k: _convert(val_t, v, where, f"{key}.{k}") for k, v in value.items()}
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{at}: expected one of {list(allowed)}, got {value!r}")
        return value
    if tp is float:
        value = _number(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{at}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        number = _number(value)
        if isinstance(number, float) and number.is_integer() and isinstance(value, str):
            number = int(number)  # "1e3" (YAML 1.1 string) -> 1000
        if isinstance(number, bool) or not isinstance(number, int):
            raise ConfigError(f"{at}: expected an integer, got {value!r}")
        return number
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{at}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{at}: expected a string, got {value!r}")
        return value
    return value


@dataclasses.dataclass(frozen=True)
class Bounds:
    """Allowed values of a numeric key: ``ge <= x <= le``, ``gt < x < lt``, a multiple of ``multiple_of``.

    Floats must also be finite. ``None`` values (optional keys left null) always pass.
    """

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    multiple_of: int | None = None

    def describe(self, integer: bool) -> str:
        parts = [f"{op} {_show(v)}" for op, v in ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt)) if v is not None]
        text = ("an integer" if integer else "a number") + (" " + " and ".join(parts) if parts else "")
        return text + (f", a multiple of {self.multiple_of}" if self.multiple_of else "")

    def accepts(self, x: float) -> bool:
        if isinstance(x, float) and not math.isfinite(x):
            return False
        return not (
            (self.ge is not None and x < self.ge)
            or (self.gt is not None and x <= self.gt)
            or (self.le is not None and x > self.le)
            or (self.lt is not None and x >= self.lt)
            or (self.multiple_of and x % self.multiple_of)
        )


def _show(x: Any) -> str:
    return str(int(x)) if isinstance(x, float) and x.is_integer() else repr(x)


def check_bounds(obj: Any, rules: Mapping[str, Bounds]) -> None:
    """Check dotted attributes of ``obj`` (lists: every item) against ``rules``.

    Raises ``ValueError("optimizer.lr_unet: expected a number >= 0, got -1")``.
    """
    for dotted, rule in rules.items():
        value = obj
        for part in dotted.split("."):
            value = getattr(value, part)
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if item is None:
                continue
            if isinstance(item, bool) or not isinstance(item, (int, float)) or not rule.accepts(item):
                raise ValueError(f"{dotted}: expected {rule.describe(isinstance(item, int))}, got {_show(item)}")


def to_dict(obj: Any) -> Any:
    """A dataclass (nested) as plain dicts, for YAML copies and tensorboard."""
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj
