"""A lora-audit process's start-up: Python's cyclic garbage collector held back while the
libraries load, then their objects frozen out of its way.

Importing torch and its companions allocates about a million objects that live as long as the
process. Python's collector, as it comes, runs full collections while they load and afterwards,
and each traverses all of them. Measured on this project's 2-core machine, whole ``lora-audit
spectrum`` processes on a cached base (bench_cached_audit's model, 32 changed 2048-wide matrices,
5 processes each, medians): 1.88 s with the collector as it comes, 1.55 s with it held while the
libraries load and then ``gc.freeze()``-ed and enabled again, and 1.75 s with it off for the
whole run (without any collection, tensors caught in reference cycles are never freed, and the
memory they would have been reused from is fresh memory, page faults included).

``hold()`` is the CLI's first act; ``release()`` is called where a command's real work begins
(the spectral engine, the first progress bar or stage line): it moves every object that exists
then to the collector's permanent generation (``gc.freeze``: still alive, never traversed
again) and turns the collector back on. A timer releases it after ``HOLD_SECONDS`` in any
case, so no command runs long without it. A library caller never holds it, and ``release()``
is then a no-op.
"""

from __future__ import annotations

import gc
import threading

HOLD_SECONDS = 15.0

_lock = threading.Lock()
_held = False


def hold() -> None:
    """Disable the collector until ``release()`` (or ``HOLD_SECONDS``), if it is on."""
    global _held
    with _lock:
        if _held or not gc.isenabled():
            return
        gc.disable()
        _held = True
    timer = threading.Timer(HOLD_SECONDS, release)
    timer.daemon = True
    timer.start()


def release() -> None:
    """Freeze what the start-up allocated and enable the collector again, if ``hold()`` stopped it."""
    global _held
    with _lock:
        if not _held:
            return
        _held = False
        gc.freeze()
        gc.enable()


def held() -> bool:
    return _held
