"""The result contract: every JSON lora-audit writes, typed, validated and versioned in one place.

Every JSON file the tool writes starts with one provenance block under the key ``"lora_audit"``
(``PROVENANCE_KEY``): schema name and version, tool version, git hash of the tool's checkout
when there is one, library versions, time, and the settings the result was produced with. Then
come the fields of its own contract. Each result kind is a tree of dataclasses in its own module
(``spectrum``, ``safety``, ``screen``, ``study``, ``scan``), whose annotations are the schema that
``results.schema.parse`` checks on every read. One version policy for every kind
(``check_schema``): the schema name must match, and a version newer than this tool knows is
refused (the contract only grows: fields are added, never renamed or removed, so every older
version reads).

This package imports neither torch nor model code: the report and the CLI summaries read results
here, never models.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import InputError
from ..io import atomic_write_json, read_user_json, user_path

PROVENANCE_KEY = "lora_audit"


@functools.lru_cache(maxsize=1)
def git_hash() -> str | None:
    """The git commit of the lora-audit checkout this code runs from, if it is one."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        if out.returncode != 0:
            return None
        h = out.stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return h + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "peft", "safetensors", "lm_eval", "gguf"):
        try:
            out[name] = version(name.replace("_", "-"))
        except PackageNotFoundError:
            continue
    return out


def provenance(schema: str, schema_version: int, **settings: Any) -> dict[str, Any]:
    """The provenance block (the value of ``PROVENANCE_KEY``); ``settings`` records how the result
    was produced."""
    return {
        "schema": schema,
        "schema_version": schema_version,
        "tool_version": __version__,
        "git_hash": git_hash(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "libraries": library_versions(),
        "settings": settings,
    }


PROVENANCE_FIELDS = ("schema", "schema_version", "tool_version", "git_hash", "created", "python", "libraries",
                     "settings")


def stamped(record: dict[str, Any]) -> dict[str, Any]:
    """A flat record (``provenance(...)`` updated with its own fields: training.json, demo.json,
    federated.json, mitigate.json, written that way before every JSON shared the ``"lora_audit"``
    key) with the provenance block also under ``"lora_audit"``, first. The flat fields stay, so
    readers of those files keep working."""
    return {PROVENANCE_KEY: {k: record[k] for k in PROVENANCE_FIELDS if k in record}, **record}


def check_schema(prov: Any, schema: str, version: int, source: str, *, what: str | None = None) -> None:
    """The one version policy: the block must name ``schema``; a version newer than ``version`` is
    refused (upgrade lora-audit), any older one is read (the contract only grows). A file without a
    provenance block (``prov`` None) is accepted: the caller has recognised its fields."""
    if prov is None:
        return
    what = what or f"{schema} result"
    if not isinstance(prov, dict):
        raise InputError(f"{source}: {PROVENANCE_KEY}: expected an object, got {type(prov).__name__}")
    if prov.get("schema") != schema:
        raise InputError(f"{source}: not a {what} (schema {prov.get('schema')!r})")
    v = prov.get("schema_version")
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise InputError(f"{source}: {PROVENANCE_KEY}.schema_version: expected a positive integer, got {v!r}")
    if v > version:
        raise InputError(f"{source}: {schema} schema version {v} is newer than this lora-audit understands "
                         f"({version}); upgrade lora-audit")


def parse_result(cls: type, obj: Any, source: str, *, what: str, required: tuple[str, ...]) -> Any:
    """Read a result kind whose settings live in its provenance block (``SpectrumResult``,
    ``ScreenResult``): check it is an object of schema ``cls.SCHEMA`` at a version this tool reads
    with the ``required`` fields, parse the fields (``results.schema``; InputError naming the
    field), and keep the provenance block and its settings on the result."""
    from .schema import parse

    if not isinstance(obj, dict):
        raise InputError(f"{source}: expected a JSON object")
    prov = obj.get(PROVENANCE_KEY)
    check_schema(prov, cls.SCHEMA, cls.SCHEMA_VERSION, source, what=what)
    missing = [key for key in required if key not in obj]
    if missing:
        raise InputError(f"{source}: not a {what} (missing {', '.join(missing)})")
    body = {k: v for k, v in obj.items() if k not in (PROVENANCE_KEY, "settings", "provenance_block")}
    result = parse(cls, body, source, what=what)
    if isinstance(prov, dict):
        result.provenance_block = prov
        result.settings = dict(prov.get("settings") or {})
    return result


# ---- fingerprints of inputs -------------------------------------------------------------------
CONTENT_HASH_LIMIT = 256 * 2**20  # bytes: inputs up to this size are hashed by content


def _files(p: Path, max_files: int) -> list[Path]:
    if p.is_file():
        return [p]
    return sorted(x for x in p.rglob("*") if x.is_file())[:max_files]


def fingerprint(path: str | os.PathLike, *, max_files: int = 256, content_limit: int = CONTENT_HASH_LIMIT) -> str:
    """An identity of an input file or folder for 'what was run' records and for resuming.

    ``sha256:<16 hex>``: sha256 over the relative names and contents of its files, when they
    total at most ``content_limit`` bytes (adapters, small models); ``stat:<16 hex>``: sha256 over
    names, sizes and modification times only, for bigger inputs (a content hash of a 140 GB model
    would take minutes); ``id:<16 hex>``: a hash of the string, for inputs that are not local paths
    (hub ids)."""
    p = user_path(path)
    h = hashlib.sha256()
    if not os.path.exists(p):
        h.update(os.fsencode(str(path)))
        return "id:" + h.hexdigest()[:16]
    files = _files(p, max_files)
    sizes = [f.stat().st_size for f in files]
    by_content = sum(sizes) <= content_limit
    for f, size in zip(files, sizes):
        rel = f.relative_to(p) if p.is_dir() else f.name
        if by_content:
            h.update(os.fsencode(f"{rel}\0{size}\0"))
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
        else:
            h.update(os.fsencode(f"{rel}\0{size}\0{int(f.stat().st_mtime)}\n"))
    return ("sha256:" if by_content else "stat:") + h.hexdigest()[:16]


# ---- reading and writing ------------------------------------------------------------------------
def write_result(path: str | os.PathLike, obj: Any) -> Path:
    """Write a result (a typed result with ``to_json``, or its JSON dict) atomically."""
    return atomic_write_json(path, obj.to_json() if hasattr(obj, "to_json") else obj)


def read_result(path: str | os.PathLike) -> dict[str, Any]:
    """Read a result JSON file (a JSON object); InputError with the reason when it is not one."""
    return read_user_json(path, "result JSON")


def result_kinds() -> dict[str, type]:
    """schema name -> result class, for every kind ``load_result`` reads."""
    from .safety import SafetyResult
    from .scan import SafetyScanResult
    from .screen import ScreenResult
    from .spectrum import SpectrumResult
    from .study import StudyResult

    return {SpectrumResult.SCHEMA: SpectrumResult, SafetyResult.SCHEMA: SafetyResult, ScreenResult.SCHEMA: ScreenResult,
            StudyResult.SCHEMA: StudyResult, SafetyScanResult.SCHEMA: SafetyScanResult}


def detect_kind(obj: dict[str, Any], source: str) -> str:
    """The schema name of a result JSON object; InputError for anything lora-audit does not read."""
    kinds = result_kinds()
    for key in (PROVENANCE_KEY, "provenance"):
        prov = obj.get(key)
        if isinstance(prov, dict) and prov.get("schema") is not None:
            if prov["schema"] in kinds:
                return prov["schema"]
            raise InputError(f"{source}: a {prov['schema']!r} result; expected one of {', '.join(kinds)}")
    for name, cls in kinds.items():
        if cls.looks_like(obj):
            return name
    names = list(kinds)
    raise InputError(f"{source}: not a lora-audit {', '.join(names[:-1])} or {names[-1]} result (expected the JSON "
                     "written by " + " or ".join(f"'lora-audit {cls.WRITTEN_BY}'" for cls in kinds.values()) + ")")


def load_result(item: str | os.PathLike | dict[str, Any], source: str | None = None) -> Any:
    """A typed result (``SpectrumResult``, ``SafetyResult``, ``ScreenResult``) from a JSON path or dict, validated."""
    if isinstance(item, dict):
        obj, source = item, source or "result"
    else:
        obj, source = read_result(item), source or str(item)
    return result_kinds()[detect_kind(obj, source)].from_json(obj, source=source)
