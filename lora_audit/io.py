"""Reading what users hand the tool, and writing outputs without ever destroying what they own.

Reading (``read_user_bytes`` / ``read_user_text`` / ``read_user_json``): every text or JSON file
that comes from a user (configs, shard indexes, prompt sets, training data, templates, result
JSON) must be a regular file (not a FIFO, a device such as /dev/zero, or a folder) of at most
``max_input_bytes()`` (64 MiB; ``LORA_AUDIT_MAX_INPUT_MB`` raises it), in UTF-8. A violation is an
``InputError`` naming the file and what is accepted, before anything is read.

Writing: every output is written atomically (a temporary sibling, then ``os.replace``), so a
reader never sees half a file or folder and an interrupted run leaves the previous output or
nothing. And nothing the tool did not create is ever replaced:

- an output folder (``atomic_dir``) holds a marker file ``MARKER`` naming the command that wrote
  it; an existing folder is replaced only when it carries the marker AND the caller passes
  ``overwrite=True`` (the CLI's ``--overwrite``); an empty folder is filled; any other folder,
  or a file at that path, is refused;
- an existing output file (``check_output_file``) is replaced only when lora-audit wrote it
  (``written_by_lora_audit``: its first bytes carry the tool's provenance or generator mark) or it
  is empty;
- ``check_outputs`` refuses an output that is one of the inputs or contains one, and two outputs
  that are the same path.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .errors import FormatError, InputError, OutputError

MARKER = ".lora-audit-output"


def user_path(path: str | os.PathLike) -> Path:
    """``path`` with ``~`` expanded; an unknown ``~user`` stays as written (``Path.expanduser``
    raises RuntimeError for it, which a user's typo must not become)."""
    return Path(os.path.expanduser(os.fspath(path)))


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once at import: os.umask can only be read by setting it, and doing that per write would,
# for a moment, give files created by other threads (the spectrum cache's writer) mode 0666.
_UMASK = _read_umask()


def _default_mode(kind: str) -> int:
    """The mode a plain open()/mkdir() would give (mkstemp/mkdtemp make 0600/0700 files)."""
    return (0o666 if kind == "file" else 0o777) & ~_UMASK


# ---- reading user files ----------------------------------------------------------------------
DEFAULT_MAX_INPUT_MB = 64


def max_input_bytes() -> int:
    """Size limit for user text/JSON files: ``LORA_AUDIT_MAX_INPUT_MB`` MiB, default 64."""
    raw = os.environ.get("LORA_AUDIT_MAX_INPUT_MB", "")
    try:
        mb = float(raw) if raw.strip() else DEFAULT_MAX_INPUT_MB
    except ValueError:
        raise InputError(f"LORA_AUDIT_MAX_INPUT_MB={raw!r} is not a number of megabytes") from None
    if not mb > 0:
        raise InputError(f"LORA_AUDIT_MAX_INPUT_MB={raw!r} must be positive")
    return int(mb * 1024 * 1024)


def file_kind(mode: int) -> str:
    """What an ``st_mode`` is, for messages: "regular file", "folder", "symbolic link", "named pipe
    (FIFO)", "character device", ..."""
    for test, name in ((stat.S_ISREG, "regular file"), (stat.S_ISDIR, "folder"), (stat.S_ISLNK, "symbolic link"),
                       (stat.S_ISFIFO, "named pipe (FIFO)"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "special file"


def check_regular_file(path: str | os.PathLike, what: str) -> os.stat_result:
    """The file's stat; InputError unless ``path`` is an existing regular file (symlinks followed)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InputError(f"{path}: no such {what if what.endswith('file') else f'file (the {what})'}") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read this {what} ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{path}: the {what} must be a regular file, not a {file_kind(st.st_mode)}")
    return st


def read_user_bytes(path: str | os.PathLike, what: str = "file", *, max_bytes: int | None = None) -> bytes:
    """The bytes of a user's file, after checking it is a regular file within the size limit."""
    limit = max_input_bytes() if max_bytes is None else max_bytes
    st = check_regular_file(path, what)
    if st.st_size > limit:
        raise InputError(f"{path}: the {what} is {st.st_size / 2**20:.1f} MiB, over the limit of "
                         f"{limit / 2**20:.0f} MiB (set LORA_AUDIT_MAX_INPUT_MB to raise it)")
    try:
        # O_NONBLOCK and fstat: a FIFO swapped in after the stat is refused, not waited on
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as fh:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                raise InputError(f"{path}: the {what} must be a regular file, not a {file_kind(mode)}")
            os.set_blocking(fd, True)
            data = fh.read(limit + 1)
    except OSError as e:
        raise InputError(f"{path}: cannot read this {what} ({e.strerror})") from None
    if len(data) > limit:  # grew since the stat
        raise InputError(f"{path}: the {what} is over the limit of {limit / 2**20:.0f} MiB "
                         "(set LORA_AUDIT_MAX_INPUT_MB to raise it)")
    return data


_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


def read_user_text(path: str | os.PathLike, what: str = "file", *, max_bytes: int | None = None) -> str:
    """A user's UTF-8 text file (a BOM is dropped). InputError when it cannot be read (see
    ``read_user_bytes``); FormatError, naming the line, for UTF-16 text, NUL bytes (a binary file)
    and invalid UTF-8."""
    data = read_user_bytes(path, what, max_bytes=max_bytes)
    if data.startswith(_UTF16_BOMS):
        raise FormatError(f"{path}: the {what} is not UTF-8 but UTF-16 text; save it as UTF-8")
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
                          f"the {what} is not UTF-8: save it as UTF-8") from None


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON (write null or a number)")


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise ValueError(f"the key {key!r} appears twice in one object")
        seen.add(key)
    return dict(pairs)


# Nesting of objects and lists in any JSON lora-audit reads from a user (configs, metadata strings,
# quant states, results): real files nest under 10 levels; a hostile one nested 100k deep would
# otherwise end in RecursionError (or, under a raised recursion limit, crash the interpreter).
MAX_JSON_DEPTH = 100
_JSON_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def check_json_depth(text: str, limit: int = MAX_JSON_DEPTH) -> str:
    """``text``, after a ValueError when this JSON nests objects/lists deeper than ``limit`` (brackets
    inside strings do not count). Linear in the text, and free when it holds fewer brackets than ``limit``."""
    if text.count("[") + text.count("{") <= limit:
        return text
    depth = 0
    for m in _JSON_TOKENS.finditer(text):
        c = m.group()
        if c in "[{":
            depth += 1
            if depth > limit:
                raise ValueError(f"nested deeper than {limit} levels")
        elif c in "]}":
            depth -= 1
    return text


def parse_json(text: str, path: str | os.PathLike, line: int | None = None) -> Any:
    """``text`` parsed as JSON; FormatError naming ``path`` (and ``line`` for one JSONL line).
    The one JSON parser of untrusted text (files, safetensors metadata strings, quant states):
    NaN/Infinity are refused (they are not JSON), and so are duplicate keys (``json`` would keep
    the last one silently), text over ``max_input_bytes()`` and nesting over ``MAX_JSON_DEPTH``."""
    where = f"{path}: line {line} is" if line is not None else f"{path}:"
    if len(text) > max_input_bytes():
        raise FormatError(f"{where} over the limit of {max_input_bytes() / 2**20:.0f} MiB of JSON "
                          "(set LORA_AUDIT_MAX_INPUT_MB to raise it)")
    try:
        check_json_depth(text)
        return json.loads(text, parse_constant=_refuse_constant, object_pairs_hook=_refuse_duplicate_keys)
    except json.JSONDecodeError as e:
        at = f"column {e.colno}" if line is not None else f"line {e.lineno}, column {e.colno}"
        raise FormatError(f"{where} not valid JSON ({at}: {e.msg})") from None
    except ValueError as e:
        raise FormatError(f"{where} not valid JSON ({e})") from None
    except RecursionError:
        raise FormatError(f"{where} not valid JSON (nested too deeply)") from None


_JSON_KINDS = {dict: "a JSON object", list: "a JSON list", str: "a JSON string", bool: "true/false",
               int: "a JSON number", float: "a JSON number", type(None): "null"}


def json_kind(value: Any) -> str:
    """'a JSON list', 'a JSON number', ... for messages about a JSON value of the wrong kind."""
    return _JSON_KINDS.get(type(value), type(value).__name__)


def read_user_json(path: str | os.PathLike, what: str = "JSON file", *, expect: type | None = dict,
                   max_bytes: int | None = None) -> Any:
    """A user's JSON file, parsed (``parse_json``); ``expect`` (dict, list or None for anything)
    is checked."""
    obj = parse_json(read_user_text(path, what, max_bytes=max_bytes), path)
    if expect is not None and not isinstance(obj, expect):
        raise FormatError(f"{path}: the {what} must be {_JSON_KINDS.get(expect, expect.__name__)}, "
                          f"got {json_kind(obj)}")
    return obj


# ---- writing ----------------------------------------------------------------------------------
def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, _default_mode("file"))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def utf8(text: str) -> bytes:
    """``text`` as UTF-8, a lone surrogate (a file name that is not UTF-8, as Python decodes it) written
    as its escape ``\\udcff``: inside a JSON string that is JSON's own escape, so the name reads back
    unchanged; elsewhere it is visible text (``text.printable`` escapes names the same way)."""
    return text.encode("utf-8", "backslashreplace")


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, utf8(text))


def json_text(obj: Any) -> str:
    """Stable JSON: field order kept (it is part of the contract), 2-space indent. JSON has no NaN
    or inf: each result says "not measured" with null itself (a matrix with NaN/Inf weights is left
    out and listed as non-finite; a similarity or score that cannot be computed is null), and any
    non-finite float that still reaches here is written as null too, so every command's JSON stays
    valid whatever its inputs held."""
    try:
        return json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False, default=_json_default) + "\n"
    except ValueError:  # a NaN/inf somewhere: the same document with null in its place
        return json.dumps(_finite_or_null(obj), indent=2, ensure_ascii=False, allow_nan=False,
                          default=_json_default) + "\n"


def _finite_or_null(o: Any) -> Any:
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _finite_or_null(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite_or_null(v) for v in o]
    if isinstance(o, (str, int, bool)) or o is None:
        return o
    try:
        return _finite_or_null(_json_default(o))
    except TypeError:
        return o


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json_text(obj))


def csv_text(table, columns: Iterable[str] | None = None) -> str:
    """The one CSV writer of lora-audit: ``table`` (a pandas DataFrame, or rows as dicts keyed by
    ``columns``) as CSV text in which no cell can act: every cell goes through
    ``lora_audit.text.csv_cell`` (formula triggers at the start of the cell or of any line inside
    it neutralised, control and bidi characters escaped; numbers as they are; missing values
    empty), and cells holding a line break, a comma or a quote are quoted."""
    import csv
    import io

    from .text import csv_cell

    if columns is None:  # a DataFrame
        columns = [str(c) for c in table.columns]
        rows: Iterable[Iterable[Any]] = table.itertuples(index=False, name=None)
    else:
        columns = list(columns)
        rows = ([row.get(c) for c in columns] for row in table)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([csv_cell(c) for c in columns])
    for row in rows:
        w.writerow([csv_cell(_missing_as_none(v)) for v in row])
    return buf.getvalue()


def _missing_as_none(v: Any) -> Any:
    """None for pandas' missing-value markers (NA, NaT), which are neither None nor NaN."""
    if v is not None and type(v).__name__ in ("NAType", "NaTType"):
        return None
    return v


def _json_default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    try:
        import torch

        if isinstance(o, torch.Tensor):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# What lora-audit puts at the start of the files it writes (JSON provenance, the HTML generator
# tag, the Markdown report's first line, the spectrum CSV's header, SARIF's tool name).
_OURS = [re.compile(p) for p in (
    rb'^\s*\{\s*"lora_audit"\s*:',
    rb'^\s*\{\s*"(?:provenance|schema)"\s*:\s*(?:\{\s*"schema"\s*:\s*)?"(?:spectrum|safety|lora-audit/)',
    rb'<meta name="generator" content="lora-audit[ "]',
    rb'^# .*\n+Generated \S+ by lora-audit ',
    rb'^tuned,name,module,layer,rows,cols',
    rb'"driver"\s*:\s*\{\s*"name"\s*:\s*"lora-audit"',
)]


def written_by_lora_audit(path: str | os.PathLike) -> bool:
    """True when ``path`` is a regular file whose first 4 KiB carry lora-audit's mark (see ``_OURS``)
    or that is empty: a file the tool may replace."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            return False
        if st.st_size == 0:
            return True
        with open(path, "rb") as fh:
            head = fh.read(4096)
    except OSError:
        return False
    return any(p.search(head) for p in _OURS)


def is_tool_folder(path: str | os.PathLike) -> bool:
    """True when ``path`` is a folder lora-audit wrote (it holds ``MARKER``)."""
    p = Path(path)
    return p.is_dir() and not p.is_symlink() and (p / MARKER).is_file()


def _writable_parent(path: Path, what: str) -> None:
    """OutputError unless the nearest existing ancestor of ``path`` is a folder we can create in."""
    parent = path.parent
    while not parent.exists():
        if parent == parent.parent:
            break
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{path}: cannot write the {what} there: {parent} is not a folder")
    try:  # access() can say yes where creating fails (read-only mounts, /proc): try it
        fd, tmp = tempfile.mkstemp(prefix=".lora-audit-probe.", dir=parent)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise OutputError(f"{path}: cannot write the {what} in {parent} ({e.strerror or e})") from None


def check_output_file(path: str | os.PathLike, what: str = "output file") -> Path:
    """Check, before any work, that ``path`` can be written as a file without destroying anything.

    OutputError when it is a folder, an existing file lora-audit did not write, or in a place
    that cannot be written."""
    p = user_path(path)
    if p.is_dir():
        raise OutputError(f"{path}: is a folder; give a file name for the {what}")
    if p.exists() or p.is_symlink():
        if p.is_symlink() or not written_by_lora_audit(p):
            raise OutputError(f"{path}: exists and was not written by lora-audit; refusing to replace it "
                              f"(choose another name for the {what}, or move that file away)")
    _writable_parent(p, what)
    return p


def check_output_dir(path: str | os.PathLike, *, overwrite: bool = False, what: str = "output folder") -> Path:
    """Check, before any work, that ``path`` can be (re)placed as a folder (see the module docstring)."""
    p = user_path(path)
    if p.is_symlink() or (p.exists() and not p.is_dir()):
        raise OutputError(f"{path}: exists and is not a folder; give a new folder for the {what}")
    if p.is_dir() and any(p.iterdir()):
        if not is_tool_folder(p):
            raise OutputError(f"{path}: is a folder with files lora-audit did not write; refusing to replace it "
                              f"(give a new folder for the {what})")
        if not overwrite:
            raise OutputError(f"{path}: exists (written by lora-audit earlier); pass --overwrite to replace it, "
                              "or give a new folder")
    _writable_parent(p, what)
    return p


def _resolved(p: str | os.PathLike) -> Path:
    return Path(os.path.abspath(user_path(p))).resolve()


def check_outputs(outputs: Iterable[str | os.PathLike | None], inputs: Iterable[str | os.PathLike | None], *,
                  folders: Iterable[str | os.PathLike | None] = ()) -> None:
    """OutputError when an output would replace or delete an input, or two outputs collide.

    An output may not be an input, contain one (replacing a folder would delete it), or be an
    existing file inside an input folder; a new file inside an input folder is allowed. Output
    ``folders`` (a screen, an audit report, an adapter being written) may not lie inside an input
    folder at all, new or not: they change that input (its content hash, what is found in it),
    and the next run would find its own earlier output among the inputs. Inputs that are not local
    paths (hub ids) are ignored."""
    dirs = [(d, _resolved(d)) for d in folders if d is not None]
    outs = [(o, _resolved(o)) for o in outputs if o is not None] + dirs
    ins = [(i, _resolved(i)) for i in inputs if i is not None and os.path.exists(user_path(str(i)))]
    seen: dict[Path, Any] = {}
    for o, ro in outs:
        if ro in seen:
            raise OutputError(f"{o}: given for two outputs ({seen[ro]} and {o}); each output needs its own path")
        seen[ro] = o
        for i, ri in ins:
            if ro == ri:
                raise OutputError(f"{o}: is also an input; writing it would destroy the input. Choose another path")
            if ri.is_relative_to(ro):
                raise OutputError(f"{o}: contains the input {i}; writing it would replace that input. "
                                  "Choose another path")
            if ri.is_dir() and ro.is_relative_to(ri) and (ro.exists() or ro.is_symlink()):
                raise OutputError(f"{o}: is a file of the input {i}; writing it would change that input. "
                                  "Choose another path")
            if ri.is_dir() and ro.is_relative_to(ri) and (o, ro) in dirs:
                raise OutputError(f"{o}: lies inside the input {i}; writing a folder there would change that input "
                                  "(and a later run would find it among the inputs). Choose a folder outside it")


def write_marker(folder: str | os.PathLike, what: str) -> None:
    """Mark ``folder`` as written by lora-audit (``what``: the command or kind of output)."""
    from . import __version__

    (Path(folder) / MARKER).write_text(json.dumps({"written_by": "lora-audit", "version": __version__,
                                                   "what": what}) + "\n", encoding="utf-8")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, overwrite: bool = False, what: str = "output") -> Iterator[Path]:
    """Build a folder in a temporary sibling; move it into place only if the block succeeds.

    The folder gets lora-audit's marker file. An existing folder at ``path`` is replaced only when
    it carries that marker and ``overwrite`` is True (OutputError otherwise, raised before the
    block runs); an empty folder is replaced.

    >>> with atomic_dir("out/adapter", what="finetune") as tmp:
    ...     (tmp / "adapter_config.json").write_text("{}")
    """
    path = Path(path)
    check_output_dir(path, overwrite=overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        write_marker(tmp, what)
        os.chmod(tmp, _default_mode("dir"))
        if path.exists():
            check_output_dir(path, overwrite=overwrite)  # again: it may have changed meanwhile
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
