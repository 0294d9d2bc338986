"""Text that goes into a report: every string that comes from a model, a prompt set, a checkpoint
or a file name is shown as text, never as markup.

HTML escaping itself is jinja2's autoescape (``render``); before that, ``clean`` turns control,
bidi and invisible characters into visible escapes (``lora_audit.text.printable``: a U+202E in a
model name would otherwise reverse what the reader sees). ``md_escape`` does the same for
Markdown, where no autoescape exists.
"""

from __future__ import annotations

import re
from typing import Any

from ..text import printable


def clean(text: Any) -> str:
    """Text safe to put in a page once escaped: line breaks and tabs kept, every other control,
    bidi or invisible character shown as an escape (``\\x1b``, ``\\u202e``)."""
    return printable(text, multiline=True)


def md_escape(text: Any) -> str:
    """A Markdown table cell / inline text: no HTML, no pipes, no line breaks, no emphasis surprises."""
    s = clean(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    s = s.replace("\\", "\\\\").replace("|", "\\|").replace("`", "\\`").replace("*", "\\*").replace("_", "\\_")
    s = s.replace("[", "\\[").replace("]", "\\]")
    return re.sub(r"\s*\n\s*", " ", s)
