"""Result records and their JSON.

Every JSON file lora-audit writes carries a ``"lora_audit"`` provenance block (schema name
and version, tool version, git hash of the tool's checkout when there is one, library
versions, time) next to the fields of its own contract. Each kind of result has its own
module here (``spectrum``, ``safety``, ...); report code reads these, never models.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import InputError
from ..io import atomic_write_json


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
    """The block every result JSON starts with; ``settings`` records how it was produced."""
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


def fingerprint(path: str | os.PathLike, *, max_files: int = 64) -> str:
    """A cheap identity of an input file or folder (sha256 over names, sizes and mtimes of its
    files; not over contents, which can be hundreds of GB) for 'what was run' records."""
    p = Path(path)
    h = hashlib.sha256()
    if not p.exists():
        h.update(str(path).encode())
        return "id:" + h.hexdigest()[:16]
    files = [p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file())[:max_files]
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(p) if p.is_dir() else f.name}\0{st.st_size}\0{int(st.st_mtime)}\n".encode())
    return "sha256:" + h.hexdigest()[:16]


def write_result(path: str | os.PathLike, obj: dict[str, Any]) -> Path:
    """Write a result JSON atomically."""
    return atomic_write_json(path, obj)


def read_result(path: str | os.PathLike) -> dict[str, Any]:
    """Read a result JSON written by lora-audit; InputError with the reason when it is not one."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{path}: no such file")
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise InputError(f"{path}: expected a JSON object at the top level")
    return obj
