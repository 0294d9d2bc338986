"""Text from untrusted inputs (tensor and module names, file names, prompts, model outputs) made
safe to show, on a terminal and in reports.

A checkpoint can name a tensor ``"\\x1b[2J...all clean"``: printed raw, the escape sequence clears
the screen and the rest of the name fakes a result. Bidirectional controls (U+202E ...) reorder
what a reader sees in a terminal or a browser. ``printable`` shows every such character as a
visible escape (``\\x1b``, ``\\u202e``) instead of letting it act, so the reader sees that the
name is odd and what is in it. Tabs always pass; line breaks pass only where the text is allowed
to span lines (a model's response), never inside a name printed on one line.
"""

from __future__ import annotations

import re
from typing import Any

# C0 controls but tab/newline, DEL, C1 controls; bidi embeddings/overrides/isolates and marks;
# zero-width and BOM characters that hide text; line/paragraph separators; lone surrogates (a file
# name that is not UTF-8, as Python decodes it: "\udcff" for the byte 0xff), which cannot be encoded.
_ALWAYS = "\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff\ud800-\udfff"
_ONE_LINE = re.compile(f"[\n{_ALWAYS}]")
_MULTI_LINE = re.compile(f"[{_ALWAYS}]")


def _escape(m: re.Match) -> str:
    c = m.group(0)
    return f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}"


def printable(text: Any, *, multiline: bool = False) -> str:
    """``text`` as a string whose control, bidi and invisible characters are shown as escapes.

    ``multiline=False`` (names, paths, one-line messages) also escapes line breaks; ``True``
    keeps ``\\n`` (responses, multi-line messages). ``\\r`` is always escaped: on a terminal it
    returns to the start of the line and lets the rest overwrite what came before.
    """
    s = "" if text is None else str(text)
    return (_MULTI_LINE if multiline else _ONE_LINE).sub(_escape, s)


# Spreadsheet programs run a cell that starts with one of these as a formula (CSV injection).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
# A formula trigger at the start of the cell or of any line inside it: a reader that splits lines
# itself (or a spreadsheet importing a multi-line cell) would otherwise see a new cell start there.
_TRIGGER_AT_LINE_START = re.compile("(?:^|(?<=\n))(?=[=+\\-@\t\r])")


def csv_cell(value: Any) -> Any:
    """A CSV cell a spreadsheet shows as text and a terminal prints inertly.

    Numbers and booleans pass unchanged; None and NaN become empty cells; anything else is made
    text: control, bidi and invisible characters are shown as escapes (``printable``; line breaks
    are kept, CR is escaped), and a formula trigger (``= + - @``, tab) at the start of the cell or
    of any line inside it gets a leading apostrophe (OWASP's advice)."""
    import math
    import numbers

    if value is None:
        return ""
    if isinstance(value, numbers.Real):  # bool, int, float and numpy's numbers
        return "" if math.isnan(value) else value
    return _TRIGGER_AT_LINE_START.sub("'", printable(value, multiline=True))


def sci(x: float) -> str:
    """A number in short scientific notation, without trailing zeros: 0.0005 -> "5e-4",
    3e-05 -> "3e-5", 0.0015 -> "1.5e-3" (learning rates in run names and on figure axes)."""
    mantissa, exponent = f"{x:.6e}".split("e")
    return f"{float(mantissa):g}e{int(exponent)}"
