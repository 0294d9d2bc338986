"""The screen folder: an append-only store of per-adapter records that survives being killed.

    DIR/.lora-audit-output     the tool's marker (``lora_audit.io``): what="screen"
    DIR/screen.json            the setup every record was computed with (``ScreenSetup``)
    DIR/records/part-*.jsonl   records, one JSON object (``ScreenRecord``) per line; a new shard
                               per run, and every ``SHARD_BYTES`` bytes (never appended to by
                               two runs)
    DIR/index.jsonl            one line per stored record: adapter, fingerprint, status, shard,
                               line, byte offset and length, and the sha256 of the record's bytes
    DIR/.lock                  held (flock) while a screen writes the folder

Each record is appended with one write and fsync'd, then its index line is appended and fsync'd.
A record counts as stored only when its index line is complete and the bytes it points at have
that sha256: a run killed at any moment leaves every earlier record intact, and at most a torn
record (ignored: no index line) and a torn last index line (cut off when the store is next
opened). So a killed screen loses at most the adapters that were in flight. One process writes
(the screen's driver; workers send their records to it), and the lock refuses a second one.

The folder comes into being whole (``atomic_dir``: marker and screen.json, or nothing); a later
run continues it only with ``resume`` and the same setup, or replaces it with ``overwrite``.

The store never follows a link inside its folder: every name it reads or writes (the files above,
records/ and its shards, the summary files) must be a regular file or folder, not a symbolic
link, FIFO or device (an OutputError before anything is written), and files are opened relative to
the folder's own descriptor with O_NOFOLLOW, so a link put there later is not followed either. A
damaged store is not a crash: an index line pointing outside its shard is skipped with a warning,
a record that cannot be read is recomputed, a missing records/ or index.jsonl is made again (every
adapter is then screened again).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import stat
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError, OutputError
from ..io import atomic_dir, file_kind, is_tool_folder, MARKER, parse_json, read_user_json, user_path, utf8
from ..results.schema import parse
from ..results.screen import ScreenRecord, ScreenSetup
from ..text import printable

SETUP_FILE = "screen.json"
INDEX_FILE = "index.jsonl"
RECORDS = "records"
LOCK_FILE = ".lock"
SHARD_BYTES = 64 * 2**20
# What the end of a screen writes into the folder (``screen.summary``).
SUMMARY_JSON, SUMMARY_CSV, REPORT, DETAIL = "summary.json", "summary.csv", "report.html", "detail"
# Every name of the folder, and whether it is a folder: the store refuses links and special files there.
LAYOUT = {MARKER: False, SETUP_FILE: False, INDEX_FILE: False, LOCK_FILE: False, SUMMARY_JSON: False,
          SUMMARY_CSV: False, REPORT: False, RECORDS: True, DETAIL: True}
MAX_WARNINGS = 5  # skipped index lines reported one by one; the rest are counted
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # opening a FIFO never waits for a writer
_DIR_FDS = os.open in os.supports_dir_fd


@dataclass(frozen=True)
class Stored:
    """An index line: where one adapter's record lies and what it says in brief."""

    adapter: str
    fingerprint: str
    status: str
    shard: str
    line: int
    offset: int
    length: int
    sha256: str

    @property
    def location(self) -> str:
        return f"{RECORDS}/{self.shard}:{self.line}"

    def problem(self) -> str | None:
        """Why this entry cannot point at a record the store wrote, or None."""
        if not self.shard or "/" in self.shard or "\\" in self.shard or self.shard in (".", "..") \
                or self.shard.startswith("."):
            return f"shard {self.shard!r} is not a file name in {RECORDS}/"
        if not (0 <= self.offset < 2**62 and 0 < self.length < 2**31 and self.line >= 1):
            return f"offset {self.offset}, length {self.length}, line {self.line}: out of range"
        return None


def _fsync_dir(fd: int | None, folder: Path) -> None:
    """Make a new file's name durable (POSIX: fsync the folder, by its descriptor ``fd`` when there
    is one); a no-op where that is not possible."""
    own = fd is None
    try:
        if own:
            fd = os.open(folder, os.O_RDONLY)
        os.fsync(fd)  # type: ignore[arg-type]
    except OSError:
        pass
    finally:
        if own and fd is not None:
            os.close(fd)


def _append(fh, data: bytes) -> int:
    """Append ``data`` durably to the open file ``fh``; the offset it starts at."""
    offset = fh.seek(0, os.SEEK_END)
    fh.write(data)
    fh.flush()
    os.fsync(fh.fileno())
    return offset


class ScreenStore:
    """The store of one screen folder (see the module docstring). Use ``ScreenStore.open``; close it
    (or use it as a context manager) to release the lock."""

    def __init__(self, folder: Path, setup: ScreenSetup, lock_fd: int | None):
        self.folder, self.setup, self._lock_fd = folder, setup, lock_fd
        self.warnings: list[str] = []
        self.latest: dict[str, Stored] = {}
        self._dir_fd = self._records_fd = self._index_fd = None
        self._shard = None
        self._shard_name = ""
        self._shard_lines = 0
        self._shards_made = 0
        try:
            self._dir_fd = _open_dir(folder, None)
            self._records_fd = self._records()
            self._index_fd = self._open_index()
            self._read_index()
        except BaseException:
            self.close()
            raise

    # ---- opening ------------------------------------------------------------------------------
    @classmethod
    def open(cls, folder: str | os.PathLike, setup: ScreenSetup, *, resume: bool = False,
             overwrite: bool = False) -> ScreenStore:
        """Create the screen folder, or continue it (``resume``: its setup must equal ``setup``), or
        replace an earlier lora-audit folder (``overwrite``). OutputError/InputError saying which
        option to use otherwise, before anything is written."""
        folder = user_path(folder)
        existing = is_tool_folder(folder) and (folder / SETUP_FILE).is_file()
        if existing and not overwrite:
            check_layout(folder)
            if not resume:
                raise OutputError(f"{folder}: holds an earlier screen; pass --resume to continue it (adapters "
                                  "already screened are skipped) or --overwrite to start again")
            cls._check_setup(folder, setup)
        else:
            if resume and not overwrite and folder.is_dir() and any(folder.iterdir()):
                raise OutputError(f"{folder}: is not a screen folder, so there is nothing to resume; give the "
                                  "folder of an earlier 'lora-audit screen --out'")
            with atomic_dir(folder, overwrite=overwrite, what="screen") as tmp:
                (tmp / RECORDS).mkdir()
                (tmp / INDEX_FILE).write_bytes(b"")
                (tmp / SETUP_FILE).write_text(json.dumps(setup.to_json(), indent=2) + "\n", encoding="utf-8")
        return cls(folder, setup, _lock(folder))

    @staticmethod
    def _check_setup(folder: Path, setup: ScreenSetup) -> None:
        path = folder / SETUP_FILE
        old = ScreenSetup.from_json(read_user_json(path, "screen setup"), source=str(path))
        a, b = old.comparable(), setup.comparable()
        diff = [f"{k}: {printable(a[k])} then, {printable(b[k])} now" for k in a if a[k] != b[k]]
        if diff:
            raise InputError(f"{folder}: was screened with other settings or another base ({'; '.join(diff)}); "
                             "its records would not be comparable. Use the same settings to resume, or a new "
                             "folder (or --overwrite) for a new screen")

    # ---- the index ----------------------------------------------------------------------------
    def _records(self) -> int | None:
        """The records/ folder (made again, with a warning, when it is missing)."""
        path = self.folder / RECORDS
        try:
            os.lstat(path)
        except FileNotFoundError:
            os.mkdir(RECORDS if _DIR_FDS else path, dir_fd=self._dir_fd if _DIR_FDS else None)
            self.warnings.append(f"{path}: was missing, so every stored record is lost; made it again (the adapters "
                                 "are screened again)")
        return _open_dir(path, self._dir_fd, RECORDS)

    def _open_index(self) -> int:
        """index.jsonl, open for reading and appending (made again, with a warning, when it is missing)."""
        path = self.folder / INDEX_FILE
        try:
            return _open_file(path, self._dir_fd, INDEX_FILE, os.O_RDWR | os.O_APPEND)
        except FileNotFoundError:
            self.warnings.append(f"{path}: was missing, so the stored records cannot be found; made it again (the "
                                 "adapters are screened again)")
            return _open_file(path, self._dir_fd, INDEX_FILE, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL)

    def _read_index(self) -> None:
        """Load the index: the last complete line per adapter. A torn last line (a run killed while
        writing it) is cut off; a line that is not a valid entry is skipped with a warning."""
        path = self.folder / INDEX_FILE
        data = _read_all(self._index_fd)  # type: ignore[arg-type]
        end = data.rfind(b"\n") + 1
        if end < len(data):
            os.ftruncate(self._index_fd, end)  # type: ignore[arg-type]
        skipped = 0
        for i, raw in enumerate(data[:end].splitlines(), start=1):
            try:
                entry = parse(Stored, parse_json(raw.decode("utf-8"), path, line=i), str(path), what=f"line {i}")
                problem = entry.problem()
            except (InputError, UnicodeDecodeError) as e:
                problem = str(e)
            if problem is None:
                self.latest[entry.adapter] = entry
                continue
            skipped += 1
            if skipped <= MAX_WARNINGS:
                self.warnings.append(f"{path}: line {i} skipped ({printable(problem)})")
        if skipped > MAX_WARNINGS:
            self.warnings.append(f"{path}: {skipped - MAX_WARNINGS} more lines skipped")

    def verified(self, entry: Stored) -> bool:
        """True when the bytes ``entry`` points at are there and have its sha256."""
        try:
            return hashlib.sha256(self._bytes(entry)).hexdigest() == entry.sha256
        except (OSError, InputError):
            return False

    def _bytes(self, entry: Stored) -> bytes:
        """The bytes ``entry`` points at; InputError when its shard is not a regular file of the
        store or does not hold them."""
        where = self.folder / entry.location
        problem = entry.problem()
        if problem is not None:
            raise InputError(f"{where}: damaged index entry ({problem}); resume the screen to recompute it")
        fd = _open_file(self.folder / RECORDS / entry.shard, self._records_fd, entry.shard, os.O_RDONLY)
        try:
            if entry.offset + entry.length > os.fstat(fd).st_size:
                raise InputError(f"{where}: the index points past the end of the shard (damaged or cut short); "
                                 "resume the screen to recompute it")
            return os.pread(fd, entry.length, entry.offset)
        finally:
            os.close(fd)

    def read(self, entry: Stored) -> ScreenRecord:
        """The record ``entry`` points at, checked against its sha256 and the record schema."""
        where = f"{self.folder / entry.location}"
        try:
            data = self._bytes(entry)
        except OSError as e:
            raise InputError(f"{where}: cannot read the stored record ({e.strerror or e}); resume the screen to "
                             "recompute it") from None
        if hashlib.sha256(data).hexdigest() != entry.sha256:
            raise InputError(f"{where}: the stored record does not match its index entry (edited or damaged); "
                             "resume the screen to recompute it")
        return ScreenRecord.from_json(parse_json(data.decode("utf-8"), where), source=where)

    # ---- appending ----------------------------------------------------------------------------
    def append(self, record: dict[str, Any]) -> Stored:
        """Store one record (a ``ScreenRecord.to_json()`` dict) durably, then index it. Names that are
        not UTF-8 (lone surrogates) are stored as JSON escapes and read back unchanged (``io.utf8``)."""
        line = utf8(json.dumps(record, ensure_ascii=False, allow_nan=False, separators=(",", ":")) + "\n")
        if self._shard is None or self._shard.tell() + len(line) > SHARD_BYTES:
            self._new_shard()
        offset = _append(self._shard, line)
        self._shard_lines += 1
        entry = Stored(adapter=record["adapter"], fingerprint=record["fingerprint"], status=record["status"],
                       shard=self._shard_name, line=self._shard_lines, offset=offset, length=len(line),
                       sha256=hashlib.sha256(line).hexdigest())
        _write_all(self._index_fd, utf8(json.dumps(asdict(entry), ensure_ascii=False) + "\n"))  # type: ignore[arg-type]
        os.fsync(self._index_fd)  # type: ignore[arg-type]
        self.latest[entry.adapter] = entry
        return entry

    def _new_shard(self) -> None:
        if self._shard is not None:
            self._shard.close()
        self._shards_made += 1
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        self._shard_name = f"part-{stamp}-{secrets.token_hex(4)}-{self._shards_made:04d}.jsonl"
        # a new file, never another run's (O_EXCL: not a link either)
        fd = _open_file(self.folder / RECORDS / self._shard_name, self._records_fd, self._shard_name,
                        os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        self._shard = os.fdopen(fd, "wb")  # type: ignore[assignment]
        self._shard_lines = 0
        _fsync_dir(self._records_fd, self.folder / RECORDS)  # the new name is durable

    # ---- closing ------------------------------------------------------------------------------
    def close(self) -> None:
        if self._shard is not None:
            self._shard.close()
        self._shard = None
        for name in ("_index_fd", "_records_fd", "_dir_fd", "_lock_fd"):  # the lock's last: releases the flock
            fd = getattr(self, name)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)

    def __enter__(self) -> ScreenStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_layout(folder: Path) -> None:
    """OutputError when a name of the screen folder (``LAYOUT``) is a symbolic link, or not the
    regular file or folder the store writes there: the store would follow it out of the folder (or
    wait forever on a FIFO). Names that are absent are fine."""
    for name, is_dir in LAYOUT.items():
        path = folder / name
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        want = "folder" if is_dir else "regular file"
        got = file_kind(st.st_mode)
        if got != want or (name == DETAIL and not is_tool_folder(path)):
            what = got if got != want else "folder lora-audit did not write"
            raise OutputError(f"{path}: is a {what}, not the {want} lora-audit writes there; the screen folder "
                              "has been changed by hand, so it is not continued (start again with --overwrite, "
                              "or give a new folder)")


def _open_dir(path: Path, dir_fd: int | None, name: str | None = None) -> int | None:
    """A descriptor of the folder ``path`` (``name`` in ``dir_fd``), never through a link; None where
    descriptors of folders cannot be used (then paths are)."""
    if not _DIR_FDS:
        return None
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _NOFOLLOW
    try:
        if dir_fd is None:
            return os.open(path, flags)
        return os.open(name, flags, dir_fd=dir_fd)  # type: ignore[arg-type]
    except OSError as e:
        raise OutputError(f"{path}: cannot open this folder of the screen store ({e.strerror or e}); it must be a "
                          "folder, not a link (start again with --overwrite, or give a new folder)") from None


def _open_file(path: Path, dir_fd: int | None, name: str, flags: int) -> int:
    """``os.open`` of a regular file of the store: never through a link (O_NOFOLLOW), never waiting
    on a FIFO; FileNotFoundError when it is absent, InputError when it is not a regular file."""
    flags |= _NOFOLLOW | _NONBLOCK
    try:
        fd = os.open(name, flags, 0o666, dir_fd=dir_fd) if dir_fd is not None else os.open(path, flags, 0o666)
    except FileNotFoundError:
        raise
    except OSError as e:
        if os.path.islink(path):
            raise InputError(f"{path}: is a symbolic link; the screen store never follows links") from None
        raise InputError(f"{path}: cannot open this file of the screen store ({e.strerror or e})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise InputError(f"{path}: is a {file_kind(mode)}, not a file of the screen store")
    if _NONBLOCK:
        os.set_blocking(fd, True)
    return fd


def _read_all(fd: int) -> bytes:
    chunks = []
    offset = 0
    while chunk := os.pread(fd, 1 << 20, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _lock(folder: Path) -> int | None:
    """Hold an exclusive lock on DIR/.lock for this process (None where flock does not exist);
    OutputError when another screen holds it."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return None
    try:
        fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT | _NOFOLLOW | _NONBLOCK, 0o644)
    except OSError as e:
        raise OutputError(f"{folder / LOCK_FILE}: cannot open the screen's lock file ({e.strerror or e}); it must "
                          "be a regular file, not a link") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OutputError(f"{folder / LOCK_FILE}: is not a regular file; the screen folder has been changed by hand "
                          "(start again with --overwrite, or give a new folder)")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise OutputError(f"{folder}: another lora-audit screen is writing this folder (it holds {LOCK_FILE}); "
                          "wait for it to finish, or give another folder") from None
    return fd
