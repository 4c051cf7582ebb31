"""Typed dataclass configs <-> YAML, with `a.b.c=value` command-line overrides.

Configs are plain dataclasses (docstring under each field, checks in `__post_init__`). This module
builds them from nested dicts with type checks that name the offending key, applies overrides, and
writes the resolved config back (atomically) into a run directory.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from dqo_megatron.outputs import atomic_write_text  # noqa: F401 (re-exported: callers import it from here)

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type, or inconsistent."""

    key: str | None = None
    """The dotted key the error is about, when one key is (`load_config` tells a command-line override's
    errors from the file's by it)."""
    whole_section: bool = False
    """True when the error is a check across the keys of section `key` ("" the top level)."""


def _keyed(message: str, key: str) -> ConfigError:
    exc = ConfigError(message)
    exc.key = key
    return exc


def raise_problems(problems: list[str]) -> None:
    """Raise one ConfigError naming every problem found, so a user fixes them all in one edit."""
    if problems:
        raise ConfigError("; ".join(problems))


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert one leaf value against its annotation; raise ConfigError naming `where`."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        if len(errors) == 1:  # Optional[X]: X's own message says more ("a finite number", the choices, ...)
            raise _keyed(errors[0], where)
        raise _keyed(f"{where}: expected {_type_name(tp)}, got {value!r}", where)
    if origin is Literal:
        choices = get_args(tp)
        if isinstance(value, bool):  # YAML 1.1 reads off/no/false and on/yes/true as booleans
            spelled = [c for c in (("on", "yes", "true") if value else ("off", "no", "false")) if c in choices]
            if spelled:
                return spelled[0]
        if value in choices and not isinstance(value, bool):
            return value
        raise _keyed(f"{where}: expected one of {_type_name(tp)}, got {value!r}", where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _keyed(f"{where}: expected a list, got {value!r}", where)
        (item_tp, *_rest) = get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise _keyed(f"{where}: expected a mapping for {tp.__name__}, got {value!r}", where)
        return from_dict(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _keyed(f"{where}: expected true/false, got {value!r}", where)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _keyed(f"{where}: expected an integer, got {value!r}", where)
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML reads "1e-5" as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise _keyed(f"{where}: expected a number, got {value!r}", where)
        if not math.isfinite(number):  # no setting means anything at inf or NaN (train.lr=inf trains garbage)
            raise _keyed(f"{where}: expected a finite number, got {value!r}", where)
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise _keyed(f"{where}: expected a string, got {value!r}", where)
    if tp is Path:
        return Path(value)
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass `cls` from a nested dict; unknown keys and wrong types raise ConfigError.

    `where` is the dotted prefix used in messages (e.g. ``"model"``).
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {data!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{where}.{key}" if where else key
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise _keyed(f"unknown config key '{dotted}'{hint}; valid keys here: {', '.join(sorted(fields))}", dotted)
        kwargs[key] = _coerce(value, hints[key], dotted)
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        if exc.key is not None:
            raise
        # a check across the section's keys: `key` names the section, `whole_section` says so
        section = _keyed(f"{where}: {exc}" if where and not str(exc).startswith(where) else str(exc), where)
        section.whole_section = True
        raise section from None
    except TypeError as exc:  # a required field is missing
        raise ConfigError(f"{where or cls.__name__}: {exc}") from None


def to_dict(config: Any) -> dict[str, Any]:
    """Nested plain-Python dict of a dataclass config (tuples become lists, paths strings)."""

    def convert(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: convert(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        if isinstance(value, Path):
            return str(value)
        return value

    return convert(config)


def apply_overrides(data: dict[str, Any], overrides: typing.Iterable[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (values parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override '{item}' has an empty key part")
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override '{item}': '{part}' is a value, not a section")
            node = child
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override '{item}': value is not valid YAML ({exc})") from None
    return data


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides=()) -> T:
    """Load `cls` from a YAML file (optional) plus overrides; errors name the file and key."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"config file {path} is a directory: give the YAML file (e.g. {path / 'config.yaml'})")
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not a YAML config (not UTF-8 text at byte {exc.start})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    overrides = list(overrides)
    apply_overrides(data, overrides)
    try:
        return from_dict(cls, data)
    except ConfigError as exc:
        raise ConfigError(_blame(exc, path, overrides)) from None


def _blame(exc: ConfigError, path: Path | None, overrides: list[str]) -> str:
    """`exc`'s message prefixed with where the bad value came from: the command-line override that set
    the key, else the YAML file; a check across a section's keys names the file and the overrides in it."""

    def sets(item: str) -> bool:  # the override sets the key, a section above it, or (whole_section) one below
        given = item.split("=", 1)[0].strip()
        key = exc.key
        return key is not None and (
            given == key
            or key.startswith(given + ".")
            or (exc.whole_section and (key == "" or given.startswith(key + ".")))
        )

    given = [item for item in overrides if sets(item)]
    if not given:
        return f"{path}: {exc}" if path else str(exc)
    if not exc.whole_section:
        return f"command-line override '{given[-1]}': {exc}"
    items = ", ".join(f"'{item}'" for item in given)
    return (
        f"{path} with command-line override(s) {items}: {exc}" if path else f"command-line override(s) {items}: {exc}"
    )


def save_config(config: Any, run_dir: str | os.PathLike, name: str = "config.yaml") -> Path:
    """Write the resolved config as YAML into `run_dir` (atomically); return the file's path."""
    target = Path(run_dir) / name
    atomic_write_text(target, yaml.safe_dump(to_dict(config), sort_keys=False))
    return target
