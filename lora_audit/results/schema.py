"""Typed parsing of result JSON and its JSON Schema: one walker over the result classes' annotations.

Each result kind is a tree of dataclasses whose field annotations ARE its schema. ``parse(cls,
obj)`` walks the JSON against those annotations and builds the dataclasses, checking every value
on the way: a string where a number belongs, a verdict that is not an object, a non-finite or
out-of-range number, an interval whose low end lies above its high end, or a missing required
field is an ``InputError`` naming the file and the exact path (``safety.json: models['ad'].
refusal_rate: expected a number in [0, 1], got 1.5``), raised before anything is rendered. Fields
the class does not know are ignored (a newer file read by an older tool keeps working as far as
it can); fields the file lacks take the dataclass default, or fail when there is none.

``json_schema(cls)`` turns the same annotations into a JSON Schema (draft 2020-12) of what
``to_json`` writes: the shipped ``docs/schema/<kind>.schema.json`` files, so that the parser and
the published contract cannot disagree.

Supported annotations: ``bool``, ``int``, ``float`` (ints accepted), ``str``, ``Any``, ``X | None``,
``list[X]``, ``dict[str, X]``, ``Literal[...]``, nested dataclasses, and ``Annotated[X, Range(...)]``
/ ``Annotated[list[float], Interval(...)]`` for the values a field can possibly take. A dataclass
may define

- ``_from_json_hook(cls, raw: dict) -> dict`` to fill fields older files lack before parsing,
- ``__post_init__`` checks across fields (an InputError or ValueError there is reported at its path),
- ``JSON_EXTRA: ClassVar[dict[str, type]]``: values its ``to_json`` writes that are computed from
  its fields (``total_intruders``): described in the schema, and checked (type and range) when a
  file carries them, then dropped,
- ``JSON_OMIT: ClassVar[tuple[str, ...]]``: fields its ``to_json`` does not write,
- ``JSON_NAMES: ClassVar[dict[str, str]]``: field -> key in the JSON, where the key cannot be a
  Python name (mitigate's ``"lambda"``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from typing import Annotated, Any, Literal, Union

from ..errors import InputError

_NONE = type(None)


# ---- ranges ---------------------------------------------------------------------------------------
def _num(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


@dataclasses.dataclass(frozen=True)
class Range:
    """The values a number can take: ``ge`` <= x <= ``le``, ``gt`` < x < ``lt`` (each optional)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def holds(self, v: float) -> bool:
        return ((self.ge is None or v >= self.ge) and (self.gt is None or v > self.gt)
                and (self.le is None or v <= self.le) and (self.lt is None or v < self.lt))

    def text(self) -> str:
        lo = f"[{_num(self.ge)}" if self.ge is not None else f"({_num(self.gt)}" if self.gt is not None else None
        hi = f"{_num(self.le)}]" if self.le is not None else f"{_num(self.lt)})" if self.lt is not None else None
        if lo and hi:
            return f"in {lo}, {hi}"
        if lo:
            return (">= " if lo[0] == "[" else "> ") + lo[1:]
        return ("<= " if hi[-1] == "]" else "< ") + hi[:-1] if hi else "any"

    def schema(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, name in (("ge", "minimum"), ("gt", "exclusiveMinimum"), ("le", "maximum"), ("lt", "exclusiveMaximum")):
            if getattr(self, key) is not None:
                out[name] = getattr(self, key)
        return out


@dataclasses.dataclass(frozen=True)
class Interval:
    """A ``[low, high]`` pair of numbers in ``range`` with low <= high (a confidence interval)."""

    range: Range = Range()


# The ranges the result kinds share.
NONNEG = Range(ge=0)
POSITIVE = Range(gt=0)
AT_LEAST_1 = Range(ge=1)
UNIT = Range(ge=0, le=1)  # rates, shares, probabilities
OPEN_UNIT = Range(gt=0, lt=1)  # epsilon: a cosine threshold strictly inside (0, 1)
SIGNED_UNIT = Range(ge=-1, le=1)  # differences of rates
# |cos| of unit vectors computed in float32 can exceed 1 by rounding (1 + a few 1e-7); 2.5 cannot
COS = Range(ge=0, le=1 + 1e-4)

Count = Annotated[int, NONNEG]
Rate = Annotated[float, UNIT]
Cos = Annotated[float, COS]
Epsilon = Annotated[float, OPEN_UNIT]
NonNeg = Annotated[float, NONNEG]
RateInterval = Annotated[list[float], Interval(UNIT)]
SignedRate = Annotated[float, SIGNED_UNIT]
DiffInterval = Annotated[list[float], Interval(SIGNED_UNIT)]


# ---- parsing --------------------------------------------------------------------------------------
@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


@functools.cache
def _extra(cls: type) -> dict[str, Any]:
    """``cls.JSON_EXTRA`` with its string annotations resolved in the class's module."""
    raw = getattr(cls, "JSON_EXTRA", None) or {}
    if not raw:
        return {}
    holder = types.new_class(f"{cls.__name__}Extra", (), {})
    holder.__annotations__ = dict(raw)
    holder.__module__ = cls.__module__
    return typing.get_type_hints(holder, include_extras=True)


def describe(value: Any) -> str:
    """A JSON value as a message shows it (short; containers by kind)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return "an object" if isinstance(value, dict) else "a list"
    if isinstance(value, int) and abs(value) >= 10 ** 15:
        return f"an integer of {len(str(abs(value)))} digits"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _split(tp: Any) -> tuple[Any, tuple]:
    """(the type, its Annotated metadata)."""
    if typing.get_origin(tp) is Annotated:
        base, *meta = typing.get_args(tp)
        return base, tuple(meta)
    return tp, ()


def _expected(tp: Any) -> str:
    tp, meta = _split(tp)
    rng = next((m for m in meta if isinstance(m, Range)), None)
    if rng is not None and tp in (int, float):
        return f"{'an integer' if tp is int else 'a number'} {rng.text()}"
    if any(isinstance(m, Interval) for m in meta):
        iv = next(m for m in meta if isinstance(m, Interval))
        return f"an interval [low, high] with low <= high, both {iv.range.text()}"
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not _NONE]
        return " or ".join(_expected(a) for a in args) + (" or null" if _NONE in typing.get_args(tp) else "")
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
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


def _interval(iv: Interval, v: Any, path: str) -> list[float]:
    want = f"expected an interval [low, high] with low <= high, both {iv.range.text()}"
    if not isinstance(v, list) or len(v) != 2:
        raise _Bad(path, f"{want}, got {describe(v) if not isinstance(v, list) else f'{len(v)} values'}")
    lo, hi = (_value(float, x, f"{path}[{i}]") for i, x in enumerate(v))
    if not (iv.range.holds(lo) and iv.range.holds(hi)) or lo > hi:
        raise _Bad(path, f"{want}, got [{_num(lo)}, {_num(hi)}]")
    return [lo, hi]


def _value(tp: Any, v: Any, path: str) -> Any:
    tp, meta = _split(tp)
    for m in meta:
        if isinstance(m, Interval):
            return _interval(m, v, path)
    out = _plain(tp, v, path)
    for m in meta:
        if isinstance(m, Range) and out is not None and not m.holds(out):
            raise _Bad(path, f"expected {_expected(Annotated[tp, m])}, got {describe(v)}")
    return out


def _plain(tp: Any, v: Any, path: str) -> Any:
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
        raise _Bad(path, f"expected {_expected(tp)}, got {describe(v)}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if isinstance(v, bool) or not isinstance(v, (str, int)) or v not in allowed:
            raise _Bad(path, f"expected {_expected(tp)}, got {describe(v)}")
        return v
    if origin is list:
        if not isinstance(v, list):
            raise _Bad(path, f"expected {_expected(tp)}, got {describe(v)}")
        (item,) = typing.get_args(tp) or (Any,)
        return [_value(item, x, f"{path}[{i}]") for i, x in enumerate(v)]
    if origin is dict:
        if not isinstance(v, dict):
            raise _Bad(path, f"expected {_expected(tp)}, got {describe(v)}")
        _, item = typing.get_args(tp) or (str, Any)
        return {str(k): _value(item, x, f"{path}[{k!r}]") for k, x in v.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(v, tp):  # type: ignore[arg-type]  # already built (a result's provenance, parsed on its own)
            return v
        return _dataclass(tp, v, path)  # type: ignore[arg-type]
    if tp is bool:
        if not isinstance(v, bool):
            raise _Bad(path, f"expected true/false, got {describe(v)}")
        return v
    if tp is int:
        if isinstance(v, bool) or not isinstance(v, int):
            if isinstance(v, float) and v.is_integer():
                return int(v)
            raise _Bad(path, f"expected an integer, got {describe(v)}")
        return v
    if tp is float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise _Bad(path, f"expected a number, got {describe(v)}")
        try:
            x = float(v)
        except OverflowError:  # an integer of hundreds of digits
            raise _Bad(path, f"expected a finite number, got {describe(v)}") from None
        if not math.isfinite(x):
            raise _Bad(path, f"expected a finite number, got {v}")
        return x
    if tp is str:
        if not isinstance(v, str):
            raise _Bad(path, f"expected a string, got {describe(v)}")
        return v
    raise TypeError(f"schema: unsupported annotation {tp!r} at {path}")  # a bug in a result class


def _dataclass(cls: type, obj: Any, path: str) -> Any:
    if not isinstance(obj, dict):
        raise _Bad(path, f"expected an object, got {describe(obj)}")
    hook = getattr(cls, "_from_json_hook", None)
    if hook is not None:
        obj = hook(dict(obj))
    hints = _hints(cls)
    names = getattr(cls, "JSON_NAMES", None) or {}
    kwargs = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key = names.get(f.name, f.name)
        where = f"{path}.{key}" if path else key
        if key not in obj:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise _Bad(where, f"missing field {key!r} ({_expected(hints[f.name])})")
            continue
        kwargs[f.name] = _value(hints[f.name], obj[key], where)
    for name, tp in _extra(cls).items():  # computed on write: checked when present, not kept
        if name in obj:
            _value(tp, obj[name], f"{path}.{name}" if path else name)
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
    except RecursionError:  # JSON nested deeper than any result kind
        raise InputError(f"{source}: malformed {what}: nested too deeply") from None


# ---- JSON Schema ----------------------------------------------------------------------------------
def _schema(tp: Any, defs: dict[str, Any]) -> dict[str, Any]:
    tp, meta = _split(tp)
    for m in meta:
        if isinstance(m, Interval):
            return {"type": "array", "items": {"type": "number", **m.range.schema()}, "minItems": 2, "maxItems": 2,
                    "description": "[low, high] with low <= high"}
    out = _schema_plain(tp, defs)
    for m in meta:
        if isinstance(m, Range):
            out = {**out, **m.schema()}
    return out


def _schema_plain(tp: Any, defs: dict[str, Any]) -> dict[str, Any]:
    if tp is Any:
        return {}
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        parts = [_schema(a, defs) if a is not _NONE else {"type": "null"} for a in typing.get_args(tp)]
        return {"anyOf": parts}
    if origin is Literal:
        return {"enum": list(typing.get_args(tp))}
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        return {"type": "array", "items": _schema(item, defs)}
    if origin is dict:
        _, item = typing.get_args(tp) or (str, Any)
        return {"type": "object", "additionalProperties": _schema(item, defs)}
    if dataclasses.is_dataclass(tp):
        name = tp.__name__  # type: ignore[union-attr]
        if name not in defs:
            defs[name] = {}  # placeholder: recursive references end here
            defs[name] = object_schema(tp, defs)  # type: ignore[arg-type]
        return {"$ref": f"#/$defs/{name}"}
    simple = {bool: "boolean", int: "integer", float: "number", str: "string"}
    if tp in simple:
        return {"type": simple[tp]}
    raise TypeError(f"schema: unsupported annotation {tp!r}")


def _doc(cls: type) -> str:
    doc = (cls.__doc__ or "").strip()
    if doc.startswith(cls.__name__ + "("):  # dataclass's generated signature, not a description
        return ""
    return " ".join(doc.split("\n\n")[0].split())


def object_schema(cls: type, defs: dict[str, Any], *, written: dict[str, Any] | None = None) -> dict[str, Any]:
    """The schema of the JSON object ``cls.to_json`` (or ``asdict``) writes: its fields but those
    in ``JSON_OMIT``, its ``JSON_EXTRA`` values, every one required (written, possibly null).
    ``written``: further properties first (a result's provenance block)."""
    hints = _hints(cls)
    omit = set(getattr(cls, "JSON_OMIT", ()) or ())
    names = getattr(cls, "JSON_NAMES", None) or {}
    props: dict[str, Any] = {}
    for name, tp in (written or {}).items():
        props[name] = tp
    for f in dataclasses.fields(cls):
        if f.name not in omit:
            props[names.get(f.name, f.name)] = _schema(hints[f.name], defs)
    for name, tp in _extra(cls).items():
        props[name] = _schema(tp, defs)
    order = getattr(cls, "JSON_ORDER", None)
    if order:
        props = {k: props[k] for k in order if k in props} | {k: v for k, v in props.items() if k not in order}
    out: dict[str, Any] = {"type": "object"}
    if _doc(cls):
        out["description"] = _doc(cls)
    out.update(properties=props, required=list(props))
    return out
