"""Typed configuration: YAML files and `key=value` overrides turned into validated dataclasses.

One mechanism for every config in the project (training, model hyperparameters, sweeps, ensembles):
unknown keys are errors naming the key and where it came from, values are checked against the
field's type, and nothing is merged by hand.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from msa.platform.core.errors import MsaError


class ConfigLoader(yaml.SafeLoader):
    """SafeLoader that reads ``3e-4`` as a number (YAML 1.2), not as the string YAML 1.1 makes it."""


ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+"
               r"|\.[0-9_]+(?:[eE][-+]?[0-9]+)?|\.(?:inf|Inf|INF))$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def load_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """Read a YAML file that must hold a mapping; an empty file is an empty mapping."""
    path = Path(path)
    if not path.is_file():
        raise MsaError(f"config file not found: {path}")
    try:
        data = yaml.load(path.read_text(), Loader=ConfigLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise MsaError(f"{path}: malformed YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise MsaError(f"{path}: expected a mapping of keys to values, got {type(data).__name__}")
    return data


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """Turn ``["lr=0.01", "model_config.hidden=32"]`` into a nested mapping (values parsed as YAML)."""
    result: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise MsaError(f"override {pair!r} is not of the form key=value")
        try:
            value = yaml.load(raw, Loader=ConfigLoader) if raw else ""  # noqa: S506
        except yaml.YAMLError:
            value = raw
        node = result
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise MsaError(f"override {pair!r} sets a key inside {part!r}, which is not a mapping")
        node[leaf] = value
    return result


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Recursive merge: mappings merge key by key, anything else in `overrides` replaces."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _check_value(value: Any, annotation: Any, where: str) -> Any:
    """Return `value` converted to `annotation`, or raise naming `where`."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(annotation):
            try:
                return _check_value(value, option, where)
            except MsaError as exc:
                errors.append(str(exc))
        raise MsaError(errors[0])
    if annotation is type(None):
        if value is None:
            return None
        raise MsaError(f"{where}: expected null, got {value!r}")
    if origin is typing.Literal:
        choices = typing.get_args(annotation)
        if value not in choices:
            raise MsaError(f"{where}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise MsaError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if origin is list or annotation is list:
        if not isinstance(value, list):
            raise MsaError(f"{where}: expected a list, got {value!r}")
        (item_type,) = typing.get_args(annotation) or (Any,)
        return [_check_value(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
    if annotation is Any:
        return value
    if dataclasses.is_dataclass(annotation):
        return build_dataclass(annotation, value, where=where)
    if annotation is bool:
        if not isinstance(value, bool):
            raise MsaError(f"{where}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise MsaError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise MsaError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise MsaError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {annotation!r} at {where}")


def build_dataclass(cls: type, values: dict[str, Any], *, where: str) -> Any:
    """Instantiate dataclass `cls` from `values`, rejecting unknown keys and ill-typed values.

    Example:
        >>> @dataclasses.dataclass
        ... class C:
        ...     lr: float = 0.1
        >>> build_dataclass(C, {"lr": 1}, where="demo").lr
        1.0
    """
    if not isinstance(values, dict):
        raise MsaError(f"{where}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(map(str, set(values) - fields))
    if unknown:
        raise MsaError(
            f"{where}: unknown key {unknown[0]!r} (known keys: {', '.join(sorted(fields))})"
        )
    checked = {k: _check_value(v, hints[k], f"{where}: key {k!r}") for k, v in values.items()}
    return cls(**checked)


def to_plain(obj: Any) -> Any:
    """A dataclass as nested plain dicts/lists, fit for YAML and JSON."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj
