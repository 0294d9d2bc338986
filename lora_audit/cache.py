"""Authenticated on-disk caches: one folder of safetensors entries per kind, each entry verified
with a keyed hash before anything in it is used.

Two caches use it: the base spectra of the spectrum audit (``spectral.cache.SpectrumCache``)
and the base profiles of safety-scan (``scan.profile``). An entry is one safetensors file, never
pickle, written atomically (``lora_audit.io.atomic_write_bytes``)::

    <root>/<key>.safetensors     tensors, and metadata {format, version, key, mac, <fields>}
    mac = keyed BLAKE3(secret, JSON [format, version, key, {fields}] || NUL
                       || for each tensor in name order: JSON [name, dtype, shape] || NUL || bytes)

The identity and every field are authenticated with the payload; the JSON prefixes carry every
length, so no two (identity, tensors) give the same message. ``key`` is the entry's file name:
callers make it a content hash of what determines the entry (``content_key``).

Why keyed BLAKE3: the MAC is computed over every byte of an entry on every read, and a cached
audit reads one entry per base matrix (32 MiB for a 2048 x 2048 float32 matrix). HMAC-SHA256,
the previous MAC, ran at ~1.5 GB/s here and made the cached LoRA audit wait for its reader
thread; BLAKE3 (the ``blake3`` package, the reference Rust implementation) runs at memory speed on
one core (~5 GB/s measured on this machine's AVX-512 CPU), uses several threads for large buffers
(``_THREADED_FROM``) and releases the GIL while it hashes, so the audit's main thread works on.
Its keyed mode is a MAC with a 32-byte key, which the secret is.

Reading uses safetensors itself (``safe_open``): it parses and checks the header (offsets that
tile the payload and fill the file exactly, a bounded header size, JSON depth) and maps the file
copy-on-write, so the tensors are views of the page cache, not copies; the MAC is then computed
over those views, so what is used is what was verified. A tensor whose address is not 64-byte
aligned is copied (BLAS picks kernels by alignment, and a cached audit must give the same bits as
an uncached one): ``write`` pads the header so that the payload starts at a multiple of 64.

A read fails (``read`` raises, ``get`` warns with a ``CacheWarning``, deletes the entry and
returns None so that the caller recomputes it) when the file is not a safetensors file, its
metadata names another format, version or key, the caller's ``check`` refuses its fields or
shapes, or the MAC does not verify: truncated, bit-flipped, renamed, swapped, forged, written
with another key file, or of an older format (older formats are never trusted, even when their
own check would pass).

The secret: 32 random bytes in a key file OUTSIDE the cache folders (``key_file()``:
``$LORA_AUDIT_CACHE_KEY_FILE``, else ``cache-key`` in the config folder ``config_root()``),
created on first use with mode 0600; a key file that other users can access, or that is not a
regular file of 32 bytes, is refused (``InputError``). Teams that share one cache folder across
machines give every machine the same key file; entries written under another key fail
verification and are recomputed. The trust model (what this protects against and what not) is
in ``spectral.cache``'s docstring.

The verification memo: a cached audit reads one entry per base matrix, and hashing every byte of
every entry was a third of a cached 32-matrix audit's work (0.3 s of 2.2 s, measured by skipping
it). So a store remembers which entries it has verified in full, by the identity of their files,
in one more authenticated file, ``<root>/<format>.verified.json``::

    {"format", "version", "entries": {key: [st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns]},
     "sources": {record: [st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns, content key]},
     "mac": keyed BLAKE3(secret, JSON [format, memo version, entries, sources])}

and a later read of an entry whose file has the identity recorded (before and after it is
mapped) does not hash it again (on POSIX systems only: ``MEMO_SOUND``): the header, metadata and
the caller's ``check`` are still read and checked. "sources" does the same for the content keys
callers compute from other files (the spectrum cache: the key of a base matrix taken from a
tensor of a model's safetensors file, by ``source_key`` / ``remember_source``): while that file
keeps the identity it had when it was opened and hashed, its key is the one remembered, and the
matrix is not hashed again. What makes that sound: changing a file's bytes, renaming or linking
it sets its ctime to the current time, and no unprivileged process can set a ctime back (``utime`` sets
only the access and modification times), so an edited or replaced entry never has the identity
recorded and is verified (or hashed) in full. Timestamps have a granularity (a clock tick, or a second or
two on some file systems), so, as git does for its index, a file changed less than
``MEMO_MARGIN_NS`` before it was verified is not remembered: an edit within the same tick could
keep its ctime. The memo is written by ``save_memo`` (the spectrum cache calls it at the end of an
audit), merged with what other processes wrote, and forged, damaged or foreign memos are ignored
(every entry is then verified in full, as before); it is never written over a file of that name
that is not a memo of this format.

Housekeeping (``scan`` / ``clear``) touches only files that are provably the cache's own:
regular files named ``<64 hex digits>.safetensors`` whose header names this cache's format (any
version), the verification memo of this format, and the writer's leftover temporary files.
Anything else is counted as ignored.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import stat
import struct
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import blake3
import torch
from torch import Tensor

from .errors import InputError
from .io import atomic_write_bytes

CONFIG_ENV = "LORA_AUDIT_CONFIG"
KEY_FILE_ENV = "LORA_AUDIT_CACHE_KEY_FILE"
SECRET_BYTES = 32  # = blake3.KEY_LEN: the secret is the MAC's key as it is
MAC_PREFIX = "blake3-keyed:"
SUFFIX = ".safetensors"
_ALIGN = 64  # bytes: payload alignment of new entries (a cache line)
_THREADED_FROM = 4 << 20  # bytes: from this size a buffer is hashed by several threads
_RESERVED = ("format", "version", "key", "mac", "pad")
_ENTRY_NAME = re.compile(r"[0-9a-f]{64}\.safetensors")
# what lora_audit.io.atomic_write_bytes leaves when killed: tempfile.mkstemp(prefix=".<name>.",
# suffix=".tmp") with tempfile's 8 random characters from [a-z0-9_]
_TEMP_NAME = re.compile(r"\.[0-9a-f]{64}\.safetensors\.[a-z0-9_]{8}\.tmp")
MEMO_SUFFIX = ".verified.json"
MEMO_VERSION = "1"
MEMO_MARGIN_NS = 2_000_000_000  # a file changed this recently is not remembered (module docstring)
# POSIX systems set st_ctime to the time of the last change of the file (its bytes, name or links);
# on Windows st_ctime is the creation time, which an edit does not touch and mtime can be set back:
# there the memo is not used, and every entry is hashed on every read.
MEMO_SOUND = os.name == "posix"
_MEMO_MAX_BYTES = 64 << 20


class CacheWarning(UserWarning):
    """A cache entry was unreadable or failed verification and is being rebuilt."""


class StaleEntry(ValueError):
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
    """The caches' key file: $LORA_AUDIT_CACHE_KEY_FILE, else ``<config_root()>/cache-key``."""
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
    fix = "remove it (a new key is created on the next run; cached entries are then recomputed once)"
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


# ---- hashing ---------------------------------------------------------------------------------------
def raw_bytes(t: Tensor) -> memoryview:
    """The raw bytes of ``t`` (on the CPU, contiguous) without a copy when possible."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: the same bytes as int16
        t = t.view(torch.int16)
    return memoryview(t.numpy()).cast("B")  # type: ignore[arg-type]


def _hasher(secret: bytes | None, largest: int) -> blake3.blake3:
    """A BLAKE3 hasher (keyed when ``secret`` is given) that hashes on the pool of one thread per
    core when the largest buffer it will see has ``_THREADED_FROM`` bytes or more (a threaded hasher
    is up to 8x slower on buffers of ~100 KB: measured here), else on the calling thread."""
    threads = blake3.blake3.AUTO if largest >= _THREADED_FROM else 1
    return blake3.blake3(key=secret, max_threads=threads) if secret is not None else \
        blake3.blake3(max_threads=threads)


def content_key(scheme: str, *parts: str | Tensor) -> str:
    """A content hash (BLAKE3, 64 hex digits) of ``scheme`` and ``parts`` in order: strings by their
    UTF-8 text, tensors by dtype, shape and raw bytes; every part is framed by its length, so no
    two sequences of parts give the same message. ``scheme`` names what is hashed and how:
    changing it orphans every entry keyed with it."""
    h = _hasher(None, max([t.numel() * t.element_size() for t in parts if isinstance(t, Tensor)], default=0))
    h.update(f"{scheme}\0".encode())
    for part in parts:
        if isinstance(part, Tensor):
            data = raw_bytes(part)
            h.update(f"T{part.dtype}|{list(part.shape)}|{len(data)}\0".encode())
            h.update(data)
        else:
            text = str(part).encode()
            h.update(f"S{len(text)}\0".encode() + text)
    return h.hexdigest()


def entry_mac(secret: bytes, fmt: str, version: str, key: str, fields: Mapping[str, str],
              tensors: Mapping[str, Tensor]) -> str:
    """The MAC of an entry (module docstring): keyed BLAKE3 over its identity, fields and tensors."""
    h = _hasher(secret, max([t.numel() * t.element_size() for t in tensors.values()], default=0))
    h.update(json.dumps([fmt, version, key, dict(sorted(fields.items()))]).encode() + b"\0")
    for name in sorted(tensors):
        t = tensors[name]
        h.update(json.dumps([name, str(t.dtype).replace("torch.", ""), list(t.shape)]).encode() + b"\0")
        h.update(raw_bytes(t))
    return MAC_PREFIX + h.hexdigest()


# ---- entries ---------------------------------------------------------------------------------------
@dataclass
class Entry:
    """A verified entry: its key, fields (the metadata without format, version, key, mac) and
    tensors (views of a copy-on-write mapping of the file, on the CPU)."""

    key: str
    fields: dict[str, str]
    tensors: dict[str, Tensor]


@dataclass(frozen=True)
class EntryInfo:
    """One entry as a listing shows it (its header only; the MAC is only checked on use)."""

    key: str
    path: Path
    size: int  # bytes on disk
    created: float  # modification time, seconds since the epoch
    version: str | None
    fields: dict[str, str] = field(default_factory=dict)
    header: dict = field(default_factory=dict)  # the tensors' entries of the safetensors header
    problem: str | None = None  # why it would not be used (it is rebuilt on use, and cleared with the rest)


@dataclass(frozen=True)
class CacheScan:
    """What a cache folder holds: the entries, the writer's leftover temporary files, and how
    many other files (not the cache's own: never listed as entries, never deleted) it has."""

    entries: list  # EntryInfo, or what a cache makes of them (spectral.cache.CacheEntry)
    temporary: list[Path]
    ignored: int
    memo: Path | None = None  # the verification memo (module docstring), when there is one


def read_header(path: Path) -> dict:
    """The JSON header of a safetensors file, without mapping or checking its payload (a listing
    must name an entry whose payload is damaged, which ``safe_open`` refuses to open); ValueError
    when it is not one."""
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise ValueError("shorter than a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000:  # safetensors' own limit
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


def _aligned_save(tensors: Mapping[str, Tensor], meta: dict[str, str]) -> bytes:
    """safetensors bytes whose payload starts at a multiple of ``_ALIGN`` (the JSON header is
    padded through a "pad" metadata field), so that a memory-mapped read gives tensors as aligned
    as freshly allocated ones."""
    from safetensors.torch import save

    meta = {**meta, "pad": ""}
    out = save(dict(tensors), metadata=meta)
    (n,) = struct.unpack("<Q", out[:8])
    if (8 + n) % _ALIGN:
        raw = len(bytes(out[8: 8 + n]).rstrip(b" "))  # the JSON before safetensors' own padding
        meta["pad"] = " " * ((-(8 + raw)) % _ALIGN)
        del out  # one payload copy at a time: entries of 8192 x 4096 matrices are ~200 MB
        out = save(dict(tensors), metadata=meta)
    return out


class EntryStore:
    """The entries of one format under ``root`` (created on first write).

    >>> store = EntryStore("~/.cache/lora-audit/spectra", "lora-audit-spectrum", "3")
    >>> store.write(key, {"U": U, "S": S}, {"dtype": "float32"})
    >>> entry = store.get(key)       # verified, or None (a bad entry is warned about and deleted)

    ``secret``: the MAC key (bytes), or None to read ``load_secret()`` at the first read or write
    (listing and clearing never need it). ``rebuilt`` counts entries refused by ``get``."""

    def __init__(self, root: str | os.PathLike, fmt: str, version: str, *, secret: bytes | None = None,
                 what: str = "cache entry", max_bytes: int | None = None):
        self.root = Path(root).expanduser()
        self.format, self.version, self.what, self.max_bytes = fmt, version, what, max_bytes
        self._secret = secret
        self.rebuilt = 0
        self.memo_path = self.root / f"{fmt}{MEMO_SUFFIX}"
        self._memo: dict[str, list] | None = None  # read at the first use of the memo
        self._sources: dict[str, list] | None = None
        self._memo_new: dict[str, list] = {}  # remembered by this process, not yet saved
        self._sources_new: dict[str, list] = {}
        self._memo_lock = threading.Lock()  # reads run in the audit's reader thread
        self.memo_hits = 0  # reads that the memo spared a hash (for tests and the bench)

    def __repr__(self) -> str:
        return f"EntryStore({str(self.root)!r}, {self.format!r}, {self.version!r})"

    def secret(self) -> bytes:
        """The MAC key, read from the key file once (InputError when the key file is unusable)."""
        if self._secret is None:
            self._secret = load_secret()
        return self._secret

    def path_for(self, key: str) -> Path:
        return self.root / f"{key}{SUFFIX}"

    # ---- writing ----------------------------------------------------------------------------
    def write(self, key: str, tensors: Mapping[str, Tensor], fields: Mapping[str, str] | None = None) -> Path:
        """Write one entry now, atomically (a reader never sees half a file); its path."""
        fields = dict(fields or {})
        clash = sorted(set(fields) & set(_RESERVED))
        if clash:
            raise ValueError(f"reserved metadata field(s) {clash}")
        tensors = {n: t.detach().cpu().contiguous() for n, t in tensors.items()}
        meta = {"format": self.format, "version": self.version, "key": key, **fields,
                "mac": entry_mac(self.secret(), self.format, self.version, key, fields, tensors)}
        self.root.mkdir(parents=True, exist_ok=True)
        return atomic_write_bytes(self.path_for(key), _aligned_save(tensors, meta))

    # ---- reading ----------------------------------------------------------------------------
    def read(self, key: str, check: Callable[[dict[str, str], dict[str, Tensor]], None] | None = None) -> Entry:
        """The verified entry stored under ``key``. FileNotFoundError on a miss; StaleEntry for an
        entry of another version of this format; ValueError (or safetensors' SafetensorError) for
        anything else wrong. ``check(fields, tensors)`` raises ValueError when the fields or the
        tensors' names, dtypes or shapes are not what the caller expects; it runs before the MAC
        pass, so a mislabelled entry costs no hashing."""
        from safetensors import safe_open

        secret = self.secret()  # an unusable key file is the user's to fix: raised, not a miss
        path = self.path_for(key)
        before = os.stat(path)
        if self.max_bytes is not None and before.st_size > self.max_bytes:
            raise ValueError(f"larger than any entry ({before.st_size} bytes)")
        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata() or {})
            if meta.get("format") == self.format and meta.get("version") != self.version:
                raise StaleEntry(str(meta.get("version")))
            want = {"format": self.format, "version": self.version, "key": key}
            bad = {k: meta.get(k) for k, v in want.items() if meta.get(k) != v}
            if bad:
                raise ValueError(f"metadata does not match: {bad}")
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        fields = {k: v for k, v in meta.items() if k not in _RESERVED}
        if check is not None:
            check(fields, tensors)
        for name, t in tensors.items():
            if t.data_ptr() % _ALIGN:  # BLAS kernels round differently on unaligned data: copy
                tensors[name] = t.clone()
        identity = _identity(before)
        unchanged = identity == _identity(os.stat(path))  # the file mapped is the file stat'ed
        if unchanged and self._memo_has(key, identity):  # verified in full before, untouched since
            self.memo_hits += 1
            return Entry(key=key, fields=fields, tensors=tensors)
        mac = entry_mac(secret, self.format, self.version, key, fields, tensors)
        if not secrets.compare_digest(mac.encode(), str(meta.get("mac")).encode()):
            raise ValueError("its MAC does not verify (edited, copied from another entry, or written with "
                             "another key file)")
        if unchanged:
            self._remember(key, before)
        return Entry(key=key, fields=fields, tensors=tensors)

    # ---- the verification memo (module docstring) ----------------------------------------------
    def _memo_loaded(self) -> None:
        if self._memo is None:
            self._memo, self._sources = self._read_memo()

    def _memo_has(self, key: str, identity: list[int]) -> bool:
        if not MEMO_SOUND:
            return False
        with self._memo_lock:
            self._memo_loaded()
            return self._memo.get(key) == identity  # type: ignore[union-attr]

    @staticmethod
    def _settled(identity: list[int]) -> bool:
        """The file last changed at least MEMO_MARGIN_NS ago (its mtime and ctime: identity[3:5])."""
        return MEMO_SOUND and time.time_ns() - max(identity[3], identity[4]) >= MEMO_MARGIN_NS

    def _remember(self, key: str, st: os.stat_result) -> None:
        identity = _identity(st)
        if not self._settled(identity):
            return  # changed within a timestamp tick or two of now: an edit might keep this identity
        with self._memo_lock:
            self._memo_loaded()
            self._memo_new[key] = identity
            self._memo[key] = identity  # type: ignore[index]

    def source_key(self, record: str, identity: list[int]) -> str | None:
        """The content key remembered for ``record`` (the caller's name for one tensor of one file,
        with how it was read) while that file still has ``identity``; None if none is remembered."""
        if not MEMO_SOUND:
            return None
        with self._memo_lock:
            self._memo_loaded()
            found = self._sources.get(record)  # type: ignore[union-attr]
        return found[5] if found is not None and found[:5] == identity else None

    def remember_source(self, record: str, identity: list[int], key: str) -> None:
        """Remember that ``record``, read from a file of ``identity``, has the content key ``key``
        (computed from its bytes), unless the file changed too recently to be sure of it."""
        if not self._settled(identity):
            return
        with self._memo_lock:
            self._memo_loaded()
            self._sources_new[record] = [*identity, key]
            self._sources[record] = [*identity, key]  # type: ignore[index]

    def _memo_mac(self, entries: Mapping[str, list], sources: Mapping[str, list]) -> str:
        h = blake3.blake3(key=self.secret())
        h.update(json.dumps([self.format, MEMO_VERSION, dict(sorted(entries.items())),
                             dict(sorted(sources.items()))]).encode())
        return MAC_PREFIX + h.hexdigest()

    def _memo_file(self) -> dict | None:
        """The memo file's JSON when the file is a memo of this format (any key), else None."""
        try:
            st = self.memo_path.lstat()
            if not stat.S_ISREG(st.st_mode) or st.st_size > _MEMO_MAX_BYTES:
                return None
            doc = json.loads(self.memo_path.read_bytes())
        except (OSError, ValueError, RecursionError):
            return None
        return doc if isinstance(doc, dict) and doc.get("format") == self.format else None

    def _read_memo(self, doc: dict | None = None) -> tuple[dict[str, list], dict[str, list]]:
        """(verified entries, remembered source keys) of the memo file (or of its JSON ``doc``, read
        already); both empty when there is none, or it is damaged, forged, of another version or
        written with another key file."""
        doc = doc if doc is not None else self._memo_file()
        if doc is None or doc.get("version") != MEMO_VERSION:
            return {}, {}
        entries, sources = doc.get("entries"), doc.get("sources")

        def ints(v) -> bool:
            return isinstance(v, list) and len(v) >= 5 and all(type(x) is int for x in v[:5])

        if not (isinstance(entries, dict) and isinstance(sources, dict)
                and all(isinstance(k, str) and ints(v) and len(v) == 5 for k, v in entries.items())
                and all(isinstance(k, str) and ints(v) and len(v) == 6 and isinstance(v[5], str)
                        for k, v in sources.items())):
            return {}, {}
        if not secrets.compare_digest(self._memo_mac(entries, sources).encode(), str(doc.get("mac")).encode()):
            return {}, {}
        return entries, sources

    def save_memo(self) -> None:
        """Add what this process verified and remembered to the memo file (merged with what is there
        now; records of entries no longer present dropped), atomically. Not written over a file of
        that name that is not a memo of this format; a folder that cannot be written is no error
        (the next audit verifies and hashes in full)."""
        with self._memo_lock:
            new, self._memo_new = self._memo_new, {}
            new_sources, self._sources_new = self._sources_new, {}
        if not new and not new_sources:
            return
        doc = self._memo_file()
        if doc is None and self.memo_path.exists():
            return  # not ours: never replaced
        entries, sources = self._read_memo(doc)
        entries = {k: v for k, v in {**entries, **new}.items() if self.path_for(k).is_file()}
        sources = {**sources, **new_sources}
        doc = {"format": self.format, "version": MEMO_VERSION, "entries": entries, "sources": sources,
               "mac": self._memo_mac(entries, sources)}
        data = json.dumps(doc, sort_keys=True).encode()
        if len(data) > _MEMO_MAX_BYTES:  # too many source files remembered: keep the entries' records
            doc.update(sources={}, mac=self._memo_mac(entries, {}))
            data = json.dumps(doc, sort_keys=True).encode()
        try:
            atomic_write_bytes(self.memo_path, data)
        except OSError:
            pass

    def get(self, key: str, check: Callable[[dict[str, str], dict[str, Tensor]], None] | None = None
            ) -> Entry | None:
        """``read``, with a miss or a bad entry as None: a bad one is warned about (``CacheWarning``),
        deleted, counted in ``rebuilt``, and the caller recomputes it. An unusable key file is
        raised (InputError), not a miss."""
        path = self.path_for(key)
        if not path.is_file():
            return None
        try:
            return self.read(key, check)
        except InputError:
            raise
        except StaleEntry as e:
            why = f"is from an older lora-audit (format version {e}, not trusted)"
        except Exception as e:  # noqa: BLE001 - any failure to read or verify: never use it
            why = f"is corrupt ({e})"
        warnings.warn(f"{self.what} {path.name} {why}; deleting and recomputing it", CacheWarning, stacklevel=3)
        self.rebuilt += 1
        try:
            path.unlink()
        except OSError:  # gone already, or a read-only cache: the entry is still not used
            pass
        return None

    # ---- housekeeping -----------------------------------------------------------------------
    def info(self, path: Path, st: os.stat_result) -> EntryInfo | None:
        """The entry at ``path`` when its header proves it one of this format's (any version), else
        None; ``problem`` says why it would not be used (older version, or a layout safetensors
        refuses). The payload is not read."""
        try:
            header = read_header(path)
        except (OSError, ValueError):
            return None
        meta = header.pop("__metadata__", None)
        if not isinstance(meta, dict) or meta.get("format") != self.format:
            return None
        version, problem = meta.get("version"), None
        if version != self.version:
            problem = f"format version {version}: not used by this lora-audit (`lora-audit cache clear` removes it)"
        else:
            try:
                from safetensors import safe_open

                with safe_open(str(path), "pt"):
                    pass
            except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
                problem = f"invalid: {e}"
        return EntryInfo(key=path.name[: -len(SUFFIX)], path=path, size=st.st_size, created=st.st_mtime,
                         version=version if isinstance(version, str) else None,
                         fields={k: v for k, v in meta.items() if k not in _RESERVED and isinstance(v, str)},
                         header=header, problem=problem)

    def scan(self) -> CacheScan:
        """What the folder holds (headers only, no payload read): entries oldest first, those of
        any format version and inconsistent ones included (with a ``problem``), the writer's
        leftover temporary files, and the number of other files. Only regular files (not links)
        whose name and header prove them the cache's own count as entries."""
        entries, temporary, ignored, memo = [], [], 0, None
        memo_temp = re.compile(re.escape(f".{self.memo_path.name}.") + r"[a-z0-9_]{8}\.tmp")
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
            entry = self.info(path, st) if regular and _ENTRY_NAME.fullmatch(name) else None
            if entry is not None:
                entries.append(entry)
            elif regular and (_TEMP_NAME.fullmatch(name) or memo_temp.fullmatch(name)):
                temporary.append(path)
            elif name == self.memo_path.name and self._memo_file() is not None:
                memo = path
            else:
                ignored += 1
        return CacheScan(sorted(entries, key=lambda e: (e.created, e.key)), temporary, ignored, memo)

    def clear(self) -> tuple[int, int]:
        """Delete every entry, the verification memo and leftover temporary file of ``scan()``;
        (files removed, bytes freed). Nothing else in the folder is touched."""
        found = self.scan()
        n = freed = 0
        for path in [e.path for e in found.entries] + found.temporary + ([found.memo] if found.memo else []):
            try:
                size = path.lstat().st_size
                path.unlink()
            except FileNotFoundError:
                continue
            n += 1
            freed += size
        return n, freed


def _identity(st: os.stat_result) -> list[int]:
    """What a file's bytes cannot change without changing (the verification memo's record)."""
    return [int(st.st_dev), int(st.st_ino), int(st.st_size), int(st.st_mtime_ns), int(st.st_ctime_ns)]


def file_identity(path: str | os.PathLike) -> list[int] | None:
    """``_identity`` of the file at ``path`` (following links), or None when it cannot be stat'ed."""
    try:
        return _identity(os.stat(path))
    except OSError:
        return None


def created_utc(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))
