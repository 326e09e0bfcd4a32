"""Typed settings: every dataclass field is checked against its annotation, in this one place.

An annotation says what a field accepts: `int`, `float`, `bool`, `str`, `list[...]`, `dict[...]`,
`X | None`, `Literal["a", "b"]` (string options), a nested dataclass, or `Annotated[int, Range(1)]`
(bounds; aliases below). `check_value` validates (and mildly coerces: an int where a float is expected,
an integral float where an int is) one value; `check` walks a whole nested dataclass. Both raise one
ConfigError naming the dotted path of the first bad field, so a run fails before anything starts.
"""
from __future__ import annotations

import dataclasses
import keyword
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union, get_args, get_origin, get_type_hints

from parallel.errors import ConfigError


@dataclass(frozen=True)
class Range:
    """Inclusive bounds (None: unbounded); `above` / `below` make the lower / upper bound exclusive."""

    lo: float | None = None
    hi: float | None = None
    above: bool = False
    below: bool = False

    def describe(self) -> str:
        parts = []
        if self.lo is not None:
            parts.append(f"{'>' if self.above else '>='} {self.lo:g}")
        if self.hi is not None:
            parts.append(f"{'<' if self.below else '<='} {self.hi:g}")
        return " and ".join(parts)

    def holds(self, v) -> bool:
        if self.lo is not None and (v <= self.lo if self.above else v < self.lo):
            return False
        return self.hi is None or (v < self.hi if self.below else v <= self.hi)


PositiveInt = Annotated[int, Range(1)]
NonNegInt = Annotated[int, Range(0)]
PositiveFloat = Annotated[float, Range(0, above=True)]
NonNegFloat = Annotated[float, Range(0)]
Fraction = Annotated[float, Range(0, 1)]

_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list",
          dict: "a mapping"}


def _fail(path: str, what: str, value) -> typing.NoReturn:
    raise ConfigError(f"{path} must be {what}, got {value!r}")


def check_value(value, typ, path: str):
    """`value` checked against annotation `typ`; returns it (coerced where harmless)."""
    origin = get_origin(typ)
    if origin is Annotated:
        base, *marks = get_args(typ)
        value = check_value(value, base, path)
        for m in marks:
            if isinstance(m, Range) and value is not None and not m.holds(value):
                _fail(path, m.describe(), value)
        return value
    if origin in (Union, types.UnionType):
        options = get_args(typ)
        if value is None and type(None) in options:
            return None
        rest = [t for t in options if t is not type(None)]
        if len(rest) == 1:
            return check_value(value, rest[0], path)
        for t in rest:
            try:
                return check_value(value, t, path)
            except ConfigError:
                pass
        _fail(path, " or ".join(_describe(t) for t in rest), value)
    if origin is Literal:
        if value not in get_args(typ):
            _fail(path, "one of " + ", ".join(str(a) for a in get_args(typ)), value)
        return value
    if dataclasses.is_dataclass(typ):
        if isinstance(value, typ):
            check(value, path + ".")
            return value
        if not isinstance(value, dict):
            _fail(path, "a mapping", value)
        return from_dict(typ, value, path + ".")
    if typ is Any:
        return value
    if origin in (list, dict):
        if not isinstance(value, origin):
            _fail(path, _NAMES[origin], value)
        args = get_args(typ)
        if origin is list and args:
            return [check_value(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
        if origin is dict and args:
            return {check_value(k, args[0], f"{path} key"): check_value(v, args[1], f"{path}.{k}")
                    for k, v in value.items()}
        return value
    if typ is bool:
        if not isinstance(value, bool):
            _fail(path, _NAMES[bool], value)
        return value
    if typ is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            _fail(path, _NAMES[int], value)
        return value
    if typ is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            _fail(path, _NAMES[float], value)
        return float(value)
    if typ in (str, list, dict):
        if not isinstance(value, typ):
            _fail(path, _NAMES[typ], value)
        return value
    return value  # an annotation this checker does not know (e.g. a torch type): left to the class


def _describe(typ) -> str:
    if get_origin(typ) is Annotated:
        return _describe(get_args(typ)[0])
    return _NAMES.get(get_origin(typ) or typ, getattr(typ, "__name__", str(typ)))


def _hints(cls) -> dict:
    return get_type_hints(cls, include_extras=True)


def from_dict(cls, data: dict, where: str = ""):
    """A (nested) dataclass from a dict: unknown keys are rejected and every value is checked against
    its field's annotation before the class is built."""
    if not isinstance(data, dict):
        raise ConfigError(f"config section {where.rstrip('.') or '<root>'} must be a mapping, got {data!r}")
    hints = _hints(cls)
    # a key that is a Python keyword (rollout.async) names the field with a trailing underscore (PEP 8)
    data = {(f"{k}_" if isinstance(k, str) and keyword.iskeyword(k) else k): v for k, v in data.items()}
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"unknown config key {where + sorted(unknown)[0]!r} (known: {', '.join(sorted(known))})")
    kwargs = {name: check_value(value, hints[name], where + name) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"bad config section {where.rstrip('.') or '<root>'}: {e}") from None


def check(obj, where: str = "") -> None:
    """Check every field of a dataclass built in code (from_dict checks as it builds)."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        setattr(obj, f.name, check_value(value, hints[f.name], where + f.name))
    post = getattr(obj, "__post_init__", None)
    if post is not None:
        post()
