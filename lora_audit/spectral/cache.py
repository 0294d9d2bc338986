"""The on-disk base-spectrum cache: the thin SVD of each base matrix, computed once.

The base spectrum W0 = U diag(S) Vh does not change between audits, so a hub screening many
adapters of one base pays each base SVD once. One entry per base matrix, in one folder, an
authenticated entry of ``lora_audit.cache`` (safetensors, never pickle; keyed BLAKE3 MAC)::

    <root>/<key>.safetensors      tensors U (m, p), S (p,), Vh (p, n); fields dtype, shape
    key = BLAKE3("lora-audit-spectrum/2", dtype, shape, raw bytes of W0)   (``tensor_key``)
    mac = keyed BLAKE3(secret, [format, version, key, {dtype, shape}] || U || S || Vh)

The key is a content hash of the tensor itself (not its name or file), so a renamed or
re-saved checkpoint with the same weights hits, and a different tensor never does. The dtype
is part of the key and the spectrum is stored in the dtype it was computed in: a ``--float64``
audit never reads a float32 spectrum, and vice versa.

Integrity: entries are written atomically, and every read is verified (``lora_audit.cache``):
safetensors checks the header and the payload's extent, the metadata must name this format,
``VERSION`` and the key, the fields the dtype and shape the reader expects, the tensors must be
U (m, p), S (p,), Vh (p, n) of that dtype, and the MAC, recomputed over all of it as read (one
pass over the memory-mapped file), must equal the one stored (an entry verified so before,
whose file has not changed since, is not hashed again: the verification memo of
``lora_audit.cache``, which says why that is sound). The memo also keeps the key of each base matrix
taken from a tensor of a model's safetensors file, by that file (``SpectrumCache.key_of``): a later
audit of the same, unchanged file does not hash the matrix to find its entry (nor read it, when it
is stored as the audit uses it). A truncated, bit-flipped,
mislabelled, renamed, forged or older-format entry is reported with a ``CacheWarning``, deleted
and recomputed: never used. Format versions: 1 carried a CRC-32, 2 an HMAC-SHA256 and a SHA-256
key; 3 (this one) keyed BLAKE3 and a BLAKE3 key, four times faster to verify. Entries of
version 2 are not found under the new keys: `lora-audit cache ls` lists them as not used, and
`lora-audit cache clear` removes them.

The secret: 32 random bytes in a key file OUTSIDE the cache folder (``lora_audit.cache.key_file``:
``$LORA_AUDIT_CACHE_KEY_FILE``, else ``cache-key`` in the config folder), created on first use
with mode 0600; a key file that other users can access, or that is not a regular file of 32
bytes, is refused (``InputError``). Teams that share one cache folder across machines give every
machine the same key file; entries written under another key fail verification and are
recomputed.

Trust model. The cache protects against:

- corruption and truncation (disk errors, a killed writer, a full disk);
- stale or swapped entries: an entry copied or renamed to another key's file name (its
  metadata edited to match or not), an entry of an older format, an entry written with
  another key file;
- forgery by anyone who can write the cache folder but cannot read your key file: without
  the secret they cannot compute a MAC that verifies (keyed BLAKE3 is a PRF; reading entries
  reveals nothing about the secret), so they cannot make an audit use spectra of their
  choosing, which could hide intruder dimensions or invent them.

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
provably the cache's own (``EntryStore.scan``): regular files named ``<64 hex digits>.safetensors``
whose header says format ``lora-audit-spectrum`` (any version), and the writer's leftover temporary
files. Anything else in the folder is counted as ignored, never listed as an entry or deleted.
"""

from __future__ import annotations

import json
import os
import threading
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import Tensor

from ..cache import CacheScan, CacheWarning, EntryInfo, EntryStore, content_key, created_utc, file_identity
from .exact import base_spectrum as _compute_spectrum
from .types import BaseSpectrum

FORMAT = "lora-audit-spectrum"
VERSION = "3"  # entry layout and its check: 1 = CRC-32, 2 = HMAC-SHA256, 3 = keyed BLAKE3 (see the docstring)
_KEY_SCHEME = f"{FORMAT}/2"  # what tensor_key hashes; changing it orphans every entry (1 was SHA-256)
_DTYPES = {torch.float32: "float32", torch.float64: "float64"}
_BY_NAME = {name: dtype for dtype, name in _DTYPES.items()}
_SAFETENSORS_DTYPES = {"F32": torch.float32, "F64": torch.float64}


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
                "created": created_utc(self.created), "ok": self.ok, "version": self.version, "problem": self.problem}


def tensor_key(W0: Tensor) -> str:
    """Content hash of a base matrix: BLAKE3 over the key scheme, dtype, shape and raw bytes (hex;
    ``lora_audit.cache.content_key``). BLAKE3 runs at memory speed and releases the GIL, so the
    prefetch thread hashes the next matrix while this one is decomposed."""
    if W0.dtype not in _DTYPES:
        raise ValueError(f"the spectrum cache holds float32 or float64 matrices, got {W0.dtype}")
    return content_key(_KEY_SCHEME, W0)


def _fields(dtype: torch.dtype, shape: tuple[int, int]) -> dict[str, str]:
    return {"dtype": _DTYPES[dtype], "shape": json.dumps([int(d) for d in shape])}


def _checker(dtype: torch.dtype, shape: tuple[int, int]):
    """``EntryStore.read``'s check: the fields name ``dtype`` and ``shape``, and the tensors are
    exactly U (m, p), S (p,), Vh (p, n) of that dtype."""
    m, n = shape
    p = min(m, n)
    want = {"U": (m, p), "S": (p,), "Vh": (p, n)}
    fields = _fields(dtype, shape)

    def check(got: dict[str, str], tensors: dict[str, Tensor]) -> None:
        bad = {k: got.get(k) for k, v in fields.items() if got.get(k) != v}
        if bad:
            raise ValueError(f"metadata does not match: {bad}")
        if set(tensors) != set(want):
            raise ValueError(f"tensors {sorted(tensors)}, expected U, S, Vh")
        for name, shp in want.items():
            t = tensors[name]
            if t.dtype != dtype or tuple(t.shape) != shp:
                raise ValueError(f"tensor {name}: expected {list(shp)} {_DTYPES[dtype]}, got {list(t.shape)} "
                                 f"{str(t.dtype).replace('torch.', '')}")
    return check


def _listed(e: EntryInfo) -> CacheEntry:
    """A listing's entry: shape and dtype from its fields, and a layout that does not fit them
    named as its problem."""
    problem, shape, dtype = e.problem, None, e.fields.get("dtype")
    try:
        shape = tuple(int(d) for d in json.loads(e.fields["shape"]))
        if len(shape) != 2 or dtype not in _BY_NAME:
            raise ValueError(f"shape {e.fields['shape']}, dtype {dtype}")
        if problem is None:
            tensors = {k: SimpleNamespace(dtype=_SAFETENSORS_DTYPES.get(v.get("dtype")), shape=tuple(v.get("shape", ())))
                       for k, v in e.header.items()}
            _checker(_BY_NAME[dtype], shape)(e.fields, tensors)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        problem = problem or f"invalid: {err}"
        shape = shape if shape and len(shape) == 2 else None
    return CacheEntry(key=e.key, path=e.path, size=e.size, shape=shape, dtype=dtype if isinstance(dtype, str) else None,
                      created=e.created, ok=problem is None, version=e.version, problem=problem)


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
        self.entry_store = EntryStore(root, FORMAT, VERSION, what="spectrum cache entry")
        self.root = self.entry_store.root
        self.hits = 0
        self.misses = 0
        self.write_errors = 0
        self._lock = threading.Lock()  # the writer queue
        self._secret_lock = threading.Lock()  # not _lock: a queued write needs the secret
        self._writer: ThreadPoolExecutor | None = None
        self._pending: list[Future] = []

    def __repr__(self) -> str:
        return f"SpectrumCache({str(self.root)!r})"

    @property
    def rebuilt(self) -> int:
        return self.entry_store.rebuilt

    def secret(self) -> bytes:
        """The key file's secret (``load_secret``), read once per cache object; InputError when the
        key file is unusable."""
        with self._secret_lock:
            return self.entry_store.secret()

    # ---- lookups ----------------------------------------------------------------------------
    def path_for(self, key: str) -> Path:
        return self.entry_store.path_for(key)

    def lookup(self, W0: Tensor, *, key: str | None = None, origin: tuple | None = None
               ) -> tuple[str, BaseSpectrum | None]:
        """(key, verified spectrum on the CPU) or (key, None) on a miss. A bad entry is warned
        about, deleted and reported as a miss. Safe to call from a background thread. ``origin``:
        W0's ``MatrixGroup.origin`` (the file tensor it was taken from, and how), which lets
        ``key_of`` take its key from the verification memo instead of hashing it."""
        key = key or self.key_of(W0, origin)
        return key, self.load(key, W0.dtype, (int(W0.shape[0]), int(W0.shape[1])))

    def key_of(self, W0: Tensor, origin: tuple | None = None) -> str:
        """``tensor_key(W0)``. When W0 was taken from one stored tensor of a file (``origin`` = (file,
        the file's identity when it was opened, the tensor's name in it, how W0 was taken from it:
        ``MatrixGroup.origin``)) and the file still has that identity, the key the verification
        memo remembers for it is the same hash, without reading W0 again (``lora_audit.cache``: a
        file's bytes cannot change without its identity changing, and W0 is a function of them);
        otherwise the key is computed, and remembered."""
        if origin is None:
            return tensor_key(W0)
        path, opened, stored, how = origin
        record = content_key("lora-audit-spectrum-source/1", str(Path(path).resolve()), stored, how, _KEY_SCHEME,
                             _DTYPES.get(W0.dtype, str(W0.dtype)), json.dumps(list(W0.shape)))
        same = file_identity(path) == opened  # the file has not changed since it was mapped
        if same:
            self.secret()  # an unusable key file is raised here, as a lookup raises it
            known = self.entry_store.source_key(record, opened)
            if known is not None:
                return known
        key = tensor_key(W0)
        if same and file_identity(path) == opened:  # and it did not change while it was hashed
            self.entry_store.remember_source(record, opened, key)
        return key

    def load(self, key: str, dtype: torch.dtype, shape: tuple[int, int]) -> BaseSpectrum | None:
        """The verified spectrum stored under ``key`` for a base matrix of ``dtype`` and ``shape``
        (memory-mapped, on the CPU), or None on a miss. A bad entry is warned about, deleted and
        reported as a miss. For callers that know a matrix's key without holding the matrix (a
        screen's workers get the keys from the process that hashed the base)."""
        self.secret()  # an unusable key file is the user's to fix: raised, not a miss
        entry = self.entry_store.get(key, _checker(dtype, shape))
        if entry is None:
            return None
        t = entry.tensors
        return BaseSpectrum(U=t["U"], S=t["S"], Vh=t["Vh"], key=key)

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
        self._store_later(key, W0, spec)  # type: ignore[arg-type]
        return spec

    def _store_later(self, key: str, W0: Tensor, spec: BaseSpectrum) -> None:
        with self._lock:
            if self._writer is None:
                self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lora-audit-cache-writer")
            # at most two entries waiting: their tensors are memory the audit would otherwise free
            while len(self._pending) >= 2:
                self._pending.pop(0).result()
            self._pending.append(self._writer.submit(self._store_quietly, key, W0.dtype, tuple(W0.shape), spec))  # type: ignore[arg-type]

    def _store_quietly(self, key: str, dtype: torch.dtype, shape: tuple[int, int], spec: BaseSpectrum) -> None:
        try:
            self.store_spectrum(key, dtype, shape, spec)
        except Exception as e:  # noqa: BLE001 - a cache write never fails the audit
            warnings.warn(f"could not write spectrum cache entry {key[:16]}... to {self.root} ({e}); "
                          "the audit is unaffected", CacheWarning, stacklevel=1)
            self.write_errors += 1

    def flush(self) -> None:
        """Wait until every entry handed to the background writer is on disk (or has failed), stop
        the writer thread (a new one starts with the next miss), and save the verification memo
        (``lora_audit.cache``: the entries verified in full this time are not hashed again)."""
        with self._lock:
            pending, self._pending = self._pending, []
            writer, self._writer = self._writer, None
        for f in pending:
            f.result()
        if writer is not None:
            writer.shutdown(wait=True)
        self.entry_store.save_memo()

    def store(self, key: str, W0: Tensor, spec: BaseSpectrum) -> Path:
        """Write one entry now, atomically (a reader never sees half a file). Only W0's dtype and
        shape are used."""
        return self.store_spectrum(key, W0.dtype, tuple(W0.shape), spec)  # type: ignore[arg-type]

    def store_spectrum(self, key: str, dtype: torch.dtype, shape: tuple[int, int], spec: BaseSpectrum) -> Path:
        """Write the spectrum of a base matrix of ``dtype`` and ``shape`` (m, n) under ``key`` now."""
        self.secret()
        return self.entry_store.write(key, {"U": spec.U, "S": spec.S, "Vh": spec.Vh}, _fields(dtype, shape))

    # ---- housekeeping -----------------------------------------------------------------------
    def scan(self) -> CacheScan:
        """What the folder holds (headers only, no payload read): entries oldest first, entries
        of any format version and inconsistent ones included (ok=False), the writer's leftover
        temporary files, and the number of other files. Only regular files (not links) whose
        name and header prove them the cache's own count as entries."""
        found = self.entry_store.scan()
        return CacheScan([_listed(e) for e in found.entries], found.temporary, found.ignored, found.memo)

    def entries(self) -> list[CacheEntry]:
        """The entries of ``scan()``."""
        return self.scan().entries

    def total_bytes(self) -> int:
        return sum(e.size for e in self.entries())

    def clear(self) -> tuple[int, int]:
        """Delete every entry and leftover temporary file of ``scan()``; (files removed, bytes
        freed). Nothing else in the folder is touched."""
        return self.entry_store.clear()
