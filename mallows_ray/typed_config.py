"""Typed configuration, whatever the config: dataclasses read from plain mappings, YAML and dotted
`key=value` overrides, with errors that name the key and what would be valid.

    from_dict(cls, data, where)   mapping -> dataclass `cls`: unknown keys, types, `bounded` ranges, and the
                                  class's own `check(where)` / `from_mapping(data, where)` hooks
    to_dict(obj)                  the inverse, plain dicts and lists (YAML, Ray's `train_loop_config`)
    load_yaml / read_yaml_file    YAML 1.2 floats (`5e-4` is a number)
    apply_override(data, "a.b=v") a dotted override, its value parsed as YAML

The training config (`config.py`), the training sweep's (`tune/config.py`) and the bandit's
(`bandit/config.py`) are all read by this code.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A configuration key or value is invalid; the message names the key and the valid choices."""


def bounded(default: Any, low: float | None = None, high: float | None = None, *,
            open_low: bool = False, open_high: bool = False) -> Any:
    """A numeric field whose value `from_dict` checks against [low, high] (None: unbounded; `open_low` /
    `open_high`: that end excluded, e.g. (0, inf) for a scale). None values (an unset optional) pass."""
    return field(default=default, metadata={"range": (low, high, open_low, open_high)})


def _interval(low: float | None, high: float | None, open_low: bool, open_high: bool) -> str:
    return (f"{'(' if open_low or low is None else '['}{'-inf' if low is None else low}, "
            f"{'inf' if high is None else high}{')' if open_high or high is None else ']'}")


def _in_range(value: float, low: float | None, high: float | None, open_low: bool, open_high: bool) -> bool:
    above = low is None or (value > low if open_low else value >= low)
    below = high is None or (value < high if open_high else value <= high)
    return above and below


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check (and gently coerce, e.g. int -> float) `value` against the annotation `tp`."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            if dataclasses.is_dataclass(option) and isinstance(value, dict):  # a section: its own error is clearer
                return _coerce(value, option, where)
            try:
                return _coerce(value, option, where)
            except ConfigError:
                errors.append(_type_name(option))
        raise ConfigError(f"{where}: {value!r} is not valid; expected {' or '.join(errors)}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected null, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{where}: {value!r} is not allowed; expected {_type_name(tp)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for section {tp.__name__}, got {value!r}")
        return from_dict(tp, value, where)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):  # YAML reads .nan and .inf: a NaN learning rate trains NaN, silently
            raise ConfigError(f"{where}: {value!r} is not a finite number")
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp in (str, bool) and isinstance(value, tp):
        return value
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and ill-typed values."""
    if hasattr(cls, "from_mapping"):
        return cls.from_mapping(data, where or cls.__name__)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown key {prefix}{unknown[0]}; valid keys{' of ' + where if where else ''}: {', '.join(names)}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    for f in dataclasses.fields(cls):
        bounds = f.metadata.get("range")
        value = kwargs.get(f.name, f.default)
        if bounds and isinstance(value, (int, float)) and not isinstance(value, bool) and not _in_range(value, *bounds):
            key = f"{where}.{f.name}" if where else f.name
            raise ConfigError(f"{key}: {value!r} is out of range; expected a value in {_interval(*bounds)}")
    obj = cls(**kwargs)
    if hasattr(obj, "check"):  # a section's checks across its own fields
        obj.check(where or cls.__name__)
    return obj


def to_dict(obj: Any) -> Any:
    """The inverse of `from_dict`: plain dicts/lists ready for YAML or `train_loop_config`."""
    if hasattr(obj, "to_mapping"):
        return obj.to_mapping()
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list):
        return [to_dict(v) for v in obj]
    return obj


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 floats: plain YAML 1.1 reads `5e-4` and `1e5` as strings (it wants a
    dot in the mantissa and a signed exponent), and configs and command lines write learning rates that way."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    """YAML text as Python values (safe loading, YAML 1.2 floats); every config and sweep file is read here."""
    return yaml.load(text, Loader=_Loader)


def set_key(data: dict[str, Any], key: str, value: Any) -> None:
    """Set dotted `key` (e.g. `loss.beta`) in the nested mapping `data`, creating sections on the way; a
    number indexes into an existing list (`loss.terms.1.weight`)."""
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        node = node[_list_index(node, part, key)] if isinstance(node, list) else node.setdefault(part, {})
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"{key}: {part} is not a section")
    node[_list_index(node, leaf, key) if isinstance(node, list) else leaf] = value


def _list_index(items: list, part: str, key: str) -> int:
    if not part.isdigit() or int(part) >= len(items):
        raise ConfigError(f"{key}: {part!r} is not an index of a list of {len(items)} items (0 to {len(items) - 1})")
    return int(part)


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's error in one line: what is wrong and where (line and column, 1-based)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one `dotted.key=value` override in place; the value is parsed as YAML (`0.2`, `true`, `[a, b]`)."""
    key, sep, raw = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r} is not of the form section.key=value")
    try:
        value = load_yaml(raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"override {override!r}: the value is not valid YAML ({_yaml_problem(err)}); "
                          "quote a whole mapping or list, e.g. \"model.lora={rank: 8, alpha: 16}\"") from None
    set_key(data, key.strip(), value)


def read_yaml_file(path: str | Path) -> Any:
    """A YAML config file's values; a missing, unreadable or malformed file is a `ConfigError` naming it."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path} cannot be read: {err}") from None
    try:
        return load_yaml(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(err)}") from None
