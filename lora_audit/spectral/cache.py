"""The on-disk base-spectrum cache: the thin SVD of each base matrix, computed once.

The base spectrum W0 = U diag(S) Vh does not change between audits, so a hub screening many
adapters of one base pays each base SVD once. One entry per base matrix, in one folder:

    <root>/<key>.safetensors      tensors U (m, p), S (p,), Vh (p, n); never pickle
    key = sha256("lora-audit-spectrum/<version>", dtype, shape, raw bytes of W0)

The key is a content hash of the tensor itself (not its name or file), so a renamed or
re-saved checkpoint with the same weights hits, and a different tensor never does. The dtype
is part of the key and the spectrum is stored in the dtype it was computed in: a ``--float64``
audit never reads a float32 spectrum, and vice versa.

Integrity: entries are written atomically (``lora_audit.io.atomic_write_bytes``: temporary
file, fsync, rename), and every read is verified: the safetensors header must parse, its
metadata must name the same key, format, dtype and shape, the tensors must have the shapes
(m, p), (p,), (p, n) and fill the file exactly, and the CRC-32 of the payload must equal the
checksum stored in the metadata. A truncated, bit-flipped or mislabelled entry is reported
with a warning, deleted and recomputed: never silently used.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
import threading
import time
import warnings
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import Tensor

from ..io import atomic_write_bytes
from .exact import base_spectrum as _compute_spectrum
from .types import BaseSpectrum

FORMAT = "lora-audit-spectrum"
VERSION = "1"
SUFFIX = ".safetensors"
_DTYPES = {torch.float32: "float32", torch.float64: "float64"}
_ST_DTYPES = {torch.float32: "F32", torch.float64: "F64"}
_ALIGN = 64  # bytes: payload alignment of new entries (a cache line)


class CacheWarning(UserWarning):
    """A cache entry was unreadable or failed verification and is being rebuilt."""


@dataclass(frozen=True)
class CacheEntry:
    """One entry as ``ls`` shows it (read from the header only, no tensor data)."""

    key: str
    path: Path
    size: int  # bytes on disk
    shape: tuple[int, int] | None  # W0's (m, n); None when the header is unreadable
    dtype: str | None
    created: float  # modification time, seconds since the epoch
    ok: bool  # header readable and of this format (the payload is only checked on use)

    def as_dict(self) -> dict:
        return {"key": self.key, "path": str(self.path), "bytes": self.size,
                "shape": list(self.shape) if self.shape else None, "dtype": self.dtype,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.created)), "ok": self.ok}


def _contiguous_bytes(t: Tensor) -> memoryview:
    """The raw bytes of ``t`` (on the CPU, contiguous) without a copy when possible."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    return memoryview(t.numpy()).cast("B")


def tensor_key(W0: Tensor) -> str:
    """Content hash of a base matrix: sha256 over format, dtype, shape and raw bytes (hex).

    sha256 runs at ~1.7 GB/s here (hardware SHA) and releases the GIL, so the prefetch thread
    can hash the next matrix while this one is decomposed.
    """
    if W0.dtype not in _DTYPES:
        raise ValueError(f"the spectrum cache holds float32 or float64 matrices, got {W0.dtype}")
    h = hashlib.sha256()
    h.update(f"{FORMAT}/{VERSION}|{_DTYPES[W0.dtype]}|{tuple(W0.shape)}|".encode())
    h.update(_contiguous_bytes(W0))
    return h.hexdigest()


def _payload_checksum(U: Tensor, S: Tensor, Vh: Tensor) -> str:
    """CRC-32 of U, S, Vh in that order (catches truncation and flipped bits; ~4 GB/s here, twice
    sha256's speed; the key, which must not collide, is sha256)."""
    crc = 0
    for t in (U, S, Vh):
        crc = zlib.crc32(_contiguous_bytes(t), crc)
    return f"crc32:{crc:08x}"


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
    header = json.loads(text)
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    return header


def _read_header(path: Path) -> dict:
    with open(path, "rb") as fh:
        return _header_from(fh)


class SpectrumCache:
    """Base spectra on disk under ``root`` (created on first write).

    >>> cache = SpectrumCache("~/.cache/lora-audit/spectra")
    >>> base = cache.base_spectrum(W0, torch.device("cpu"))   # SVD on a miss, a file read on a hit

    ``hits``/``misses``/``rebuilt``/``write_errors`` count this object's lookups and writes (for
    tests and the bench). New entries are written in the background: ``flush()`` (which
    ``engine.audit`` calls at the end) waits for them.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser()
        self.hits = 0
        self.misses = 0
        self.rebuilt = 0
        self.write_errors = 0
        self._lock = threading.Lock()
        self._writer: ThreadPoolExecutor | None = None
        self._pending: list[Future] = []

    def __repr__(self) -> str:
        return f"SpectrumCache({str(self.root)!r})"

    # ---- lookups ----------------------------------------------------------------------------
    def path_for(self, key: str) -> Path:
        return self.root / f"{key}{SUFFIX}"

    def lookup(self, W0: Tensor, *, key: str | None = None) -> tuple[str, BaseSpectrum | None]:
        """(key, verified spectrum on the CPU) or (key, None) on a miss. A bad entry is warned
        about, deleted and reported as a miss. Safe to call from a background thread."""
        key = key or tensor_key(W0)
        path = self.path_for(key)
        if not path.is_file():
            return key, None
        try:
            spec = self._read(path, key, W0)
        except Exception as e:  # any failure to read or verify: never use it
            warnings.warn(f"spectrum cache entry {path.name} is corrupt ({e}); deleting and recomputing it",
                          CacheWarning, stacklevel=2)
            self.rebuilt += 1
            try:
                path.unlink()
            except OSError:  # gone already, or a read-only cache: the entry is still not used
                pass
            return key, None
        return key, spec

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
        meta = {"format": FORMAT, "version": VERSION, "key": key, "dtype": _DTYPES[W0.dtype],
                "shape": json.dumps(list(W0.shape)), "checksum": _payload_checksum(U, S, Vh)}
        return atomic_write_bytes(self.path_for(key), _aligned_save({"U": U, "S": S, "Vh": Vh}, meta))

    def _read(self, path: Path, key: str, W0: Tensor) -> BaseSpectrum:
        """Read and verify one entry. The payload is memory-mapped copy-on-write (no read into a
        zero-filled buffer: for a 4096-wide matrix that copy cost more than the checksum), and
        the tensors are views of the mapping. Entries are only ever replaced by rename, never
        rewritten in place, so the mapped pages stay the ones the checksum verified."""
        m, n = W0.shape
        p = min(m, n)
        with open(path, "rb") as fh:
            header = _header_from(fh)
            start = fh.tell()
            meta = header.pop("__metadata__", None) or {}
            want = {"format": FORMAT, "version": VERSION, "key": key, "dtype": _DTYPES[W0.dtype],
                    "shape": json.dumps([m, n])}
            bad = {k: meta.get(k) for k, v in want.items() if meta.get(k) != v}
            if bad:
                raise ValueError(f"metadata does not match: {bad}")
            shapes = {"U": [m, p], "S": [p], "Vh": [p, n]}
            st_dtype = _ST_DTYPES[W0.dtype]
            if set(header) != set(shapes):
                raise ValueError(f"tensors {sorted(header)}, expected U, S, Vh")
            size = max(int(v["data_offsets"][1]) for v in header.values())
            if os.fstat(fh.fileno()).st_size != start + size:
                raise ValueError("payload size does not match the header")
            buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)  # stays valid after close
        item = torch.empty((), dtype=W0.dtype).element_size()
        t = {}
        for name, shape in shapes.items():
            info = header[name]
            a, b = (int(x) for x in info["data_offsets"])
            if info["dtype"] != st_dtype or list(info["shape"]) != shape or b - a != item * _numel(shape):
                raise ValueError(f"tensor {name}: expected {shape} {st_dtype}, got {info['shape']} {info['dtype']}")
            t[name] = torch.frombuffer(buf, dtype=W0.dtype, offset=start + a, count=_numel(shape)).view(shape)
            if (start + a) % _ALIGN:  # BLAS kernels round differently on unaligned data: copy
                t[name] = t[name].clone()
        if _payload_checksum(t["U"], t["S"], t["Vh"]) != meta.get("checksum"):
            raise ValueError("checksum mismatch")
        return BaseSpectrum(U=t["U"], S=t["S"], Vh=t["Vh"], key=key)

    # ---- housekeeping -----------------------------------------------------------------------
    def entries(self) -> list[CacheEntry]:
        """Every entry (header only, no payload read), oldest first; unreadable ones with ok=False."""
        if not self.root.is_dir():
            return []
        out = []
        for path in self.root.glob(f"*{SUFFIX}"):
            try:
                st = path.stat()
            except FileNotFoundError:  # removed meanwhile
                continue
            shape, dtype, ok = None, None, False
            try:
                meta = _read_header(path).get("__metadata__") or {}
                if meta.get("format") == FORMAT:
                    shape = tuple(json.loads(meta["shape"]))
                    dtype, ok = meta.get("dtype"), True
            except (OSError, ValueError, KeyError, TypeError):
                pass
            out.append(CacheEntry(key=path.name[: -len(SUFFIX)], path=path, size=st.st_size, shape=shape,
                                  dtype=dtype, created=st.st_mtime, ok=ok))
        return sorted(out, key=lambda e: (e.created, e.key))

    def total_bytes(self) -> int:
        return sum(e.size for e in self.entries())

    def clear(self) -> tuple[int, int]:
        """Delete every entry and leftover temporary file; (files removed, bytes freed).
        Files that are not the cache's own are left alone."""
        if not self.root.is_dir():
            return 0, 0
        n = freed = 0
        for path in list(self.root.glob(f"*{SUFFIX}")) + list(self.root.glob(f".*{SUFFIX}.*.tmp")):
            try:
                size = path.stat().st_size
                path.unlink()
            except FileNotFoundError:
                continue
            n += 1
            freed += size
        return n, freed
