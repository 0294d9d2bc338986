"""One adapter of a screen, audited where a worker runs: the same call as ``lora-audit spectrum BASE
ADAPTER`` (``spectral.api.run_spectrum``), with the base's spectra held by the worker process.

``audit_adapter`` returns a ``ScreenRecord`` as JSON (small, and picklable for every engine): "ok"
with the adapter's ``TunedResult``, or "failed" with the message of a ``LoraAuditError`` (the input's
fault: a corrupt file, an adapter for another base; retrying would fail the same way). Any other
exception (a bug, memory, a device) propagates: the engine retries the adapter once, then records
it as failed (``failed_record``).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import LoraAuditError
from ..io import user_path
from ..results import fingerprint
from ..results.screen import FAILED, OK, ScreenRecord
from ..settings import SpectrumSettings
from .spectra import SpectrumRef, held_for

ATTEMPTS = 2  # tries per adapter for failures that are not the input's fault
UNREADABLE = "unreadable"
MAX_ERROR_CHARS = 2000


@dataclass(frozen=True)
class Job:
    """One adapter to audit: as given (``adapter``), what to open (``path``), its display name."""

    adapter: str
    path: str
    name: str = ""


@dataclass
class WorkerSpec:
    """Everything a worker needs for every adapter of one screen (picklable; sent once per worker).

    ``token`` names the screen run (a worker keeps one screen's spectra); ``base`` is the local path
    of the base and ``base_label`` the BASE as given; ``settings`` (``lora_audit.settings``) go to
    ``run_spectrum`` as they are, with the worker's own device and the screen's cache folder
    (``cache_dir``, where the spectra the driver decomposed are); ``spectra`` are the shared base
    spectra (``spectra.share_spectra``)."""

    token: str
    base: str
    base_label: str
    settings: SpectrumSettings
    cache_dir: str | None = None
    spectra: dict[str, SpectrumRef] = field(default_factory=dict)


def input_fingerprint(path: str) -> str:
    """The content hash of an adapter's files (``results.fingerprint``); for a hub id, of its local
    snapshot (downloaded when needed), or of the id itself when it cannot be fetched; "unreadable"
    when its files cannot be read (the audit then fails and says why)."""
    if not os.path.exists(user_path(path)):
        from ..checkpoints.sources import local_path

        try:
            path = str(local_path(path)[0])
        except LoraAuditError:
            pass
    try:
        return fingerprint(path)
    except OSError:
        return UNREADABLE


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def worker_name(device: Any) -> str:
    return f"{socket.gethostname()} pid {os.getpid()} {device}"


def error_text(e: BaseException) -> str:
    """A one-message account of an exception for a failed record (type and message, capped)."""
    text = str(e) if isinstance(e, LoraAuditError) else f"{type(e).__name__}: {e}"
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


def failed_record(job: Job, error: str, *, attempts: int, worker: str = "", seconds: float = 0.0,
                  fingerprint_: str | None = None) -> dict[str, Any]:
    """The record of an adapter that could not be audited."""
    fp = fingerprint_ if fingerprint_ is not None else input_fingerprint(job.path)
    return ScreenRecord(adapter=job.adapter, name=job.name, status=FAILED, error=error or "failed", fingerprint=fp,
                        seconds=seconds, attempts=attempts, worker=worker, finished=now()).to_json()


def audit_adapter(spec: WorkerSpec, job: Job, *, device: Any = "auto", attempt: int = 1,
                  fetch: Callable[[Any], Any] | None = None) -> dict[str, Any]:
    """Audit one adapter against the base (see the module docstring); its record as JSON.
    ``fetch``: how to read a spectrum from the object store (``ray.get``), when it is there."""
    from ..spectral.api import run_spectrum

    t0 = time.perf_counter()
    fp = input_fingerprint(job.path)
    held = held_for(spec.token, spec.spectra, spec.cache_dir, fetch)
    where = worker_name(device)
    try:
        here = SpectrumSettings.of(spec.settings, device=str(device), use_cache=True, cache_dir=spec.cache_dir)
        result = run_spectrum(spec.base, [job.path], here, progress=False, base_label=spec.base_label,
                              tuned_labels=[job.adapter], base_spectra=held)
    except LoraAuditError as e:
        return failed_record(job, error_text(e), attempts=attempt, worker=where,
                             seconds=time.perf_counter() - t0, fingerprint_=fp)
    record = ScreenRecord(adapter=job.adapter, name=job.name, status=OK, fingerprint=fp,
                          seconds=time.perf_counter() - t0, attempts=attempt, worker=where, finished=now(),
                          result=result.results[0]).to_json()
    try:
        json.dumps(record, allow_nan=False)  # what the store will write: JSON has no NaN or inf
    except ValueError:
        return failed_record(job, "the result holds non-finite numbers (NaN or inf in the adapter's weights?)",
                             attempts=attempt, worker=where, seconds=time.perf_counter() - t0, fingerprint_=fp)
    return record
