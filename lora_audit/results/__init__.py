"""The result contract: every JSON lora-audit writes, typed, validated and versioned in one place.

Every JSON file the tool writes is a ``Result`` (``results.base``): one provenance block under the
key ``"lora_audit"`` (``PROVENANCE_KEY``: schema name and version, tool version, git hash of the
tool's checkout when there is one, library versions, time, and the settings the result was
produced with), then the fields of its own contract. Each result kind is a tree of dataclasses in
its own module (``spectrum``, ``safety``, ``screen``, ``study``, ``scan``, ``training``,
``mitigate``, ``risk``, ``cache``), whose annotations are the schema that ``results.schema.parse``
checks on every read and that ``Result.json_schema`` publishes (docs/schema/). One version policy
for every kind (``base.check_schema``): the schema name must match, and a version newer than this
tool knows is refused (the contract only grows: fields are added, never renamed or removed, so
every older version reads).

This package imports neither torch nor model code: the report and the CLI summaries read results
here, never models.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..io import atomic_write_json, read_user_json, user_path
from .base import PROVENANCE_KEY, Provenance, Result, check_schema, git_hash, library_versions, schema_name

__all__ = ["PROVENANCE_KEY", "Provenance", "Result", "check_schema", "git_hash", "library_versions", "fingerprint",
           "write_result", "read_result", "result_kinds", "detect_kind", "load_result"]


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
    for f, size in zip(files, sizes, strict=True):
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


def result_kinds() -> dict[str, type[Result]]:
    """schema name -> result class, for every kind ``load_result`` reads (the kinds a report renders,
    and the screen summary)."""
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
    for key in (PROVENANCE_KEY, "provenance"):  # "provenance": older safety files
        name = schema_name(obj, source, key)
        if name is not None:
            if name in kinds:
                return name
            raise InputError(f"{source}: a {name!r} result; expected one of {', '.join(kinds)}")
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
