"""``run_spectrum``: the whole spectrum audit (open checkpoints, cache, engine) as one library call,
shared by ``lora-audit spectrum``, ``lora-audit audit`` and the demo.

    from lora_audit.spectral.api import run_spectrum
    result = run_spectrum("base/", ["adapter/", "full-ft/"], k=10, epsilon=0.5)
    result.write_json("spectrum.json")
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from .engine import DEFAULT_EPSILON_SWEEP


def open_cache(cache_dir: str | Path | None = None):
    """The base-spectrum cache (``lora_audit.spectral.cache.SpectrumCache``) in ``cache_dir``,
    default ``<lora-audit cache>/spectra``; None when this build has no cache module."""
    import importlib.util

    if importlib.util.find_spec("lora_audit.spectral.cache") is None:
        return None
    from ..checkpoints.default_model import cache_root
    from .cache import SpectrumCache

    return SpectrumCache(Path(cache_dir).expanduser() if cache_dir else cache_root() / "spectra")


class closing:
    """``with`` for streams that may or may not hold open files."""

    def __init__(self, stream):
        self.stream = stream

    def __enter__(self):
        enter = getattr(self.stream, "__enter__", None)
        return enter() if enter else self.stream

    def __exit__(self, *exc):
        exit_ = getattr(self.stream, "__exit__", None)
        if exit_:
            return exit_(*exc)
        close = getattr(self.stream, "close", None)
        if close:
            close()
        return False


def run_spectrum(base: str | Path, tuned: Sequence[str | Path], *, k: int = 10, epsilon: float = 0.5,
                 epsilon_sweep: Sequence[float] = DEFAULT_EPSILON_SWEEP, device: str | torch.device = "auto",
                 exact: bool = False, float64: bool = False, include_embeddings: bool = False,
                 cache_dir: str | Path | None = None, use_cache: bool = True, allow_pickle: bool = False,
                 dense_metrics: bool = True, progress: bool = True, base_label: str | None = None,
                 tuned_labels: Sequence[str] | None = None, extra_settings: dict | None = None):
    """Audit every TUNED against BASE; returns a ``lora_audit.results.spectrum.SpectrumResult``.

    Labels default to the paths as given. Errors in the inputs raise ``lora_audit.errors``
    exceptions before any matrix is decomposed.
    """
    from ..checkpoints import open_stream
    from ..device import resolve_device
    from .engine import audit

    dev = resolve_device(device)  # DeviceError before any loading
    dtype = torch.float64 if float64 else torch.float32
    cache = open_cache(cache_dir) if use_cache else None
    tuned = [str(t) for t in tuned]
    stream = open_stream(base, tuned, include_embeddings=include_embeddings, dtype=dtype, allow_pickle=allow_pickle)
    with closing(stream):
        return audit(stream, k=k, epsilon=epsilon, epsilon_sweep=epsilon_sweep, device=dev, exact=exact,
                     cache=cache, dtype=dtype, progress=progress, base_label=base_label or str(base),
                     tuned_labels=list(tuned_labels) if tuned_labels else list(getattr(stream, "tuned", tuned)),
                     dense_metrics=dense_metrics,
                     extra_settings={"include_embeddings": include_embeddings, **(extra_settings or {})})
