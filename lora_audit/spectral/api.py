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


def run_spectrum(base: str | Path, tuned: Sequence[str | Path], *, k: int = 10, epsilon: float = 0.5,
                 epsilon_sweep: Sequence[float] = DEFAULT_EPSILON_SWEEP, device: str | torch.device = "auto",
                 exact: bool = False, float64: bool = False, include_embeddings: bool = False,
                 cache_dir: str | Path | None = None, use_cache: bool = True, allow_pickle: bool = False,
                 dense_metrics: bool = True, progress: bool = True, base_label: str | None = None,
                 tuned_labels: Sequence[str] | None = None, extra_settings: dict | None = None,
                 base_spectra=None):
    """Audit every TUNED against BASE; returns a ``lora_audit.results.spectrum.SpectrumResult``.

    Labels default to the paths as given. Errors in the inputs raise ``lora_audit.errors``
    exceptions before any matrix is decomposed; matrices with NaN/Inf weights are findings in the
    result (``TunedResult.skipped``, ``SpectrumResult.incomplete``), not errors. Each tuned model's
    structural findings (``checkpoints.structure.check_structure``, from headers and configs) are in
    its ``findings``. ``base_spectra``: base spectra already in memory,
    by parameter name (``engine.audit``).
    """
    from ..checkpoints import open_stream
    from ..checkpoints.hub import hub_settings
    from ..checkpoints.structure import check_structure
    from ..device import resolve_device
    from .engine import audit

    dev = resolve_device(device)  # DeviceError before any loading
    dtype = torch.float64 if float64 else torch.float32
    cache = open_cache(cache_dir) if use_cache else None
    tuned = [str(t) for t in tuned]
    findings = [check_structure(t, base=base) for t in tuned]
    stream = open_stream(base, tuned, include_embeddings=include_embeddings, dtype=dtype, allow_pickle=allow_pickle)
    labels = list(tuned_labels) if tuned_labels else list(stream.tuned)  # adapter sets give one per member
    result = audit(stream, k=k, epsilon=epsilon, epsilon_sweep=epsilon_sweep, device=dev, exact=exact,
                   cache=cache, dtype=dtype, progress=progress, base_label=base_label or str(base),
                   tuned_labels=labels, dense_metrics=dense_metrics, base_spectra=base_spectra,
                   extra_settings={"include_embeddings": include_embeddings, **hub_settings([base, *tuned]),
                                   **(extra_settings or {})})
    found = dict(zip(tuned, findings))
    for r, spec_path in zip(result.results, stream.sources):
        r.findings = list(found.get(spec_path, []))
    return result
