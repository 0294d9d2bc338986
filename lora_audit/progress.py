"""What the tool shows while it works: its own progress bars (tqdm on stderr), and nothing of the
libraries' own bars, log lines and deprecation warnings unless ``--verbose``.

Our bars are disabled when stderr is not a terminal unless forced (``LORA_AUDIT_PROGRESS=1``), and
always with ``LORA_AUDIT_NO_PROGRESS=1`` so logs and tests stay clean. ``quiet_libraries()`` (the
CLI calls it unless ``--verbose``) turns off transformers' and huggingface_hub's bars and logs
(loading weights, GGUF de-quantising), datasets' bars, lm-eval's per-request bars and the
FutureWarning / DeprecationWarning chatter of the libraries, so each stage shows one bar: ours.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from typing import Iterable, Iterator, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

_LIBRARY_OUTPUT = {"on": True}  # switched off by quiet_libraries()
# Modules whose tqdm bars lm-eval creates per request batch (they pass disable= themselves, so
# the TQDM_DISABLE environment default does not reach them).
_LM_EVAL_BAR_MODULES = ("lm_eval.models.huggingface", "lm_eval.api.task", "lm_eval.api.model")
_GGUF_BAR_MODULES = ("transformers.modeling_gguf_pytorch_utils",)


def progress_enabled() -> bool:
    if os.environ.get("LORA_AUDIT_NO_PROGRESS") == "1":
        return False
    if os.environ.get("LORA_AUDIT_PROGRESS") == "1":
        return True
    return sys.stderr.isatty()


def progress(iterable: Iterable[T] | None = None, *, total: int | None = None, desc: str = "",
             unit: str = "it", leave: bool = False, initial: int = 0) -> "tqdm[T]":
    """A tqdm bar on stderr; usable as an iterator wrapper or with ``.update(n)``. ``initial``: work
    done before the bar starts (counted, but not in the rate and the time left)."""
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, initial=initial,
                disable=not progress_enabled(), file=sys.stderr, dynamic_ncols=True)


def quiet_libraries() -> None:
    """Silence the libraries' own progress bars, info logs and deprecation warnings for the rest of
    the process (environment defaults for libraries not imported yet, their APIs for those that are)."""
    _LIBRARY_OUTPUT["on"] = False
    for var, value in (("TRANSFORMERS_VERBOSITY", "error"), ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
                       ("HF_DATASETS_DISABLE_PROGRESS_BARS", "1"), ("DATASETS_VERBOSITY", "error"),
                       ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")):
        os.environ.setdefault(var, value)
    if "transformers" in sys.modules:
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # imported by peft when installed: CPU kernel notices
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning,
                            module=r"(transformers|peft|torch|lm_eval|datasets|accelerate|gguf)(\.|$)")


def _silent_tqdm(*args, **kwargs):
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
            mod.tqdm = _silent_tqdm
    try:
        yield
    finally:
        for mod, orig in patched:
            mod.tqdm = orig


def quiet_lm_eval_bars():
    """lm-eval's per-request bars (``quiet_module_bars``)."""
    return quiet_module_bars(_LM_EVAL_BAR_MODULES)


def quiet_gguf_bars():
    """transformers' bar while it dequantises a GGUF file (``quiet_module_bars``)."""
    return quiet_module_bars(_GGUF_BAR_MODULES)
