"""The Result base: one provenance envelope, one reader, one writer for every JSON lora-audit writes.

Every result JSON is one object whose first key is ``"lora_audit"`` (``PROVENANCE_KEY``), the
provenance block (``Provenance``)::

    "lora_audit": {
      "schema": str,             the result kind ("spectrum", "safety", "training", ...)
      "schema_version": int,     its version (>= 1): the contract only grows (fields are added,
                                 never renamed or removed), so any older version reads
      "tool_version": str,       lora-audit's version ("" when unknown: a file written without it)
      "git_hash": str | null,    the commit of the lora-audit checkout, "-dirty" when modified
      "created": str,            UTC time, ISO 8601
      "python": str,             Python's version
      "libraries": {name: version},   torch, transformers, peft, ...
      "settings": {...}          how the result was produced (the kind's own settings)
    }

followed by the kind's own fields. A result class is a dataclass deriving from ``Result``: its
fields (and ``JSON_EXTRA``, values computed on write) are its contract, checked on every read
(``results.schema``) and published as a JSON Schema (``json_schema``).

``to_json()`` never changes the result: the provenance block is made when the result is made
(or read), and two calls give the same JSON.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import functools
import os
import platform
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar

from .. import __version__
from ..errors import InputError
from .schema import AT_LEAST_1, describe, object_schema, parse

PROVENANCE_KEY = "lora_audit"
JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


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


@functools.lru_cache(maxsize=1)
def _library_versions() -> tuple[tuple[str, str], ...]:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in ("torch", "transformers", "peft", "safetensors", "lm_eval", "gguf", "numpy", "scipy", "scikit-learn"):
        try:
            out.append((name, version(name.replace("_", "-"))))
        except PackageNotFoundError:
            continue
    return tuple(out)


def library_versions() -> dict[str, str]:
    return dict(_library_versions())


@dataclass(frozen=True)
class Provenance:
    """What produced a result: its schema and version, lora-audit's version and git hash, Python's and
    the libraries' versions, the time it was made (UTC), and the settings it was made with."""

    schema: str
    schema_version: Annotated[int, AT_LEAST_1]
    tool_version: str = ""
    git_hash: str | None = None
    created: str = ""
    python: str = ""
    libraries: dict[str, str] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def new(cls, schema: str, schema_version: int, settings: dict[str, Any] | None = None) -> Provenance:
        """The block of a result made now, by this lora-audit."""
        return cls(schema=schema, schema_version=schema_version, tool_version=__version__, git_hash=git_hash(),
                   created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                   python=platform.python_version(), libraries=library_versions(), settings=dict(settings or {}))

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_schema(prov: Provenance | None, schema: str, version: int, source: str, *, what: str) -> None:
    """The one version policy: the block must name ``schema``; a version newer than ``version`` is
    refused (upgrade lora-audit), any older one is read (the contract only grows). A file without a
    provenance block (``prov`` None) is accepted: the caller has recognised its fields."""
    if prov is None:
        return
    if prov.schema != schema:
        raise InputError(f"{source}: not a {what} (schema {prov.schema!r})")
    if prov.schema_version > version:
        raise InputError(f"{source}: {schema} schema version {prov.schema_version} is newer than this lora-audit "
                         f"understands ({version}); upgrade lora-audit")


def read_provenance(obj: dict[str, Any], source: str, key: str = PROVENANCE_KEY, *, schema: str | None = None,
                    what: str = "result") -> Provenance | None:
    """The typed provenance block of a result JSON object (None when it has none); InputError
    naming the field when the block is malformed, or naming the schema when it is not ``schema``
    (checked first: a file of another kind is told so, whatever else its block lacks)."""
    name = schema_name(obj, source, key)
    if obj.get(key) is None:
        return None
    if schema is not None and name != schema:
        raise InputError(f"{source}: not a {what} (schema {name!r})")
    return parse(Provenance, obj[key], source, what="provenance block", path=key)


def schema_name(obj: dict[str, Any], source: str, key: str = PROVENANCE_KEY) -> str | None:
    """The schema a result JSON object names in its provenance block under ``key`` (None without
    one); InputError naming the field when the block or the name is not what it must be."""
    block = obj.get(key)
    if block is None:
        return None
    if not isinstance(block, dict):
        raise InputError(f"{source}: malformed provenance block: {key}: expected an object, got {describe(block)}")
    name = block.get("schema")
    if name is not None and not isinstance(name, str):
        raise InputError(f"{source}: malformed provenance block: {key}.schema: expected a string, got {describe(name)}")
    return name


@dataclass
class Result:
    """Base of every result kind (module docstring). A subclass sets ``SCHEMA``, ``SCHEMA_VERSION``,
    ``WHAT`` (its name in messages), ``WRITTEN_BY`` (the command) and ``REQUIRED`` (the fields that
    identify a file of this kind without a provenance block; empty: the block is required)."""

    SCHEMA: ClassVar[str] = ""
    SCHEMA_VERSION: ClassVar[int] = 1
    WHAT: ClassVar[str] = "result"
    WRITTEN_BY: ClassVar[str] = ""
    REQUIRED: ClassVar[tuple[str, ...]] = ()
    SETTINGS_IN_BODY: ClassVar[bool] = False  # the settings are also written at the top level
    JSON_OMIT: ClassVar[tuple[str, ...]] = ("settings", "provenance")

    # how the result was produced (written into the provenance block)
    settings: dict[str, Any] = field(default_factory=dict, kw_only=True)
    # made with the result, or read with it (its settings are ``settings``); never changed by to_json
    provenance: Provenance | None = field(default=None, kw_only=True, repr=False, compare=False)

    def __post_init__(self):
        if self.provenance is None:
            self.provenance = Provenance.new(self.SCHEMA, self.SCHEMA_VERSION)

    # ---- writing ----------------------------------------------------------------------------
    def body(self) -> dict[str, Any]:
        """The kind's own fields as JSON (after the provenance block); ``asdict`` unless overridden."""
        d = dataclasses.asdict(self)
        for key in ("settings", "provenance"):
            d.pop(key, None)
        names = getattr(self, "JSON_NAMES", None) or {}
        d = {names.get(k, k): v for k, v in d.items()}
        return {"settings": dict(self.settings), **d} if self.SETTINGS_IN_BODY else d

    def provenance_json(self) -> dict[str, Any]:
        prov = self.provenance or Provenance(schema=self.SCHEMA, schema_version=self.SCHEMA_VERSION)
        return {**prov.to_json(), "schema": self.SCHEMA, "schema_version": self.SCHEMA_VERSION,
                "settings": copy.deepcopy(self.settings)}

    def to_json(self) -> dict[str, Any]:
        """The result as a JSON object: the provenance block, then ``body()``. Pure: the result is
        not changed, and every call gives the same JSON."""
        return {PROVENANCE_KEY: self.provenance_json(), **self.body()}

    def write_json(self, path: str | os.PathLike) -> Path:
        from ..io import atomic_write_json

        return atomic_write_json(path, self.to_json())

    # ---- reading ----------------------------------------------------------------------------
    @classmethod
    def looks_like(cls, obj: dict[str, Any]) -> bool:
        """A JSON object of this kind without a provenance block (its ``REQUIRED`` fields only)."""
        return bool(cls.REQUIRED) and all(key in obj for key in cls.REQUIRED)

    @classmethod
    def _provenance_of(cls, obj: dict[str, Any], source: str) -> Provenance | None:
        return read_provenance(obj, source, schema=cls.SCHEMA, what=cls.WHAT)

    @classmethod
    def _body_of(cls, obj: dict[str, Any]) -> dict[str, Any]:
        """The fields to parse (a hook for kinds whose older files were laid out differently)."""
        return {k: v for k, v in obj.items() if k != PROVENANCE_KEY}

    @classmethod
    def from_json(cls, obj: Any, *, source: str | None = None):
        """Parse and validate a result of this kind; InputError naming the file and the field."""
        source = source or f"{cls.WHAT} JSON"
        if not isinstance(obj, dict):
            raise InputError(f"{source}: expected a JSON object")
        prov = cls._provenance_of(obj, source)
        check_schema(prov, cls.SCHEMA, cls.SCHEMA_VERSION, source, what=cls.WHAT)
        if prov is None and not cls.looks_like(obj):
            missing = [key for key in cls.REQUIRED if key not in obj]
            want = ", ".join(missing) if missing else f"a {PROVENANCE_KEY!r} block"
            raise InputError(f"{source}: not a {cls.WHAT} (missing {want})")
        body = cls._body_of(obj)
        if prov is not None and not (cls.SETTINGS_IN_BODY and isinstance(body.get("settings"), dict)):
            body["settings"] = prov.settings
        # the settings live on the result (``settings``); the block keeps the rest
        body["provenance"] = dataclasses.replace(prov, settings={}) if prov is not None else \
            Provenance(schema=cls.SCHEMA, schema_version=cls.SCHEMA_VERSION)
        return parse(cls, body, source, what=cls.WHAT)

    @classmethod
    def load(cls, path: str | os.PathLike):
        """Read a file of this kind (InputError when it is not one)."""
        from ..io import read_user_json

        return cls.from_json(read_user_json(path, f"{cls.WHAT} JSON"), source=str(path))

    # ---- the published contract --------------------------------------------------------------
    @classmethod
    def json_schema(cls) -> dict[str, Any]:
        """The JSON Schema of what ``to_json`` writes (docs/schema/<SCHEMA>.schema.json)."""
        defs: dict[str, Any] = {}
        prov = object_schema(Provenance, defs)
        prov["properties"]["schema"] = {"const": cls.SCHEMA}
        prov["properties"]["schema_version"] = {"type": "integer", "minimum": 1, "maximum": cls.SCHEMA_VERSION}
        head = {PROVENANCE_KEY: prov}
        if cls.SETTINGS_IN_BODY:
            head["settings"] = {"type": "object"}
        body = object_schema(cls, defs, written=head)
        about = " ".join(x for x in (body.pop("description", ""), f"Written by: lora-audit {cls.WRITTEN_BY}.") if x)
        return {"$schema": JSON_SCHEMA_DIALECT, "title": f"lora-audit {cls.SCHEMA} result, version {cls.SCHEMA_VERSION}",
                "description": about, **body, "$defs": dict(sorted(defs.items()))}
