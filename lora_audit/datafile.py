"""Users' line-oriented data files (prompt sets, training data, refusal-marker lists, templates):
their lines and JSONL content, with errors that name the file and the line. The text itself is
read with ``lora_audit.io.read_user_text`` (regular files only, size limit, UTF-8) and JSON parsed
with ``lora_audit.io.parse_json`` (no NaN, no duplicate keys).

- ``parse_jsonl``: JSONL lines are split on ``\\n`` only: a JSON string may hold U+2028 and other
  characters that ``str.splitlines`` would break the line at.
- ``check_chars``: a per-item character limit (a prompt, a training row), whose message says
  which option raises it.
"""

from __future__ import annotations

import os
import unicodedata

from .errors import FormatError, InputError
from .io import json_kind, parse_json


def lines(text: str) -> list[str]:
    """The lines of ``text`` as a text editor numbers them (split on ``\\n``, a ``\\r`` before it dropped)."""
    return [ln.removesuffix("\r") for ln in text.split("\n")]


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
