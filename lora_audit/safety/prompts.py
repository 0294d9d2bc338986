"""Prompt-set loaders for the formats safety researchers bring.

Supported layouts (detected from the file's columns/keys; ``PromptSet.layout`` says which):
AdvBench CSV (goal,target), RefusalBench JSON (category -> list of prompts), HarmBench CSV
(Behavior, FunctionalCategory, SemanticCategory, ContextString), StrongREJECT CSV
(category, source, forbidden_prompt), JailbreakBench CSV (Goal, Target, Category), XSTest CSV
(prompt, type, label: ``label`` safe/unsafe, any case, kept for over-refusal splits; any other
label is refused), plain JSONL / CSV
with a ``prompt`` column (+ optional ``category``), plain TXT (one prompt a line), and
Hugging Face dataset ids (``hf:owner/name[:split]``, or ``owner/name`` when that is not a local
path; needs network).
No third-party prompt text ships with lora-audit; ``builtin:harmful`` / ``builtin:benign``
(safety-eval's) and ``builtin:scan-harmful`` / ``builtin:scan-harmless`` (safety-scan's, disjoint
from safety-eval's) are the project's own sets in ``lora_audit/data/safety``.

Files are hostile until read: they are read through ``lora_audit.io.read_user_text`` (regular
files within the size limit, UTF-8, no NUL bytes); CSV is parsed strictly (an unclosed quote is
an error naming the line where it opened, and every row has the header's number of fields); a
prompt that is blank or longer than ``max_chars`` (default ``DEFAULT_MAX_PROMPT_CHARS``) is an
error naming the file and the line or item.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ..datafile import check_chars, check_limit, is_blank, lines, parse_jsonl
from ..io import json_kind, parse_json, read_user_text
from ..errors import FormatError, InputError

# Longer prompts are refused unless the caller raises the limit. The longest HarmBench prompt (a
# contextual behaviour with its ContextString) has about 3,700 characters (median of the 100
# contextual ones: about 1,200); other benchmarks' prompts are under 1,000. 16,000 characters
# (about 4,000 tokens) leaves room for long jailbreak templates while keeping a stray huge
# "prompt" (quadratic attention: 100,000 characters take minutes even on a 2-layer model) out.
DEFAULT_MAX_PROMPT_CHARS = 16_000
LIMIT_OPTION = "--max-prompt-chars"

ACCEPTED_LAYOUTS = {
    "advbench": ["goal", "target"],
    "harmbench": ["Behavior", "FunctionalCategory", "SemanticCategory", "ContextString"],
    "strongreject": ["category", "source", "forbidden_prompt"],
    "jailbreakbench": ["Goal", "Target", "Category"],
    "xstest": ["prompt", "type", "label"],
    "plain": ["prompt", "(category)"],
}


@dataclass
class Prompt:
    prompt: str
    category: str = "uncategorized"
    label: str | None = None  # XSTest: "safe" / "unsafe"


@dataclass
class PromptSet:
    prompts: list[Prompt]
    layout: str
    source: str
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.prompts)

    def limit(self, n: int | None) -> PromptSet:
        if n is None or n >= len(self.prompts):
            return self
        return PromptSet(self.prompts[:n], self.layout, self.source, self.notes + [f"limited to first {n}"])

    def split_label(self, label: str) -> PromptSet:
        """XSTest-style split: only the prompts with ``label`` (e.g. 'safe' for over-refusal)."""
        return PromptSet([p for p in self.prompts if p.label == label], self.layout, self.source,
                         self.notes + [f"label == {label!r}"])


def builtin_path(name: str) -> Path:
    folder = Path(str(resources.files("lora_audit") / "data" / "safety"))
    p = folder / f"{name}.jsonl"
    if "/" in name or "\\" in name or not p.is_file():
        have = ", ".join(sorted(f.stem for f in folder.glob("*.jsonl")))
        raise InputError(f"builtin:{name}: no such built-in prompt set (have: {have})")
    return p


def load_prompts(source: str | Path, *, max_chars: int | None = DEFAULT_MAX_PROMPT_CHARS) -> PromptSet:
    """Load a prompt set from a file, ``builtin:NAME``, or a Hugging Face dataset id.

    The returned ``PromptSet.layout`` names the detected layout (``advbench``, ``refusalbench``,
    ``harmbench``, ``strongreject``, ``jailbreakbench``, ``xstest``, ``plain``, ``text``,
    ``builtin``, or ``hf:<layout>``). Raises InputError/FormatError (with the line or item
    number) for a missing, empty or malformed file, an unknown column layout, and a prompt
    longer than ``max_chars`` characters (None: no limit; HarmBench prompts are counted with
    their context).
    """
    check_limit(max_chars, f"max_chars ({LIMIT_OPTION})")
    s = str(source)
    if s.startswith("builtin:"):
        ps = _load_file(builtin_path(s.split(":", 1)[1]), max_chars)
        ps.layout, ps.source = "builtin", s
        return ps
    p = Path(s)
    if s.startswith("hf:") or (not p.exists() and "/" in s and not s.startswith((".", "/")) and p.suffix == ""):
        ds_id, _, split = s.removeprefix("hf:").partition(":")
        return _load_hf(ds_id, split or "train", max_chars)
    if not p.exists():
        raise InputError(f"{s}: no such prompt file")
    if p.is_dir():
        raise InputError(f"{s}: is a folder; pass a .csv, .json, .jsonl or .txt prompt file")
    return _load_file(p, max_chars)


def _load_file(p: Path, max_chars: int | None) -> PromptSet:
    suf = p.suffix.lower()
    if suf not in (".jsonl", ".json", ".csv", ".tsv", ".txt", ""):
        raise InputError(f"{p}: unknown prompt file type {suf!r}; use .csv, .tsv, .json, .jsonl or .txt")
    text = read_user_text(p, "prompt file")
    if is_blank(text):
        raise InputError(f"{p}: the prompt file is empty")
    if suf == ".jsonl":
        return _from_rows(p, parse_jsonl(text, p, "with a 'prompt' key (or the keys of another accepted "
                                         "layout)"), max_chars)
    if suf == ".json":
        return _from_json(p, parse_json(text, p), max_chars)
    if suf in (".csv", ".tsv"):
        columns, rows = _read_csv(p, text, "\t" if suf == ".tsv" else ",")
        return _from_rows(p, rows, max_chars, columns=columns)
    out = []
    for i, line in enumerate(lines(text), 1):
        if not is_blank(line):
            check_chars(line.strip(), max_chars, f"{p}: line {i}", "prompt", LIMIT_OPTION)
            out.append(Prompt(line.strip()))
    return PromptSet(out, "text", str(p))


_JSON_ACCEPTED = ("A .json prompt file holds an object category -> list of prompt strings (RefusalBench), "
                  "a list of objects with 'prompt' (or the keys of another accepted layout), or a list of "
                  "prompt strings.")


def _from_json(p: Path, obj: Any, max_chars: int | None) -> PromptSet:
    if isinstance(obj, dict):
        out = []
        for cat, items in obj.items():
            if not isinstance(items, list):
                raise FormatError(f"{p}: category {cat!r} is {json_kind(items)}, not a list of prompts. "
                                  f"{_JSON_ACCEPTED}")
            for j, it in enumerate(items, 1):
                where = f"{p}: category {cat!r} item {j}"
                text = _text(it, where, "prompt")
                check_chars(text, max_chars, where, "prompt", LIMIT_OPTION)
                out.append(Prompt(text, str(cat)))
        if not out:
            raise InputError(f"{p}: no prompts in any category")
        return PromptSet(out, "refusalbench", str(p))
    if isinstance(obj, list):
        if not obj:
            raise InputError(f"{p}: the JSON list is empty; no prompts")
        for j, x in enumerate(obj, 1):
            if not isinstance(x, (str, dict)):
                raise FormatError(f"{p}: item {j} is {json_kind(x)}. {_JSON_ACCEPTED}")
        return _from_rows(p, [(j, {"prompt": x} if isinstance(x, str) else x) for j, x in enumerate(obj, 1)],
                          max_chars, where="item")
    raise FormatError(f"{p}: the file holds {json_kind(obj)}. {_JSON_ACCEPTED}")


def _read_csv(p: Path, text: str, delimiter: str) -> tuple[list[str], list[tuple[int, dict]]]:
    """The header and (first line, row) of every record. Parsed strictly, every row with exactly
    the header's number of fields: a quoted field may span lines (HarmBench's ContextString
    does), but a quote that is never closed, or closed by a stray quote mid-field, is an error
    naming the line where that field opened. Blank lines are skipped."""
    reader = csv.reader(io.StringIO(text), delimiter=delimiter, strict=True)
    header: list[str] | None = None
    rows: list[tuple[int, dict]] = []
    start = 1  # first line of the record being read
    try:
        for rec in reader:
            line, start = start, reader.line_num + 1
            if not rec or (len(rec) == 1 and not rec[0].strip()):
                continue
            if header is None:
                header = _check_header(p, line, [h.strip() for h in rec])
            elif len(rec) != len(header):
                raise FormatError(_field_count_message(p, line, reader.line_num, len(rec), header))
            else:
                rows.append((line, dict(zip(header, rec, strict=True))))
    except csv.Error as e:
        opened = open_quote_line(text, start, delimiter)
        if opened is None:
            raise FormatError(f"{p}: line {reader.line_num}: {e}") from None
        raise FormatError(f"{p}: line {opened}: a quoted field opens here and is not closed properly (the CSV "
                          f"reader stopped at line {reader.line_num}: {e}). End it with a quote followed by "
                          "the delimiter or the end of the line, and write a quote inside it as two quotes "
                          '("")') from None
    if header is None:
        raise InputError(f"{p}: the prompt file is empty")
    if not rows:
        raise InputError(f"{p}: header only, no prompts")
    return header, rows


def _check_header(p: Path, line: int, names: list[str]) -> list[str]:
    named = [n for n in names if n]
    if len(set(named)) < len(named):
        dup = next(n for i, n in enumerate(named) if n in named[:i])
        raise FormatError(f"{p}: line {line}: the header names the column {dup!r} twice")
    return names


def _field_count_message(p: Path, line: int, last: int, n: int, header: list[str]) -> str:
    span = f"lines {line}-{last}" if last > line else f"line {line}"
    more = "more" if n > len(header) else "fewer"
    msg = (f"{p}: line {line} has {more} fields ({n}) than the header ({len(header)}: {', '.join(header)}); "
           "every row needs one field per column (an empty field is written as nothing between delimiters)")
    if last > line:
        msg += (f". This row spans {span}: if it holds more than one row, a quoted field in it is missing "
                "its closing quote")
    return msg


def open_quote_line(text: str, start: int, delimiter: str) -> int | None:
    """The line where the last quoted field opened in the CSV record that starts on line
    ``start``, when that record stops being valid CSV (a quote never closed, or closed by a quote
    that is not followed by the delimiter or a line end); None when the record is valid.

    Scans like a strict CSV reader: a quote opens a field only at its start; inside, ``""`` is a
    literal quote. Jumps from quote to quote, so a 64 MiB file costs a few ``str.find`` calls."""
    pos = 0
    for _ in range(start - 1):
        pos = text.find("\n", pos) + 1
        if pos == 0:
            return None
    line, opened = start, None
    ends = re.compile(f"[{re.escape(delimiter)}\n]")
    while pos < len(text):
        if text[pos] == '"':  # at the start of a field: a quoted field
            opened, end = line, pos + 1
            while (end := text.find('"', end)) >= 0 and text.startswith('""', end):
                end += 2
            if end < 0:
                return opened  # the file ends inside the field
            line += text.count("\n", pos, end)
            pos = end + 1
            if pos < len(text) and text[pos] not in (delimiter, "\n", "\r"):
                return opened
        m = ends.search(text, pos)
        if m is None or m.group() == "\n":
            return None  # the record ends here, valid
        pos = m.end()
    return None


def detect_layout(columns: list[str]) -> str | None:
    """The layout name for a header (see ACCEPTED_LAYOUTS), or None. JailbreakBench files also
    have a ``Behavior`` column, so they are recognised (by ``Goal``) before HarmBench."""
    cols = set(columns)
    if {"Goal", "Category"} <= cols:
        return "jailbreakbench"
    if "Behavior" in cols and cols & {"FunctionalCategory", "SemanticCategory", "ContextString", "BehaviorID"}:
        return "harmbench"
    if "forbidden_prompt" in cols:
        return "strongreject"
    if {"prompt", "type", "label"} <= cols:
        return "xstest"
    if "goal" in cols:
        return "advbench"
    if "prompt" in cols:
        return "plain"
    return None


_KEYS = {"advbench": ("goal", None), "harmbench": ("Behavior", "SemanticCategory"),
         "strongreject": ("forbidden_prompt", "category"), "jailbreakbench": ("Goal", "Category"),
         "xstest": ("prompt", "type"), "plain": ("prompt", "category")}  # layout -> (prompt, category)


def _from_rows(p: Path, rows: list[tuple[int, dict]], max_chars: int | None, columns: list[str] | None = None,
               where: str = "line") -> PromptSet:
    if not rows:
        raise InputError(f"{p}: no prompts")
    if columns is None:
        columns = list(dict.fromkeys(k for _, r in rows for k in r))
    layout = detect_layout(columns)
    if layout is None:
        accepted = "; ".join(f"{k}: {', '.join(v)}" for k, v in ACCEPTED_LAYOUTS.items())
        raise FormatError(f"{p}: unknown column layout; found columns {columns}. Accepted layouts: {accepted}")
    out = [_row_prompt(r, layout, f"{p}: {where} {n}", max_chars) for n, r in rows]
    return PromptSet(out, layout, str(p))


def _row_prompt(r: dict, layout: str, where: str, max_chars: int | None) -> Prompt:
    """One row of a detected layout as a Prompt (``where``: file and line/item, for errors).

    HarmBench contextual behaviours are prefixed with their ContextString, and the limit applies
    to that whole text (what the model reads). An XSTest row's label must be safe or unsafe: it
    decides whether the prompt counts as benign or harmful, so another value is refused rather
    than guessed."""
    key, cat_key = _KEYS[layout]
    text = _text(r.get(key), where, repr(key))
    context = r.get("ContextString")
    if layout == "harmbench" and isinstance(context, str) and not is_blank(context):
        text = f"{context.strip()}\n\n---\n\n{text}"
    check_chars(text, max_chars, where, "prompt", LIMIT_OPTION)
    cat = r.get(cat_key) if cat_key else None
    label = None
    if layout == "xstest":
        label = str(r.get("label") or "").strip().lower()
        if label not in ("safe", "unsafe"):
            raise FormatError(f"{where} has the label {r.get('label')!r}; an XSTest file's 'label' must be "
                              "'safe' (benign: measures over-refusal) or 'unsafe' (harmful)")
    return Prompt(text, str(cat).strip() if cat not in (None, "") else "uncategorized", label)


def _text(raw: Any, where: str, what: str) -> str:
    """The stripped prompt text; FormatError when it is missing, blank (only whitespace or
    invisible characters) or not text."""
    if raw is None or (isinstance(raw, str) and is_blank(raw)):
        raise FormatError(f"{where} has an empty or missing {what}")
    if not isinstance(raw, str):
        raise FormatError(f"{where}: the {what} must be text, got {json_kind(raw)}")
    return raw.strip()


def _load_hf(dataset_id: str, split: str, max_chars: int | None) -> PromptSet:
    try:
        import datasets
    except ImportError:
        raise InputError("loading a Hugging Face dataset id needs the 'datasets' package") from None
    try:
        ds = datasets.load_dataset(dataset_id, split=split)
    except Exception as e:  # noqa: BLE001 - network / hub / missing dataset errors come in many types
        raise InputError(f"{dataset_id}: could not load this Hugging Face dataset (offline, or no such "
                         f"dataset?): {str(e).splitlines()[0] if str(e) else type(e).__name__}. "
                         "Download it as CSV/JSONL and pass the file instead.") from None
    ps = _from_rows(Path(dataset_id), list(enumerate(ds, 1)), max_chars, columns=list(ds.column_names),
                    where="row")
    ps.source = f"hf:{dataset_id}"
    ps.layout = f"hf:{ps.layout}"
    return ps
