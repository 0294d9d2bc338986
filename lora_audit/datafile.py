"""Users' line-oriented data files (prompt sets, training data, refusal-marker lists, templates):
their text and JSON / JSONL content, with errors that name the file and the line.

- ``read_text``: the bytes come from ``lora_audit.io.read_user_bytes`` (regular files only, size
  limit); the text must be UTF-8 (a BOM is dropped). Invalid UTF-8, a UTF-16 file and NUL bytes
  (a binary file) are ``FormatError``s naming the line.
- ``parse_json`` / ``parse_jsonl``: JSON with NaN/Infinity refused (they are not JSON) and
  duplicate keys refused (``json`` would silently keep the last one and drop a prompt or a
  category). JSONL lines are split on ``\\n`` only: a JSON string may hold U+2028 and other
  characters that ``str.splitlines`` would break the line at.
- ``check_chars``: a per-item character limit (a prompt, a training row), whose message says
  which option raises it.
"""

from __future__ import annotations

import json
import os
import unicodedata
from typing import Any

from .errors import FormatError, InputError
from .io import read_user_bytes

_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


def read_text(path: str | os.PathLike, what: str) -> str:
    """The UTF-8 text of a user's file (``what``: "prompt file", ...); see the module docstring."""
    data = read_user_bytes(path, what)
    if data.startswith(_UTF16_BOMS):
        raise FormatError(f"{path}: the {what} is UTF-16 text; save it as UTF-8")
    nul = data.find(b"\x00")
    if nul >= 0:
        line = data.count(b"\n", 0, nul) + 1
        raise FormatError(f"{path}: line {line} contains a NUL byte: this is a binary "
                          f"file (or UTF-16/32 text), not a {what}; save it as UTF-8 text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - data.rfind(b"\n", 0, e.start)
        raise FormatError(f"{path}: line {line} is not UTF-8 text (byte {col} of the line: {e.reason}); "
                          f"the {what} must be saved as UTF-8") from None


def lines(text: str) -> list[str]:
    """The lines of ``text`` as a text editor numbers them (split on ``\\n``, a ``\\r`` before it dropped)."""
    return [ln.removesuffix("\r") for ln in text.split("\n")]


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON (write null or a number)")


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise ValueError(f"the key {key!r} appears twice in one object")
        seen.add(key)
    return dict(pairs)


def parse_json(text: str, path: str | os.PathLike, line: int | None = None) -> Any:
    """``text`` parsed as JSON; FormatError naming ``path`` (and ``line`` for one JSONL line)."""
    where = f"{path}: line {line} is" if line is not None else f"{path}:"
    try:
        return json.loads(text, parse_constant=_refuse_constant, object_pairs_hook=_refuse_duplicate_keys)
    except json.JSONDecodeError as e:
        at = f"column {e.colno}" if line is not None else f"line {e.lineno}, column {e.colno}"
        raise FormatError(f"{where} not valid JSON ({at}: {e.msg})") from None
    except ValueError as e:
        raise FormatError(f"{where} not valid JSON ({e})") from None
    except RecursionError:
        raise FormatError(f"{where} not valid JSON (nested too deeply)") from None


_KINDS = {dict: "a JSON object", list: "a JSON list", str: "a JSON string", bool: "true/false",
          int: "a JSON number", float: "a JSON number", type(None): "null"}


def json_kind(value: Any) -> str:
    """'a JSON list', 'a JSON number', ... for messages about a JSON value of the wrong kind."""
    return _KINDS.get(type(value), type(value).__name__)


def parse_jsonl(text: str, path: str | os.PathLike, accepted: str) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line; FormatError naming the line when a line is
    not JSON or not an object (``accepted`` says what a line must look like)."""
    rows = []
    for i, line in enumerate(lines(text), 1):
        if not line.strip():
            continue
        obj = parse_json(line, path, i)
        if not isinstance(obj, dict):
            raise FormatError(f"{path}: line {i} is not a JSON object (got {json_kind(obj)}); "
                              f"each line must be an object {accepted}")
        rows.append((i, obj))
    return rows


def is_blank(text: str) -> bool:
    """True when ``text`` holds only whitespace and invisible characters (controls, zero-width
    and other format characters): nothing a model or a reader would see."""
    return all(c.isspace() or unicodedata.category(c) in ("Cc", "Cf") for c in text.strip())


def check_limit(max_chars: int | None, name: str) -> None:
    """InputError unless ``max_chars`` is None (no limit) or a positive number of characters."""
    if max_chars is not None and (isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 1):
        raise InputError(f"{name} must be a positive number of characters (or None for no limit), "
                         f"got {max_chars!r}")


def check_chars(text: str, max_chars: int | None, where: str, what: str, option: str) -> None:
    """FormatError when ``text`` is longer than ``max_chars`` (None: no limit); ``where`` names the
    file and line, ``option`` the CLI option that raises the limit."""
    if max_chars is not None and len(text) > max_chars:
        raise FormatError(f"{where}: the {what} is {len(text):,} characters, over the limit of {max_chars:,} "
                          f"(raise it with {option} N)")
