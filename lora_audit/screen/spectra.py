"""The base's spectra in a screen: decomposed once, then shared by every worker.

A screen audits thousands of adapters against one base, and with the base's thin SVDs at hand
an adapter's LoRA matrix costs two skinny projections and a small search (``spectral.lowrank``).
So the screen's driver first finds the base matrices its adapters change (``touched_matrices``:
headers only), reads each one's spectrum from the on-disk cache or computes and stores it
(``share_spectra``), and hands the workers a ``SpectrumRef`` per matrix. A worker loads each
spectrum once per process (``HeldSpectra``) and keeps it for every adapter it audits; it never
hashes a base matrix or verifies a cache entry again. Two ways to share, chosen by the caller:

- ``cache``: the workers read the on-disk cache (verified with its key, ``spectral.cache``),
  memory-mapped, so the workers of one machine share the pages. For the local engine, and for
  Ray clusters whose nodes all mount the cache folder (with the same cache key file).
- ``object-store`` (Ray): the driver puts each spectrum (U, S, Vh as numpy arrays) into Ray's
  object store once; the workers of a node map the same read-only memory (zero copy), and each
  other node fetches it once. Needs object-store memory for about twice the base's audited
  matrices (U and Vh of a square matrix are its size each).

A matrix no scanned adapter touches (an adapter from the hub, read only by its worker) is not
shared: its worker decomposes it through the on-disk cache like ``lora-audit spectrum`` does.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoints import Kind, detect, open_stream
from ..checkpoints.stream import AuditStream
from ..errors import LoraAuditError
from ..progress import progress as progress_bar
from ..spectral.types import BaseSpectrum
from .discovery import Entry

_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_ALIGN = 64  # bytes: BLAS picks kernels by alignment; a shared spectrum must give the same bits
SCANNED_KINDS = (Kind.PEFT_ADAPTER, Kind.KOHYA_LORA, Kind.HF_FOLDER, Kind.SAFETENSORS_FILE)


@dataclass
class SpectrumRef:
    """How a worker finds one base matrix's spectrum: its cache key, dtype and W0's (m, n), and in
    object-store mode the Ray ObjectRef of its (U, S, Vh) arrays."""

    key: str
    dtype: str
    shape: tuple[int, int]
    obj: Any = None


def touched_matrices(base: str, entries: Sequence[Entry], *, include_embeddings: bool, dtype: torch.dtype,
                     progress: bool = True) -> tuple[AuditStream | None, list[str]]:
    """The base matrices the local adapters change, in the base's order, and one of their streams
    (to read base matrices from). Reads headers and configs only; an entry that cannot be opened is
    left out (its worker records why), and so are hub ids and GGUF/pickle models (opening them
    means downloading or loading them whole)."""
    stream, names = None, set()
    for e in progress_bar(entries, total=len(entries), desc="scanning", unit="adapter") if progress else entries:
        try:
            if not Path(e.path).exists() or detect(e.path) not in SCANNED_KINDS:
                continue
            s = open_stream(base, [e.path], include_embeddings=include_embeddings, dtype=dtype)
        except LoraAuditError:
            continue
        names |= set(s.names)
        stream = stream or s
    if stream is None:
        return None, []
    order = {n: i for i, n in enumerate(stream.all_names)}
    return stream, sorted(names, key=order.__getitem__)


def share_spectra(stream: AuditStream, names: list[str], cache, *, device: torch.device,
                  put: Callable[[Any], Any] | None = None, progress: bool = True) -> tuple[dict[str, SpectrumRef],
                                                                                         list[str]]:
    """Read or compute (on ``device``) and store the spectrum of every base matrix ``names``; the
    workers' references to them, and warnings. ``put`` (Ray's ``ray.put``) also places each in the
    object store."""
    refs: dict[str, SpectrumRef] = {}
    bar = progress_bar(total=len(names), desc="base spectra", unit="matrix") if progress else None
    try:
        for name in names:
            W0 = stream.base_matrix(name)  # (m, n) in the audit's dtype, as the workers' streams carry it
            spec = cache.base_spectrum(W0, device)  # a verified cache read, or an SVD stored in the background
            ref = SpectrumRef(spec.key, str(W0.dtype).replace("torch.", ""), (int(W0.shape[0]), int(W0.shape[1])))
            if put is not None:
                ref.obj = put(tuple(t.detach().cpu().numpy() for t in (spec.U, spec.S, spec.Vh)))
            refs[name] = ref
            del W0, spec
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        cache.flush()
    notes = []
    if cache.write_errors and put is None:
        notes.append(f"{cache.write_errors} base spectra could not be written to the cache at {cache.root}; "
                     "every worker decomposes those matrices itself")
    return refs, notes


def _tensor(array) -> torch.Tensor:
    """A read-only numpy array (Ray's shared memory) as a tensor without a copy, unless it is not
    aligned like a fresh allocation. Nothing writes into a base spectrum."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "The given NumPy array is not writable"
        t = torch.from_numpy(array)
    return t.clone() if t.data_ptr() % _ALIGN else t


class HeldSpectra:
    """``base_spectra`` for ``spectral.engine.audit`` in a worker: each spectrum loaded once (from the
    object store through ``fetch``, else from the on-disk cache at ``cache_dir``) and kept for every
    later adapter. ``get(name)`` is None for a matrix the driver did not share, or whose cache entry
    is gone: the engine then decomposes it through the cache."""

    def __init__(self, refs: dict[str, SpectrumRef], cache_dir: str | None, fetch: Callable[[Any], Any] | None = None):
        self.refs, self.cache_dir, self.fetch = refs, cache_dir, fetch
        self._held: dict[str, BaseSpectrum] = {}
        self._cache = None

    def get(self, name: str) -> BaseSpectrum | None:
        spec = self._held.get(name)
        ref = self.refs.get(name)
        if spec is not None or ref is None:
            return spec
        if ref.obj is not None and self.fetch is not None:
            U, S, Vh = (_tensor(a) for a in self.fetch(ref.obj))
            spec = BaseSpectrum(U=U, S=S, Vh=Vh, key=ref.key)
        else:
            spec = self._disk().load(ref.key, _DTYPES[ref.dtype], tuple(ref.shape))
        if spec is not None:
            self._held[name] = spec
        return spec

    def _disk(self):
        if self._cache is None:
            from ..spectral.api import open_cache

            self._cache = open_cache(self.cache_dir)
        return self._cache


_HELD: dict[str, HeldSpectra] = {}  # screen token -> this process's spectra (one screen at a time)


def held_for(token: str, refs: dict[str, SpectrumRef], cache_dir: str | None,
             fetch: Callable[[Any], Any] | None = None) -> HeldSpectra:
    """This process's ``HeldSpectra`` for the screen ``token``, made on its first adapter. A worker
    process serves one screen at a time: another token drops the previous one's spectra."""
    held = _HELD.get(token)
    if held is None:
        _HELD.clear()
        held = _HELD[token] = HeldSpectra(refs, cache_dir, fetch)
    return held
