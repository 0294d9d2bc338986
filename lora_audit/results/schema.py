"""Typed parsing of result JSON: one validator for every kind of result.

Each result kind is a tree of dataclasses whose field annotations ARE its schema. ``parse(cls,
obj)`` walks the JSON against those annotations and builds the dataclasses, checking every value
on the way: a string where a number belongs, a verdict that is not an object, a non-finite
number or a missing required field is an ``InputError`` naming the file and the exact path
(``safety.json: models['ad'].responses[0].refused: expected true/false or null, got "yes"``),
raised before anything is rendered. Fields the class does not know are ignored (a newer file
read by an older tool keeps working as far as it can); fields the file lacks take the dataclass
default, or fail when there is none.

Supported annotations: ``bool``, ``int``, ``float`` (ints accepted), ``str``, ``Any``, ``X | None``,
``list[X]``, ``dict[str, X]`` and nested dataclasses. A dataclass may define
``_from_json_hook(cls, raw: dict) -> dict`` to fill fields older files lack before parsing, and
check its values in ``__post_init__`` (an InputError or ValueError there is reported at its path).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from typing import Any, Union

from ..errors import InputError

_NONE = type(None)


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return "an object" if isinstance(value, dict) else "a list"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _expected(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not _NONE]
        return " or ".join(_expected(a) for a in args) + " or null"
    if origin is list:
        return "a list"
    if origin is dict:
        return "an object"
    if dataclasses.is_dataclass(tp):
        return "an object"
    return {bool: "true/false", int: "an integer", float: "a finite number", str: "a string"}.get(tp, str(tp))


class _Bad(Exception):
    def __init__(self, path: str, message: str):
        super().__init__(path, message)
        self.path, self.message = path, message


def _value(tp: Any, v: Any, path: str) -> Any:
    if tp is Any:
        return v
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if v is None and _NONE in args:
            return None
        errors = []
        for a in args:
            if a is _NONE:
                continue
            try:
                return _value(a, v, path)
            except _Bad as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        raise _Bad(path, f"expected {_expected(tp)}, got {_describe(v)}")
    if origin is list:
        if not isinstance(v, list):
            raise _Bad(path, f"expected {_expected(tp)}, got {_describe(v)}")
        (item,) = typing.get_args(tp) or (Any,)
        return [_value(item, x, f"{path}[{i}]") for i, x in enumerate(v)]
    if origin is dict:
        if not isinstance(v, dict):
            raise _Bad(path, f"expected {_expected(tp)}, got {_describe(v)}")
        _, item = typing.get_args(tp) or (str, Any)
        return {str(k): _value(item, x, f"{path}[{k!r}]") for k, x in v.items()}
    if dataclasses.is_dataclass(tp):
        return _dataclass(tp, v, path)
    if tp is bool:
        if not isinstance(v, bool):
            raise _Bad(path, f"expected true/false, got {_describe(v)}")
        return v
    if tp is int:
        if isinstance(v, bool) or not isinstance(v, int):
            if isinstance(v, float) and v.is_integer():
                return int(v)
            raise _Bad(path, f"expected an integer, got {_describe(v)}")
        return v
    if tp is float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise _Bad(path, f"expected a number, got {_describe(v)}")
        if not math.isfinite(v):
            raise _Bad(path, f"expected a finite number, got {v}")
        return float(v)
    if tp is str:
        if not isinstance(v, str):
            raise _Bad(path, f"expected a string, got {_describe(v)}")
        return v
    raise TypeError(f"schema: unsupported annotation {tp!r} at {path}")  # a bug in a result class


def _dataclass(cls: type, obj: Any, path: str) -> Any:
    if not isinstance(obj, dict):
        raise _Bad(path, f"expected an object, got {_describe(obj)}")
    hook = getattr(cls, "_from_json_hook", None)
    if hook is not None:
        obj = hook(dict(obj))
    hints = _hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        where = f"{path}.{f.name}" if path else f.name
        if f.name not in obj:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise _Bad(where, f"missing field {f.name!r} ({_expected(hints[f.name])})")
            continue
        kwargs[f.name] = _value(hints[f.name], obj[f.name], where)
    try:
        return cls(**kwargs)
    except (InputError, ValueError) as e:  # a class's own checks (__post_init__): named at this path
        raise _Bad(path, str(e)) from None


def parse(cls: type, obj: Any, source: str = "result", *, what: str = "result", path: str = "") -> Any:
    """Build the dataclass ``cls`` from the JSON value ``obj``; InputError naming ``source``, the
    kind of file (``what``) and the path of the first value that does not fit the schema."""
    try:
        return _dataclass(cls, obj, path)
    except _Bad as e:
        raise InputError(f"{source}: malformed {what}: {e.path or 'top level'}: {e.message}") from None
