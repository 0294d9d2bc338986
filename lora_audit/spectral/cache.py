"""The on-disk base-spectrum cache: the thin SVD of each base matrix, computed once.

The base spectrum W0 = U diag(S) Vh does not change between audits, so a hub screening many
adapters of one base pays each base SVD once. One entry per base matrix, in one folder:

    <root>/<key>.safetensors      tensors U (m, p), S (p,), Vh (p, n); never pickle
    key = sha256("lora-audit-spectrum/1", dtype, shape, raw bytes of W0)
    mac = HMAC-SHA256(secret, [format, version, key, dtype, shape] || U || S || Vh)

The key is a content hash of the tensor itself (not its name or file), so a renamed or
re-saved checkpoint with the same weights hits, and a different tensor never does. The dtype
is part of the key and the spectrum is stored in the dtype it was computed in: a ``--float64``
audit never reads a float32 spectrum, and vice versa. The key does not depend on the entry
format ``VERSION``, so an entry of an older format is found under its key and rebuilt.

Integrity: entries are written atomically (``lora_audit.io.atomic_write_bytes``: temporary
file, fsync, rename), and every read is verified: the safetensors header must parse, its
metadata must name this format, ``VERSION``, the key, dtype and shape, the tensors must have
the shapes (m, p), (p,), (p, n) and fill the file exactly, and the MAC, recomputed over the
key, dtype and shape the reader expects and the payload as read (one pass over the memory-
mapped file), must equal the one stored. A truncated, bit-flipped, mislabelled, renamed,
forged or older-format entry is reported with a ``CacheWarning``, deleted and recomputed:
never used.

The secret: 32 random bytes in a key file OUTSIDE the cache folder (``key_file()``:
``$LORA_AUDIT_CACHE_KEY_FILE``, else ``cache-key`` in the config folder ``config_root()``),
created on first use with mode 0600; a key file that other users can access, or that is not
a regular file of 32 bytes, is refused (``InputError``). Teams that share one cache folder
across machines give every machine the same key file; entries written under another key fail
verification and are recomputed.

Trust model. The cache protects against:

- corruption and truncation (disk errors, a killed writer, a full disk);
- stale or swapped entries: an entry copied or renamed to another key's file name (its
  metadata edited to match or not), an entry of an older format (version 1 carried only a
  CRC-32), an entry written with another key file;
- forgery by anyone who can write the cache folder but cannot read your key file: without
  the secret they cannot compute a MAC that verifies (HMAC-SHA256; reading entries reveals
  nothing about the secret), so they cannot make an audit use spectra of their choosing,
  which could hide intruder dimensions or invent them.

It does not protect against:

- anyone who can read your key file, or write your config folder or home (they can forge
  entries, or replace the key file or lora-audit itself); everyone holding a shared key file
  is trusted;
- an entry edited in place while an audit has it memory-mapped: an entry is verified once,
  as it is read, and its tensors are views of a copy-on-write mapping of the file, which
  shows later writes to the file (lora-audit itself only ever replaces entries by rename);
- deletion of entries or a full disk by someone who can write the cache folder: the audit
  then recomputes the spectra (slower, same results). Entries are not secret: anyone who can
  read the folder learns the base matrices' spectra.

``SpectrumCache.entries`` / ``clear`` (``lora-audit cache ls|clear``) touch only files that are
provably the cache's own (``scan``): regular files named ``<64 hex digits>.safetensors`` whose
header says format ``lora-audit-spectrum`` (any version), and the writer's leftover temporary
files. Anything else in the folder is counted as ignored, never listed as an entry or deleted.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import mmap
import os
import re
import secrets
import stat
import struct
import tempfile
import threading
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import Tensor

from ..errors import InputError
from ..io import atomic_write_bytes
from .exact import base_spectrum as _compute_spectrum
from .types import BaseSpectrum

FORMAT = "lora-audit-spectrum"
VERSION = "2"  # entry layout and its check: 1 = CRC-32 of the payload, 2 = HMAC-SHA256
_KEY_SCHEME = f"{FORMAT}/1"  # what tensor_key hashes; changing it orphans every entry
SUFFIX = ".safetensors"
_DTYPES = {torch.float32: "float32", torch.float64: "float64"}
_BY_NAME = {name: dtype for dtype, name in _DTYPES.items()}
_ST_DTYPES = {torch.float32: "F32", torch.float64: "F64"}
_ALIGN = 64  # bytes: payload alignment of new entries (a cache line)
_ENTRY_NAME = re.compile(r"[0-9a-f]{64}\.safetensors")
# what lora_audit.io.atomic_write_bytes leaves when killed: tempfile.mkstemp(prefix=".<name>.",
# suffix=".tmp") with tempfile's 8 random characters from [a-z0-9_]
_TEMP_NAME = re.compile(r"\.[0-9a-f]{64}\.safetensors\.[a-z0-9_]{8}\.tmp")

CONFIG_ENV = "LORA_AUDIT_CONFIG"
KEY_FILE_ENV = "LORA_AUDIT_CACHE_KEY_FILE"
SECRET_BYTES = 32


class CacheWarning(UserWarning):
    """A cache entry was unreadable or failed verification and is being rebuilt."""


class _OldFormat(ValueError):
    """An entry of this cache's format but another (older) version; the message is the version."""


# ---- the secret ----------------------------------------------------------------------------------
def config_root() -> Path:
    """LORA_AUDIT_CONFIG, else $XDG_CONFIG_HOME/lora-audit, else ~/.config/lora-audit."""
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CONFIG_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".config") / "lora-audit"


def key_file() -> Path:
    """The cache's key file: $LORA_AUDIT_CACHE_KEY_FILE, else ``<config_root()>/cache-key``."""
    env = os.environ.get(KEY_FILE_ENV)
    return Path(env).expanduser() if env else config_root() / "cache-key"


def load_secret() -> bytes:
    """The 32-byte secret that authenticates cache entries, from ``key_file()``.

    The default key file is created when missing (random bytes, mode 0600, race-free: when
    another process creates it first, its key is used). A key file named by
    $LORA_AUDIT_CACHE_KEY_FILE must exist (a team's shared key is copied, not invented).
    Raises InputError, saying how to fix it, for a key file that is not a regular file of 32
    bytes, that users other than its owner may access, or that cannot be read or created."""
    path = key_file()
    try:
        return _read_secret(path)
    except FileNotFoundError:
        if os.environ.get(KEY_FILE_ENV):
            raise InputError(f"{KEY_FILE_ENV}={path}: no such file. Copy your team's cache key file there, or unset "
                             f"{KEY_FILE_ENV} to use (and create) {config_root() / 'cache-key'}") from None
    _create_secret(path)
    try:
        return _read_secret(path)
    except FileNotFoundError:  # a dangling symbolic link makes the creation fail quietly
        raise InputError(f"{path}: cannot use this cache key file (a broken link?); remove it, a new key is "
                         "created on the next run") from None


def _read_secret(path: Path) -> bytes:
    """The key file's 32 bytes; FileNotFoundError when absent, InputError when unusable."""
    try:  # O_NONBLOCK: opening a FIFO must not wait for a writer (regular files ignore it)
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise
    except OSError as e:
        raise InputError(f"{path}: cannot read the cache key file ({e.strerror or e})") from None
    try:
        st = os.fstat(fd)
        data = os.read(fd, SECRET_BYTES + 1) if stat.S_ISREG(st.st_mode) else b""
    finally:
        os.close(fd)
    fix = "remove it (a new key is created on the next run; cached spectra are then recomputed once)"
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{path}: the cache key file is not a regular file; {fix}, or set {KEY_FILE_ENV} "
                         "to a key file")
    if os.name == "posix" and st.st_mode & 0o077:
        raise InputError(f"{path}: the cache key file may be accessed by other users (mode "
                         f"{stat.S_IMODE(st.st_mode):04o}); anyone who can read it can forge cache entries. "
                         f"Fix: chmod 600 {path}")
    if len(data) != SECRET_BYTES:
        raise InputError(f"{path}: the cache key file must hold exactly {SECRET_BYTES} bytes, it holds "
                         f"{st.st_size}; {fix}")
    return data


def _create_secret(path: Path) -> None:
    """Create the key file with fresh random bytes, unless another process does first.

    The bytes go to a temporary file (mkstemp: O_CREAT|O_EXCL, mode 0600) that is then hard-
    linked to ``path``: the link appears with its whole content, and fails when ``path``
    exists, so a concurrent reader never sees a half-written key and two processes never
    end up with different keys."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(secrets.token_bytes(SECRET_BYTES))
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:  # another process made one first: theirs is read next
                pass
        finally:
            os.unlink(tmp)
    except OSError as e:
        raise InputError(f"{path}: cannot create the cache key file ({e.strerror or e}). Set {KEY_FILE_ENV} to a "
                         f"file of {SECRET_BYTES} random bytes only you can read (head -c {SECRET_BYTES} "
                         "/dev/urandom > FILE; chmod 600 FILE), or run with --no-cache") from None


# ---- entries ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class CacheEntry:
    """One entry as ``ls`` shows it (read from the header only, no tensor data)."""

    key: str
    path: Path
    size: int  # bytes on disk
    shape: tuple[int, int] | None  # W0's (m, n); None when the metadata does not give it
    dtype: str | None
    created: float  # modification time, seconds since the epoch
    ok: bool  # current format and a consistent layout (the MAC is only checked on use)
    version: str | None = None  # the entry's format version
    problem: str | None = None  # why it is not ok (it is rebuilt on use, and cleared with the rest)

    def as_dict(self) -> dict:
        return {"key": self.key, "path": str(self.path), "bytes": self.size,
                "shape": list(self.shape) if self.shape else None, "dtype": self.dtype,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.created)), "ok": self.ok,
                "version": self.version, "problem": self.problem}


@dataclass(frozen=True)
class CacheScan:
    """What a cache folder holds: the entries, the writer's leftover temporary files, and how
    many other files (not the cache's own: never listed as entries, never deleted) it has."""

    entries: list[CacheEntry]
    temporary: list[Path]
    ignored: int


def _contiguous_bytes(t: Tensor) -> memoryview:
    """The raw bytes of ``t`` (on the CPU, contiguous) without a copy when possible."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    return memoryview(t.numpy()).cast("B")


def tensor_key(W0: Tensor) -> str:
    """Content hash of a base matrix: sha256 over format, dtype, shape and raw bytes (hex).

    sha256 runs at ~1.3 GB/s here (hardware SHA) and releases the GIL, so the prefetch thread
    can hash the next matrix while this one is decomposed.
    """
    if W0.dtype not in _DTYPES:
        raise ValueError(f"the spectrum cache holds float32 or float64 matrices, got {W0.dtype}")
    h = hashlib.sha256()
    h.update(f"{_KEY_SCHEME}|{_DTYPES[W0.dtype]}|{tuple(W0.shape)}|".encode())
    h.update(_contiguous_bytes(W0))
    return h.hexdigest()


def _payload_mac(secret: bytes, key: str, dtype: str, shape: tuple[int, int], U: Tensor, S: Tensor,
                 Vh: Tensor) -> str:
    """HMAC-SHA256 over the entry's identity (format, version, key, dtype, W0's shape) and the bytes
    of U, S, Vh in that order. The identity is a JSON list followed by a NUL byte, and the payload's
    length follows from the shape, so no two identities and payloads give the same message.

    HMAC-SHA256 (OpenSSL, SHA instructions) was the fastest keyed digest measured here: on the
    payload of a 4096 x 4096 float32 entry (128 MiB, memory-mapped) 99 ms against 36 ms for the
    CRC-32 it replaces, keyed BLAKE2b 175 ms, HMAC-SHA512 247 ms; it releases the GIL."""
    ident = json.dumps([FORMAT, VERSION, key, dtype, [int(d) for d in shape]]).encode() + b"\0"
    h = hmac.new(secret, ident, "sha256")
    for t in (U, S, Vh):
        h.update(_contiguous_bytes(t))
    return "hmac-sha256:" + h.hexdigest()


def _aligned_save(tensors: dict[str, Tensor], meta: dict[str, str]) -> bytes:
    """safetensors bytes whose payload starts at a multiple of ``_ALIGN`` (the JSON header is
    padded through a "pad" metadata field), so that a memory-mapped read gives tensors as aligned
    as freshly allocated ones: BLAS picks kernels by alignment, and a cached audit must give the
    same bits as an uncached one."""
    from safetensors.torch import save

    meta = {**meta, "pad": ""}
    out = save(tensors, metadata=meta)
    (n,) = struct.unpack("<Q", out[:8])
    if (8 + n) % _ALIGN:
        raw = len(bytes(out[8: 8 + n]).rstrip(b" "))  # the JSON before safetensors' own padding
        meta["pad"] = " " * ((-(8 + raw)) % _ALIGN)
        del out  # one payload copy at a time: entries of 8192 x 4096 matrices are ~200 MB
        out = save(tensors, metadata=meta)
    return out


def _numel(shape) -> int:
    out = 1
    for d in shape:
        out *= int(d)
    return out


def _header_from(fh) -> dict:
    """The safetensors JSON header at the start of the open file ``fh`` (ValueError when it is not
    one); ``fh`` is left at the first payload byte."""
    raw = fh.read(8)
    if len(raw) != 8:
        raise ValueError("shorter than a safetensors header")
    (n,) = struct.unpack("<Q", raw)
    if n > 10_000_000:
        raise ValueError(f"implausible header length {n}")
    text = fh.read(n)
    if len(text) != n:
        raise ValueError("truncated header")
    try:
        header = json.loads(text)
    except RecursionError:  # a header of deeply nested lists: hostile, not a bug
        raise ValueError("header nested too deeply") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    return header


def _layout(header: dict, start: int, file_size: int, dtype: torch.dtype,
            shape: tuple[int, int]) -> dict[str, tuple[int, list[int]]]:
    """Check that the tensors of a header (``__metadata__`` removed) are exactly U (m, p), S (p,),
    Vh (p, n) of ``dtype`` for W0's ``shape`` (m, n), and that the payload, starting at byte
    ``start``, fills a file of ``file_size`` bytes. {name: (absolute offset, shape)}; ValueError
    saying what differs otherwise."""
    m, n = shape
    p = min(m, n)
    shapes = {"U": [m, p], "S": [p], "Vh": [p, n]}
    if set(header) != set(shapes):
        raise ValueError(f"tensors {sorted(header)}, expected U, S, Vh")
    item = torch.empty((), dtype=dtype).element_size()
    out = {}
    for name, want in shapes.items():
        info = header[name]
        a, b = (int(x) for x in info["data_offsets"])
        if info["dtype"] != _ST_DTYPES[dtype] or list(info["shape"]) != want or b - a != item * _numel(want):
            raise ValueError(f"tensor {name}: expected {want} {_ST_DTYPES[dtype]}, got {info['shape']} {info['dtype']}")
        out[name] = (start + a, want)
    size = max(int(v["data_offsets"][1]) for v in header.values())
    if file_size != start + size:
        raise ValueError("payload size does not match the header")
    return out


def _entry_info(path: Path, st: os.stat_result) -> CacheEntry | None:
    """The entry at ``path`` when its header proves it is one of the cache's (format FORMAT, any
    version), else None. Its layout is checked against its metadata; the payload is not read."""
    try:
        with open(path, "rb") as fh:
            header = _header_from(fh)
            start = fh.tell()
    except (OSError, ValueError):
        return None
    meta = header.pop("__metadata__", None)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        return None
    version, shape, dtype, problem = meta.get("version"), None, meta.get("dtype"), None
    try:
        shape = tuple(int(d) for d in json.loads(meta["shape"]))
        if len(shape) != 2 or dtype not in _BY_NAME:
            raise ValueError(f"shape {meta['shape']}, dtype {dtype}")
        if version != VERSION:
            problem = f"format version {version}, rebuilt on use"
        else:
            _layout(header, start, st.st_size, _BY_NAME[dtype], shape)  # type: ignore[arg-type]
    except (KeyError, TypeError, ValueError) as e:
        problem = f"invalid: {e}"
        shape = shape if shape and len(shape) == 2 else None
    return CacheEntry(key=path.name[: -len(SUFFIX)], path=path, size=st.st_size, shape=shape,  # type: ignore[arg-type]
                      dtype=dtype if isinstance(dtype, str) else None, created=st.st_mtime, ok=problem is None,
                      version=version if isinstance(version, str) else None, problem=problem)


class SpectrumCache:
    """Base spectra on disk under ``root`` (created on first write).

    >>> cache = SpectrumCache("~/.cache/lora-audit/spectra")
    >>> base = cache.base_spectrum(W0, torch.device("cpu"))   # SVD on a miss, a file read on a hit

    ``hits``/``misses``/``rebuilt``/``write_errors`` count this object's lookups and writes (for
    tests and the bench). New entries are written in the background: ``flush()`` (which
    ``engine.audit`` calls at the end) waits for them. The secret (``load_secret``) is read at the
    first lookup or write; listing and clearing do not need it.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser()
        self.hits = 0
        self.misses = 0
        self.rebuilt = 0
        self.write_errors = 0
        self._lock = threading.Lock()  # the writer queue
        self._secret_lock = threading.Lock()  # not _lock: a queued write needs the secret
        self._secret: bytes | None = None
        self._writer: ThreadPoolExecutor | None = None
        self._pending: list[Future] = []

    def __repr__(self) -> str:
        return f"SpectrumCache({str(self.root)!r})"

    def secret(self) -> bytes:
        """The key file's secret (``load_secret``), read once per cache object; InputError when the
        key file is unusable."""
        with self._secret_lock:
            if self._secret is None:
                self._secret = load_secret()
            return self._secret

    # ---- lookups ----------------------------------------------------------------------------
    def path_for(self, key: str) -> Path:
        return self.root / f"{key}{SUFFIX}"

    def lookup(self, W0: Tensor, *, key: str | None = None) -> tuple[str, BaseSpectrum | None]:
        """(key, verified spectrum on the CPU) or (key, None) on a miss. A bad entry is warned
        about, deleted and reported as a miss. Safe to call from a background thread."""
        key = key or tensor_key(W0)
        return key, self.load(key, W0.dtype, (int(W0.shape[0]), int(W0.shape[1])))

    def load(self, key: str, dtype: torch.dtype, shape: tuple[int, int]) -> BaseSpectrum | None:
        """The verified spectrum stored under ``key`` for a base matrix of ``dtype`` and ``shape``
        (memory-mapped, on the CPU), or None on a miss. A bad entry is warned about, deleted and
        reported as a miss. For callers that know a matrix's key without holding the matrix (a
        screen's workers get the keys from the process that hashed the base)."""
        secret = self.secret()  # an unusable key file is the user's to fix: raised, not a miss
        path = self.path_for(key)
        if not path.is_file():
            return None
        try:
            spec = self._read(path, key, dtype, shape, secret)
        except _OldFormat as e:
            why = f"is from an older lora-audit (format version {e}, not authenticated)"
        except Exception as e:  # any failure to read or verify: never use it
            why = f"is corrupt ({e})"
        else:
            return spec
        warnings.warn(f"spectrum cache entry {path.name} {why}; deleting and recomputing it", CacheWarning,
                      stacklevel=3)
        self.rebuilt += 1
        try:
            path.unlink()
        except OSError:  # gone already, or a read-only cache: the entry is still not used
            pass
        return None

    def base_spectrum(self, W0: Tensor, device: torch.device | str | None = None, *,
                      key: str | None = None, found: BaseSpectrum | None = None) -> BaseSpectrum:
        """The thin SVD of W0 on ``device``: from the cache when present and valid, else computed
        (``exact.base_spectrum``, in W0's dtype) and stored. ``key``/``found`` come from an
        earlier ``lookup`` (the prefetch thread) to avoid hashing and reading twice.

        A new entry is written by a background thread (the next SVD does not wait for the disk);
        ``flush()`` waits for pending writes. A write that fails (disk full, read-only folder) is
        a ``CacheWarning``, not an error: the audit itself does not depend on it."""
        device = torch.device(device) if device is not None else W0.device
        if found is None:
            key, found = self.lookup(W0, key=key)
        if found is not None:
            self.hits += 1
            return BaseSpectrum(U=found.U.to(device), S=found.S.to(device), Vh=found.Vh.to(device), key=key)
        self.misses += 1
        spec = _compute_spectrum(W0.to(device), key=key)
        self._store_later(key, W0, spec)
        return spec

    def _store_later(self, key: str, W0: Tensor, spec: BaseSpectrum) -> None:
        with self._lock:
            if self._writer is None:
                self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lora-audit-cache-writer")
            # at most two entries waiting: their tensors are memory the audit would otherwise free
            while len(self._pending) >= 2:
                self._pending.pop(0).result()
            self._pending.append(self._writer.submit(self._store_quietly, key, W0.dtype, tuple(W0.shape), spec))

    def _store_quietly(self, key: str, dtype: torch.dtype, shape: tuple[int, int], spec: BaseSpectrum) -> None:
        try:
            self.store(key, SimpleNamespace(dtype=dtype, shape=shape), spec)  # type: ignore[arg-type]
        except Exception as e:
            warnings.warn(f"could not write spectrum cache entry {key[:16]}... to {self.root} ({e}); "
                          "the audit is unaffected", CacheWarning, stacklevel=1)
            self.write_errors += 1

    def flush(self) -> None:
        """Wait until every entry handed to the background writer is on disk (or has failed), and
        stop the writer thread (a new one starts with the next miss)."""
        with self._lock:
            pending, self._pending = self._pending, []
            writer, self._writer = self._writer, None
        for f in pending:
            f.result()
        if writer is not None:
            writer.shutdown(wait=True)

    def store(self, key: str, W0: Tensor, spec: BaseSpectrum) -> Path:
        """Write one entry now, atomically (a reader never sees half a file). Only W0's dtype and
        shape are used."""
        U, S, Vh = (t.detach().cpu().contiguous() for t in (spec.U, spec.S, spec.Vh))
        dtype, shape = _DTYPES[W0.dtype], tuple(W0.shape)
        meta = {"format": FORMAT, "version": VERSION, "key": key, "dtype": dtype, "shape": json.dumps(list(shape)),
                "mac": _payload_mac(self.secret(), key, dtype, shape, U, S, Vh)}  # type: ignore[arg-type]
        return atomic_write_bytes(self.path_for(key), _aligned_save({"U": U, "S": S, "Vh": Vh}, meta))

    def _read(self, path: Path, key: str, torch_dtype: torch.dtype, shape: tuple[int, int],
              secret: bytes) -> BaseSpectrum:
        """Read and verify one entry (_OldFormat or ValueError when it fails). The payload is
        memory-mapped copy-on-write (no read into a zero-filled buffer: for a 4096-wide matrix
        that copy cost more than the MAC), the tensors are views of the mapping, and the MAC
        is computed over those views: one pass over the payload. Entries are only ever replaced
        by rename, never rewritten in place, so the mapped pages stay the ones the MAC verified."""
        dtype = _DTYPES[torch_dtype]
        with open(path, "rb") as fh:
            header = _header_from(fh)
            start = fh.tell()
            meta = header.pop("__metadata__", None) or {}
            if meta.get("format") == FORMAT and meta.get("version") != VERSION:
                raise _OldFormat(meta.get("version"))
            want = {"format": FORMAT, "version": VERSION, "key": key, "dtype": dtype, "shape": json.dumps(list(shape))}
            bad = {k: meta.get(k) for k, v in want.items() if meta.get(k) != v}
            if bad:
                raise ValueError(f"metadata does not match: {bad}")
            where = _layout(header, start, os.fstat(fh.fileno()).st_size, torch_dtype, shape)
            buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)  # stays valid after close
        t = {}
        for name, (offset, want_shape) in where.items():
            t[name] = torch.frombuffer(buf, dtype=torch_dtype, offset=offset, count=_numel(want_shape)).view(want_shape)
            if offset % _ALIGN:  # BLAS kernels round differently on unaligned data: copy
                t[name] = t[name].clone()
        mac = _payload_mac(secret, key, dtype, shape, t["U"], t["S"], t["Vh"])
        if not hmac.compare_digest(mac.encode(), str(meta.get("mac")).encode()):
            raise ValueError("MAC mismatch: edited, copied from another entry, or written with another key file")
        return BaseSpectrum(U=t["U"], S=t["S"], Vh=t["Vh"], key=key)

    # ---- housekeeping -----------------------------------------------------------------------
    def scan(self) -> CacheScan:
        """What the folder holds (headers only, no payload read): entries oldest first, entries
        of any format version and inconsistent ones included (ok=False), the writer's leftover
        temporary files, and the number of other files. Only regular files (not links) whose
        name and header prove them the cache's own count as entries."""
        entries, temporary, ignored = [], [], 0
        try:
            names = sorted(os.listdir(self.root))
        except (FileNotFoundError, NotADirectoryError):
            return CacheScan([], [], 0)
        for name in names:
            path = self.root / name
            try:
                st = path.lstat()
            except FileNotFoundError:  # removed meanwhile
                continue
            regular = stat.S_ISREG(st.st_mode)
            entry = _entry_info(path, st) if regular and _ENTRY_NAME.fullmatch(name) else None
            if entry is not None:
                entries.append(entry)
            elif regular and _TEMP_NAME.fullmatch(name):
                temporary.append(path)
            else:
                ignored += 1
        return CacheScan(sorted(entries, key=lambda e: (e.created, e.key)), temporary, ignored)

    def entries(self) -> list[CacheEntry]:
        """The entries of ``scan()``."""
        return self.scan().entries

    def total_bytes(self) -> int:
        return sum(e.size for e in self.entries())

    def clear(self) -> tuple[int, int]:
        """Delete every entry and leftover temporary file of ``scan()``; (files removed, bytes
        freed). Nothing else in the folder is touched."""
        found = self.scan()
        n = freed = 0
        for path in [e.path for e in found.entries] + found.temporary:
            try:
                size = path.lstat().st_size
                path.unlink()
            except FileNotFoundError:
                continue
            n += 1
            freed += size
        return n, freed

