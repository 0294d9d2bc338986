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
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError, OutputError
from ..io import atomic_dir, is_tool_folder, parse_json, read_user_json
from ..results.schema import parse
from ..results.screen import ScreenRecord, ScreenSetup
from ..text import printable

SETUP_FILE = "screen.json"
INDEX_FILE = "index.jsonl"
RECORDS = "records"
LOCK_FILE = ".lock"
SHARD_BYTES = 64 * 2**20


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


def _fsync_dir(folder: Path) -> None:
    """Make a new file's name durable (POSIX: fsync the folder); a no-op where that is not possible."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
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
        self._index = None
        self._shard = None
        self._shard_name = ""
        self._shard_lines = 0
        self._shards_made = 0
        self._read_index()
        self._index = open(folder / INDEX_FILE, "ab")

    # ---- opening ------------------------------------------------------------------------------
    @classmethod
    def open(cls, folder: str | os.PathLike, setup: ScreenSetup, *, resume: bool = False,
             overwrite: bool = False) -> "ScreenStore":
        """Create the screen folder, or continue it (``resume``: its setup must equal ``setup``), or
        replace an earlier lora-audit folder (``overwrite``). OutputError/InputError saying which
        option to use otherwise, before anything is written."""
        folder = Path(folder).expanduser()
        existing = is_tool_folder(folder) and (folder / SETUP_FILE).is_file()
        if existing and not overwrite:
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
    def _read_index(self) -> None:
        """Load the index: the last complete line per adapter. A torn last line (a run killed while
        writing it) is cut off; a line that is not a valid entry is skipped with a warning."""
        path = self.folder / INDEX_FILE
        data = path.read_bytes() if path.is_file() else b""
        end = data.rfind(b"\n") + 1
        if end < len(data):
            with open(path, "r+b") as fh:
                fh.truncate(end)
        for i, raw in enumerate(data[:end].splitlines(), start=1):
            try:
                entry = parse(Stored, parse_json(raw.decode("utf-8"), path, line=i), str(path), what=f"line {i}")
            except (InputError, UnicodeDecodeError) as e:
                self.warnings.append(f"{path}: line {i} skipped ({printable(e)})")
                continue
            self.latest[entry.adapter] = entry

    def verified(self, entry: Stored) -> bool:
        """True when the bytes ``entry`` points at are there and have its sha256."""
        try:
            return hashlib.sha256(self._bytes(entry)).hexdigest() == entry.sha256
        except OSError:
            return False

    def _bytes(self, entry: Stored) -> bytes:
        with open(self.folder / RECORDS / Path(entry.shard).name, "rb") as fh:
            fh.seek(entry.offset)
            return fh.read(entry.length)

    def read(self, entry: Stored) -> ScreenRecord:
        """The record ``entry`` points at, checked against its sha256 and the record schema."""
        where = f"{self.folder / entry.location}"
        data = self._bytes(entry)
        if hashlib.sha256(data).hexdigest() != entry.sha256:
            raise InputError(f"{where}: the stored record does not match its index entry (edited or damaged); "
                             "resume the screen to recompute it")
        return ScreenRecord.from_json(parse_json(data.decode("utf-8"), where), source=where)

    # ---- appending ----------------------------------------------------------------------------
    def append(self, record: dict[str, Any]) -> Stored:
        """Store one record (a ``ScreenRecord.to_json()`` dict) durably, then index it."""
        line = (json.dumps(record, ensure_ascii=False, allow_nan=False, separators=(",", ":")) + "\n").encode()
        if self._shard is None or self._shard.tell() + len(line) > SHARD_BYTES:
            self._new_shard()
        offset = _append(self._shard, line)
        self._shard_lines += 1
        entry = Stored(adapter=record["adapter"], fingerprint=record["fingerprint"], status=record["status"],
                       shard=self._shard_name, line=self._shard_lines, offset=offset, length=len(line),
                       sha256=hashlib.sha256(line).hexdigest())
        _append(self._index, (json.dumps(asdict(entry), ensure_ascii=False) + "\n").encode())
        self.latest[entry.adapter] = entry
        return entry

    def _new_shard(self) -> None:
        if self._shard is not None:
            self._shard.close()
        self._shards_made += 1
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        self._shard_name = f"part-{stamp}-{secrets.token_hex(4)}-{self._shards_made:04d}.jsonl"
        self._shard = open(self.folder / RECORDS / self._shard_name, "xb")  # a new file, never another run's
        self._shard_lines = 0
        _fsync_dir(self.folder / RECORDS)

    # ---- closing ------------------------------------------------------------------------------
    def close(self) -> None:
        for fh in (self._shard, self._index):
            if fh is not None:
                fh.close()
        self._shard = self._index = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def __enter__(self) -> "ScreenStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _lock(folder: Path) -> int | None:
    """Hold an exclusive lock on DIR/.lock for this process (None where flock does not exist);
    OutputError when another screen holds it."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return None
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise OutputError(f"{folder}: another lora-audit screen is writing this folder (it holds {LOCK_FILE}); "
                          "wait for it to finish, or give another folder") from None
    return fd
