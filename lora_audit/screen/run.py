"""``run_screen``: audit many adapters of one base as one resumable job (``lora-audit screen``).

    from lora_audit.screen import ScreenConfig, discover, run_screen
    from lora_audit.settings import SpectrumSettings
    entries, _ = discover(["hub-mirror/adapters/"])
    outcome = run_screen("base/", entries, "screens/base", ScreenConfig(SpectrumSettings(k=10), workers=2))
    outcome.summary.adapters[0].adapter, outcome.summary.adapters[0].total_intruders

The steps, in order: check every setting and the base (errors before anything is written);
open the screen folder (``store``: new, resumed or replaced); skip the adapters whose record is
stored and whose files have not changed since (same content hash); decompose the base matrices
the remaining adapters change, once (``spectra``); audit the adapters on the chosen engine
(``engines``, ``ray_engine``), storing each record the moment it arrives; then rank every adapter
and write summary.json, summary.csv and report.html (``summary``).
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..io import user_path
from ..results import fingerprint
from ..results.screen import FAILED, OK, ScreenResult, ScreenSetup
from ..settings import SpectrumSettings
from .discovery import Entry, unique
from .store import ScreenStore
from .worker import Job, WorkerSpec, input_fingerprint

ENGINES = ("local", "ray")
SPECTRA = ("object-store", "cache")


@dataclass
class ScreenConfig:
    """Settings of a screen. ``spectrum``: the audit's settings (``lora_audit.settings``), those of
    ``lora-audit spectrum``, sent unchanged to every worker (its device the worker's own); the
    measuring ones are fixed for a screen folder. The rest say how to run it.

    engine: "local" (worker processes on this machine) or "ray". workers: "local": processes (0:
    audit in this process; default one per GPU, else one per CPU core); "ray": adapters at once
    (default: the cluster's CPUs, or GPUs). spectra (ray): "object-store" (default) or "cache"
    (``spectra`` explains both). resume: continue the folder's screen; retry_failed: audit again
    the adapters stored as failed. detail: detail pages for the top this many adapters."""

    spectrum: SpectrumSettings = field(default_factory=SpectrumSettings)
    engine: str = "local"
    address: str | None = None
    workers: int | None = None
    spectra: str | None = None
    resume: bool = False
    retry_failed: bool = False
    overwrite: bool = False
    detail: int = 10
    title: str | None = None
    progress: bool = True
    gate: Any = None  # results.gate.Gate | None: evaluated on the summary before it is written


@dataclass
class ScreenOutcome:
    out: Path
    summary: ScreenResult
    audited: int  # adapters audited in this run (the rest came from the store)
    files: dict[str, Path] = field(default_factory=dict)
    findings: dict[str, list] = field(default_factory=dict)  # adapter -> its findings, for --sarif (summary_rows)

    @property
    def failed(self) -> int:
        return self.summary.counts.get("failed", 0)

    @property
    def incomplete(self) -> int:
        """Adapters audited with matrices left unmeasured (NaN/Inf): the screen is incomplete."""
        return self.summary.counts.get("incomplete", 0)


def _check(cfg: ScreenConfig) -> None:
    """How the screen runs (the audit's settings checked themselves when they were made)."""
    if not isinstance(cfg.spectrum, SpectrumSettings):
        raise InputError(f"ScreenConfig.spectrum must be a SpectrumSettings, got {type(cfg.spectrum).__name__}")
    if cfg.engine not in ENGINES:
        raise InputError(f"unknown engine {cfg.engine!r}; choose one of {', '.join(ENGINES)}")
    if cfg.spectra is not None and cfg.spectra not in SPECTRA:
        raise InputError(f"unknown spectra sharing {cfg.spectra!r}; choose one of {', '.join(SPECTRA)}")
    if cfg.engine == "local" and cfg.spectra == "object-store":
        raise InputError("--spectra object-store needs --engine ray; local workers share the spectra through the "
                         "on-disk cache")
    if cfg.engine == "local" and cfg.address:
        raise InputError("--address is the Ray cluster to use; it needs --engine ray")
    if cfg.workers is not None and cfg.workers < 0:
        raise InputError(f"workers must be 0 or more, got {cfg.workers}")


def _base_path(base: str) -> str:
    """The local path of BASE (a hub id is downloaded); InputError for a base a screen cannot use."""
    from ..checkpoints import Kind
    from ..checkpoints.sources import local_path, open_weights

    path, kind = local_path(base)
    if kind in (Kind.GGUF, Kind.PICKLE):
        raise InputError(f"{base}: a {kind.value} base is loaded whole for every adapter, which a screen of many "
                         "adapters cannot afford; save it once as safetensors (save_pretrained) and screen that")
    open_weights(path)  # InputError for an adapter or an unreadable model, before any work
    return str(path)


def make_engine(cfg: ScreenConfig):
    """The engine ``cfg`` asks for (Ray's is checked for at once: an error before any work)."""
    from ..device import all_devices
    from .engines import InProcessEngine, LocalEngine

    if cfg.engine == "ray":
        from .ray_engine import RayEngine

        return RayEngine(address=cfg.address, workers=cfg.workers, device=cfg.spectrum.device)
    if cfg.workers == 0:
        return InProcessEngine(cfg.spectrum.device)
    devices = [str(d) for d in all_devices(cfg.spectrum.device)]
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    n = cfg.workers or (len(devices) if devices[0].startswith("cuda") else cpus)
    threads = 1 if devices[0].startswith("cuda") else max(1, cpus // n)
    return LocalEngine([devices[i % len(devices)] for i in range(n)], threads=threads)


def pending(store: ScreenStore, entries: list[Entry], *, retry_failed: bool) -> list[Job]:
    """The entries to audit: those without an intact stored record, those whose files changed since
    (content hash), and with ``retry_failed`` those stored as failed."""
    todo = []
    for e in entries:
        s = store.latest.get(e.adapter)
        keep = (s is not None and not (retry_failed and s.status == FAILED) and store.verified(s)
                and input_fingerprint(e.path) == s.fingerprint)
        if not keep:
            todo.append(Job(e.adapter, e.path, e.name))
    return todo


def _drive(engine, spec: WorkerSpec, todo: list[Job], store: ScreenStore, *, total: int, progress: bool) -> None:
    """Run the jobs, storing each record as it arrives, under one progress bar."""
    from ..progress import progress as progress_bar

    done = total - len(todo)
    bar = progress_bar(total=total, desc="screen", unit="adapter", initial=done) if progress else None
    ok = failed = 0
    t0 = time.perf_counter()
    try:
        for record in engine.run(spec, todo):
            store.append(record)
            ok, failed = ok + (record["status"] == OK), failed + (record["status"] != OK)
            if bar is not None:
                rate = (ok + failed) / max(time.perf_counter() - t0, 1e-9) * 60
                bar.set_postfix_str(f"ok {ok}, failed {failed}, left {len(todo) - ok - failed}, {rate:.0f}/min",
                                    refresh=False)
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()


def run_screen(base: str, entries: Sequence[Entry], out: str | os.PathLike, config: ScreenConfig | None = None, *,
               warnings: Sequence[str] = ()) -> ScreenOutcome:
    """Screen every entry against BASE into the folder ``out`` (see the module docstring).

    Raises ``lora_audit.errors`` exceptions for bad settings, a bad base or output folder, or a
    missing Ray, before anything is written. An adapter that cannot be audited is not an error: it
    is recorded as failed (``ScreenOutcome.failed``). ``warnings``: from finding the entries.
    """
    from ..device import resolve_device
    from ..io import check_outputs
    from ..spectral.api import open_cache
    from .spectra import share_spectra, touched_matrices
    from .summary import summarize, write_outputs

    cfg = config or ScreenConfig()
    _check(cfg)
    s = cfg.spectrum
    entries, notes = unique(list(entries))
    if not entries:
        raise InputError("no adapters to screen: give adapter folders or files, or a --manifest with entries")
    out = user_path(out)
    check_outputs([], [str(base)] + [e.path for e in entries], folders=[out])
    base_local = _base_path(str(base))
    engine = make_engine(cfg)
    cache = open_cache(s.cache_dir)  # always: local workers share the base spectra through it
    setup = ScreenSetup(base=str(base), base_fingerprint=fingerprint(base_local), k=s.k, epsilon=s.epsilon,
                        epsilon_sweep=list(s.epsilon_sweep), dtype=s.dtype_name, exact=s.exact,
                        include_embeddings=s.include_embeddings, dense_metrics=s.dense_metrics,
                        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    t0 = time.perf_counter()
    with ScreenStore.open(out, setup, resume=cfg.resume, overwrite=cfg.overwrite) as store:
        notes = list(warnings) + notes + store.warnings
        todo = pending(store, entries, retry_failed=cfg.retry_failed)
        if todo:
            with engine:
                stream, names = touched_matrices(base_local, todo, include_embeddings=s.include_embeddings,  # type: ignore[arg-type]
                                                 dtype=s.torch_dtype, progress=cfg.progress)
                notes += list(getattr(stream, "base_warnings", None) or [])
                put = engine.put if _sharing(cfg) == "object-store" else None
                refs, more = (share_spectra(stream, names, cache, device=resolve_device(s.device), put=put,
                                            progress=cfg.progress) if stream is not None else ({}, []))
                del stream
                spec = WorkerSpec(token=uuid.uuid4().hex, base=base_local, base_label=str(base), settings=s,
                                  cache_dir=str(cache.root), spectra=refs)
                _drive(engine, spec, todo, store, total=len(entries), progress=cfg.progress)
                notes += more
        settings = {**s.to_json(), "engine": cfg.engine, "workers": cfg.workers, "cache": str(cache.root),
                    "spectra": _sharing(cfg), "address": cfg.address}
        findings: dict[str, list] = {}
        summary = summarize(store, entries, settings=settings, seconds=time.perf_counter() - t0, audited=len(todo),
                            warnings=notes, findings=findings)
        if cfg.gate is not None:
            from ..results.gate import apply_screen_gate

            apply_screen_gate(cfg.gate, summary)
        files = write_outputs(out, store, summary, detail=cfg.detail, title=cfg.title)
    return ScreenOutcome(out=out, summary=summary, audited=len(todo), files=files, findings=findings)


def _sharing(cfg: ScreenConfig) -> str:
    """How the workers get the base spectra: Ray's object store (the Ray engine's default), or the
    on-disk cache (the local engine's only way)."""
    return (cfg.spectra or "object-store") if cfg.engine == "ray" else "cache"
