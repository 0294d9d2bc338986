"""Prompt-set loaders for the formats safety researchers bring.

Supported layouts (detected from the file's columns/keys; ``PromptSet.layout`` says which):
AdvBench CSV (goal,target), RefusalBench JSON (category -> list of prompts), HarmBench CSV
(Behavior, FunctionalCategory, SemanticCategory, ContextString), StrongREJECT CSV
(category, source, forbidden_prompt), JailbreakBench CSV (Goal, Target, Category), XSTest CSV
(prompt, type, label: ``label`` safe/unsafe kept for over-refusal splits), plain JSONL / CSV
with a ``prompt`` column (+ optional ``category``), plain TXT (one prompt a line), and
Hugging Face dataset ids (``hf:owner/name[:split]``, or ``owner/name`` when that is not a local
path; needs network).
No third-party prompt text ships with lora-audit; ``builtin:harmful`` / ``builtin:benign``
are the project's own sets in ``lora_audit/data/safety``.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from ..errors import FormatError, InputError

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

    def limit(self, n: int | None) -> "PromptSet":
        if n is None or n >= len(self.prompts):
            return self
        return PromptSet(self.prompts[:n], self.layout, self.source, self.notes + [f"limited to first {n}"])

    def split_label(self, label: str) -> "PromptSet":
        """XSTest-style split: only the prompts with ``label`` (e.g. 'safe' for over-refusal)."""
        return PromptSet([p for p in self.prompts if p.label == label], self.layout, self.source,
                         self.notes + [f"label == {label!r}"])


def builtin_path(name: str) -> Path:
    p = Path(str(resources.files("lora_audit") / "data" / "safety" / f"{name}.jsonl"))
    if not p.is_file():
        raise InputError(f"builtin:{name}: no such built-in prompt set (have: harmful, benign)")
    return p


def load_prompts(source: str | Path) -> PromptSet:
    """Load a prompt set from a file, ``builtin:NAME``, or a Hugging Face dataset id.

    The returned ``PromptSet.layout`` names the detected layout (``advbench``, ``refusalbench``,
    ``harmbench``, ``strongreject``, ``jailbreakbench``, ``xstest``, ``plain``, ``text``,
    ``builtin``, or ``hf:<layout>``). Raises InputError/FormatError (with the line or item
    number) for a missing, empty or malformed file and for an unknown column layout.
    """
    s = str(source)
    if s.startswith("builtin:"):
        ps = _load_file(builtin_path(s.split(":", 1)[1]))
        ps.layout, ps.source = "builtin", s
        return ps
    p = Path(s)
    if s.startswith("hf:") or (not p.exists() and "/" in s and not s.startswith((".", "/")) and p.suffix == ""):
        ds_id, _, split = s.removeprefix("hf:").partition(":")
        return _load_hf(ds_id, split or "train")
    if not p.exists():
        raise InputError(f"{s}: no such prompt file")
    if p.is_dir():
        raise InputError(f"{s}: is a folder; pass a .csv, .json, .jsonl or .txt prompt file")
    return _load_file(p)


def _load_file(p: Path) -> PromptSet:
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise FormatError(f"{p}: not UTF-8 text ({e})") from None
    if not text.strip():
        raise InputError(f"{p}: the prompt file is empty")
    suf = p.suffix.lower()
    if suf == ".jsonl":
        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise FormatError(f"{p}: line {i} is not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise FormatError(f"{p}: line {i} is not a JSON object")
            rows.append((i, obj))
        return _from_rows(p, rows)
    if suf == ".json":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise FormatError(f"{p}: not valid JSON (line {e.lineno}: {e.msg})") from None
        if isinstance(obj, dict) and obj and all(isinstance(v, list) for v in obj.values()):
            out = []
            for cat, items in obj.items():
                for j, it in enumerate(items):
                    if not isinstance(it, str) or not it.strip():
                        raise FormatError(f"{p}: category {cat!r} item {j} is not a non-empty string")
                    out.append(Prompt(it.strip(), str(cat)))
            if not out:
                raise InputError(f"{p}: no prompts in any category")
            return PromptSet(out, "refusalbench", str(p))
        if isinstance(obj, list) and all(isinstance(x, dict) for x in obj):
            return _from_rows(p, list(enumerate(obj, 1)), where="item")
        if isinstance(obj, list) and all(isinstance(x, str) for x in obj):
            return _from_rows(p, [(i, {"prompt": x}) for i, x in enumerate(obj, 1)], where="item")
        raise FormatError(f"{p}: JSON must be an object category -> list of prompts (RefusalBench), "
                          "a list of objects with 'prompt', or a list of strings")
    if suf in (".csv", ".tsv"):
        reader = csv.DictReader(io.StringIO(text), delimiter="\t" if suf == ".tsv" else ",")
        if not reader.fieldnames:
            raise InputError(f"{p}: no header row")
        rows = []
        try:
            for row in reader:
                if None in row:
                    raise FormatError(f"{p}: line {reader.line_num} has more fields than the header")
                rows.append((reader.line_num, row))
        except csv.Error as e:
            raise FormatError(f"{p}: line {reader.line_num}: {e}") from None
        return _from_rows(p, rows, columns=list(reader.fieldnames))
    if suf in (".txt", ""):
        out = [Prompt(line.strip()) for line in text.splitlines() if line.strip()]
        return PromptSet(out, "text", str(p))
    raise InputError(f"{p}: unknown prompt file type {suf!r}; use .csv, .tsv, .json, .jsonl or .txt")


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


def _from_rows(p: Path, rows: list[tuple[int, dict]], columns: list[str] | None = None,
               where: str = "line") -> PromptSet:
    if not rows:
        raise InputError(f"{p}: header only, no prompts")
    if columns is None:
        columns = list(dict.fromkeys(k for _, r in rows for k in r))
    layout = detect_layout(columns)
    if layout is None:
        accepted = "; ".join(f"{k}: {', '.join(v)}" for k, v in ACCEPTED_LAYOUTS.items())
        raise FormatError(f"{p}: unknown column layout; found columns {columns}. Accepted layouts: {accepted}")
    key, cat_key = {"advbench": ("goal", None), "harmbench": ("Behavior", "SemanticCategory"),
                    "strongreject": ("forbidden_prompt", "category"), "jailbreakbench": ("Goal", "Category"),
                    "xstest": ("prompt", "type"), "plain": ("prompt", "category")}[layout]
    out = []
    for line, r in rows:
        text = r.get(key)
        if not isinstance(text, str) or not text.strip():
            raise FormatError(f"{p}: {where} {line} has an empty or missing {key!r}")
        text = text.strip()
        if layout == "harmbench" and (r.get("ContextString") or "").strip():
            text = f"{r['ContextString'].strip()}\n\n---\n\n{text}"
        cat = r.get(cat_key) if cat_key else None
        label = r.get("label") if layout == "xstest" else None
        if layout == "xstest" and label not in ("safe", "unsafe"):
            label = "unsafe" if str(r.get("type", "")).startswith("contrast") else "safe"
        out.append(Prompt(text, str(cat).strip() if cat not in (None, "") else "uncategorized", label))
    return PromptSet(out, layout, str(p))


def _load_hf(dataset_id: str, split: str = "train") -> PromptSet:
    try:
        import datasets
    except ImportError:
        raise InputError("loading a Hugging Face dataset id needs the 'datasets' package") from None
    try:
        ds = datasets.load_dataset(dataset_id, split=split)
    except Exception as e:  # network / hub / missing dataset errors come in many types
        raise InputError(f"{dataset_id}: could not load this Hugging Face dataset (offline, or no such "
                         f"dataset?): {str(e).splitlines()[0] if str(e) else type(e).__name__}. "
                         "Download it as CSV/JSONL and pass the file instead.") from None
    ps = _from_rows(Path(dataset_id), list(enumerate(ds, 1)), columns=list(ds.column_names), where="row")
    ps.source = f"hf:{dataset_id}"
    ps.layout = f"hf:{ps.layout}"
    return ps
