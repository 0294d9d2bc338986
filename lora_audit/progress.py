"""What the tool shows while it works: its own progress bars (tqdm on stderr) on a terminal, stage
and heartbeat lines elsewhere (CI logs), and nothing of the libraries' own bars, log lines and
deprecation warnings unless ``--verbose``.

Verbosity (``set_verbosity``; the CLI's ``-q`` / ``-v`` set it for the whole run, every stage):

- ``QUIET``: no bars, no stage or heartbeat lines; the libraries quiet.
- ``NORMAL`` (the CLI's default): our bars; the libraries quiet (``quiet_libraries``).
- ``VERBOSE``: our bars and the libraries' own bars, logs and warnings (``show_libraries``).

Our bars are drawn when stderr is a terminal, or when forced (``LORA_AUDIT_PROGRESS=1``). When
stderr is not a terminal (CI, a log file), each ``progress()`` prints a stage line as it starts
("-- generate base: 400 prompts") and a heartbeat line every ``heartbeat_seconds()`` (30 s;
``LORA_AUDIT_HEARTBEAT_SECONDS``) while it runs ("... generate base: 120/400 prompts, 1m30s"), so
a long run is never silent for minutes; ``stage()`` prints the line of a stage without a bar and
``step()`` adds time-only heartbeats to a stage whose progress cannot be counted (lm-eval).
``LORA_AUDIT_NO_PROGRESS=1`` turns bars and lines off (tests, logs that must stay clean).
``quiet_libraries()`` turns off transformers' and huggingface_hub's bars and logs (loading weights,
GGUF de-quantising), datasets' bars, lm-eval's per-request bars and the FutureWarning /
DeprecationWarning chatter of the libraries, so each stage shows one bar: ours.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
import warnings
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from .startup import release

T = TypeVar("T")

QUIET, NORMAL, VERBOSE = "quiet", "normal", "verbose"
_STATE: dict[str, Any] = {"verbosity": NORMAL}
_LIBRARY_OUTPUT = {"on": True}  # switched off by quiet_libraries(), on again by show_libraries()
_SAVED: dict[str, Any] = {}  # what quiet_libraries() changed, for show_libraries() to restore
# Modules whose tqdm bars lm-eval creates per request batch (they pass disable= themselves, so
# the TQDM_DISABLE environment default does not reach them).
_LM_EVAL_BAR_MODULES = ("lm_eval.models.huggingface", "lm_eval.api.task", "lm_eval.api.model")
_GGUF_BAR_MODULES = ("transformers.modeling_gguf_pytorch_utils",)
_QUIET_ENV = (("TRANSFORMERS_VERBOSITY", "error"), ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
              ("HF_DATASETS_DISABLE_PROGRESS_BARS", "1"), ("DATASETS_VERBOSITY", "error"),
              ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1"))
HEARTBEAT_SECONDS = 30.0
_clock = time.monotonic  # what heartbeats measure time with (tests put a fake clock here)


def set_verbosity(level: str) -> None:
    """QUIET, NORMAL or VERBOSE for the rest of the process (the CLI's -q / -v): the libraries'
    output follows at once (off unless VERBOSE)."""
    if level not in (QUIET, NORMAL, VERBOSE):
        raise ValueError(f"verbosity {level!r} is not one of {QUIET}, {NORMAL}, {VERBOSE}")
    _STATE["verbosity"] = level
    if level == VERBOSE:
        show_libraries()
    else:
        quiet_libraries()


def verbosity() -> str:
    return _STATE["verbosity"]


def is_quiet() -> bool:
    return _STATE["verbosity"] == QUIET


def _env_flag(name: str) -> bool:
    return os.environ.get(name) == "1"


def progress_enabled() -> bool:
    """Whether our bars are drawn: not quiet, and stderr a terminal (or forced)."""
    if is_quiet() or _env_flag("LORA_AUDIT_NO_PROGRESS"):
        return False
    if _env_flag("LORA_AUDIT_PROGRESS"):
        return True
    return sys.stderr.isatty()


def lines_enabled() -> bool:
    """Whether stage and heartbeat lines are printed: progress is wanted but no bar can be drawn."""
    return not (is_quiet() or _env_flag("LORA_AUDIT_NO_PROGRESS") or progress_enabled())


def heartbeat_seconds() -> float:
    """The interval between heartbeat lines: ``LORA_AUDIT_HEARTBEAT_SECONDS`` if a positive number, else 30."""
    try:
        v = float(os.environ.get("LORA_AUDIT_HEARTBEAT_SECONDS", HEARTBEAT_SECONDS))
    except ValueError:
        return HEARTBEAT_SECONDS
    return v if v > 0 and v == v and v != float("inf") else HEARTBEAT_SECONDS


def _say(line: str) -> None:
    from .text import printable

    print(printable(line), file=sys.stderr, flush=True)


def duration(seconds: float) -> str:
    """90.4 -> '1m30s', 3725 -> '1h02m05s', 4.2 -> '4s'."""
    s = int(max(seconds, 0))
    h, m, s = s // 3600, s // 60 % 60, s % 60
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def stage(text: str) -> None:
    """The line of a stage that has no bar (loading a model), when lines are on."""
    release()  # a stage is work: the start-up is over (lora_audit.startup)
    if lines_enabled():
        _say(f"-- {text}")


def _wait(event: threading.Event, seconds: float) -> bool:
    return event.wait(seconds)  # tests put a fake here (with a fake ``_clock``): no sleeping


@contextlib.contextmanager
def step(text: str) -> Iterator[None]:
    """A long stage whose progress cannot be counted (lm-eval's tasks): its stage line, then a
    heartbeat line with the time so far every ``heartbeat_seconds()`` until it ends, when lines are on."""
    if not lines_enabled():
        yield
        return
    _say(f"-- {text}")
    start, done = _clock(), threading.Event()

    def beat() -> None:
        while not _wait(done, heartbeat_seconds()):
            _say(f"... {text}: {duration(_clock() - start)}")

    ticker = threading.Thread(target=beat, name="lora-audit-heartbeat", daemon=True)
    ticker.start()
    try:
        yield
    finally:
        done.set()
        ticker.join()


class Heartbeat:
    """What ``progress()`` returns when lines are on: the part of tqdm's interface the tool uses
    (iterate, ``update``, ``set_postfix(_str)``, ``close``, a context manager), printing a stage line
    at the start and a heartbeat line at most every ``interval`` seconds of ``_clock``."""

    def __init__(self, iterable=None, *, total: int | None = None, desc: str = "", unit: str = "it",
                 initial: int = 0, interval: float | None = None):
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc or "working", unit
        self.n = initial
        self.postfix = ""
        self.interval = heartbeat_seconds() if interval is None else interval
        self.start = self.last = _clock()
        self.beats = 0
        self.closed = False
        of = f"{total} {self._units(total)}" if total is not None else ""
        _say(f"-- {self.desc}" + (f": {of}" if of else "") + (f" ({initial} done before)" if initial else ""))

    def _units(self, n: int | None) -> str:
        if n == 1 or self.unit.endswith("s"):
            return self.unit
        return "matrices" if self.unit == "matrix" else self.unit + "s"

    def _line(self, now: float) -> str:
        count = f"{self.n}/{self.total}" if self.total is not None else str(self.n)
        extra = f" ({self.postfix})" if self.postfix else ""
        return f"... {self.desc}: {count} {self._units(self.total or self.n)}, {duration(now - self.start)}{extra}"

    def update(self, n: int = 1) -> None:
        self.n += n
        now = _clock()
        if now - self.last >= self.interval:
            self.last = now
            self.beats += 1
            _say(self._line(now))

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def close(self) -> None:
        """A last line with the total time, when the stage was long enough for a heartbeat."""
        if self.closed:
            return
        self.closed = True
        if self.beats:
            now = _clock()
            _say(f"-- {self.desc}: done, {self.n} {self._units(self.n)} in {duration(now - self.start)}")

    def __iter__(self):
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(iterable: Iterable[T] | None = None, *, total: int | None = None, desc: str = "",
             unit: str = "it", leave: bool = False, initial: int = 0):
    """A tqdm bar on stderr, or stage and heartbeat lines where no bar can be drawn (``Heartbeat``),
    or nothing (quiet); usable as an iterator wrapper or with ``.update(n)``. ``initial``: work done
    before the bar starts (counted, but not in the rate and the time left)."""
    release()  # a bar means work: the start-up is over (lora_audit.startup)
    if lines_enabled():
        return Heartbeat(iterable, total=total, desc=desc, unit=unit, initial=initial)
    from tqdm.auto import tqdm  # here, not at the top: a quiet run never draws a bar (30 ms of imports)

    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, initial=initial,
                disable=not progress_enabled(), file=sys.stderr, dynamic_ncols=True)


def quiet_libraries() -> None:
    """Silence the libraries' own progress bars, info logs and deprecation warnings for the rest of
    the process (environment defaults for libraries not imported yet, their APIs for those that are);
    ``show_libraries()`` undoes it."""
    first = _LIBRARY_OUTPUT["on"]  # what was there before is saved once (applying twice changes nothing)
    _LIBRARY_OUTPUT["on"] = False
    bnb = logging.getLogger("bitsandbytes")
    if first:
        _SAVED.update(env=[var for var, _ in _QUIET_ENV if var not in os.environ], filters=list(warnings.filters),
                      bnb_level=bnb.level)
    for var, value in _QUIET_ENV:
        os.environ.setdefault(var, value)
    if "transformers" in sys.modules:
        from transformers.utils import logging as tlog

        if first:
            _SAVED["transformers"] = tlog.get_verbosity()
        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
        _SAVED["hub_bars"] = True
    bnb.setLevel(logging.ERROR)  # imported by peft when installed: CPU kernel notices
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning,
                            module=r"(transformers|peft|torch|lm_eval|datasets|accelerate|gguf)(\.|$)")


def show_libraries() -> None:
    """Undo ``quiet_libraries()`` (``--verbose``): the libraries' bars, logs and warnings as they
    would be without lora-audit."""
    if _LIBRARY_OUTPUT["on"]:
        return
    _LIBRARY_OUTPUT["on"] = True
    for var in _SAVED.pop("env", []):
        os.environ.pop(var, None)
    if "filters" in _SAVED:
        saved = _SAVED.pop("filters")
        warnings.resetwarnings()  # invalidates the modules' caches of which warnings were shown
        warnings.filters.extend(saved)  # type: ignore[attr-defined]
    logging.getLogger("bitsandbytes").setLevel(_SAVED.pop("bnb_level", logging.NOTSET))
    if "transformers" in sys.modules:
        from transformers.utils import logging as tlog

        tlog.set_verbosity(_SAVED.pop("transformers", tlog.WARNING))
        tlog.enable_progress_bar()
    if "huggingface_hub" in sys.modules and _SAVED.pop("hub_bars", False):
        from huggingface_hub.utils import enable_progress_bars

        enable_progress_bars()


def _silent_tqdm(*args, **kwargs):
    from tqdm.auto import tqdm

    kwargs["disable"] = True
    return tqdm(*args, **kwargs)


@contextlib.contextmanager
def quiet_module_bars(modules: Iterable[str]) -> Iterator[None]:
    """Inside the block, the progress bars these library modules draw with their own ``tqdm``
    (which the libraries' switches do not reach) are off, when the libraries are quiet."""
    if _LIBRARY_OUTPUT["on"]:
        yield
        return
    import importlib

    patched = []
    for name in modules:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(mod, "tqdm"):
            patched.append((mod, mod.tqdm))
            mod.tqdm = _silent_tqdm  # type: ignore[attr-defined]
    try:
        yield
    finally:
        for mod, orig in patched:
            mod.tqdm = orig  # type: ignore[attr-defined]


def quiet_lm_eval_bars():
    """lm-eval's per-request bars (``quiet_module_bars``)."""
    return quiet_module_bars(_LM_EVAL_BAR_MODULES)


def quiet_gguf_bars():
    """transformers' bar while it dequantises a GGUF file (``quiet_module_bars``)."""
    return quiet_module_bars(_GGUF_BAR_MODULES)
