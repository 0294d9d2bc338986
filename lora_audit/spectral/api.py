"""``run_spectrum``: the whole spectrum audit (open checkpoints, cache, engine) as one library call,
shared by ``lora-audit spectrum``, ``lora-audit audit``, the screen's workers and the demo.

    from lora_audit.settings import SpectrumSettings
    from lora_audit.spectral.api import run_spectrum
    result = run_spectrum("base/", ["adapter/", "full-ft/"], SpectrumSettings(k=10, epsilon=0.5))
    result.write_json("spectrum.json")
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..settings import SpectrumSettings


def open_cache(cache_dir: str | Path | None = None):
    """The base-spectrum cache (``lora_audit.spectral.cache.SpectrumCache``) in ``cache_dir``,
    default ``<lora-audit cache>/spectra``."""
    from ..checkpoints.default_model import cache_root
    from .cache import SpectrumCache

    return SpectrumCache(Path(cache_dir).expanduser() if cache_dir else cache_root() / "spectra")


def run_spectrum(base: str | Path, tuned: Sequence[str | Path], settings: SpectrumSettings | None = None, *,
                 progress: bool = True, base_label: str | None = None, tuned_labels: Sequence[str] | None = None,
                 extra_settings: dict | None = None, base_spectra=None, **changes):
    """Audit every TUNED against BASE with ``settings`` (``lora_audit.settings.SpectrumSettings``;
    ``changes``: field names replacing some of them, ``run_spectrum(base, tuned, k=4, device="cpu")``);
    returns a ``lora_audit.results.spectrum.SpectrumResult``. The settings object goes to the
    engine as it is and is recorded in the result's provenance settings.

    Labels default to the paths as given. Errors in the inputs raise ``lora_audit.errors``
    exceptions before any matrix is decomposed; matrices with NaN/Inf weights are findings in the
    result (``TunedResult.skipped``, ``SpectrumResult.incomplete``), not errors. Each tuned model's
    structural findings (``checkpoints.structure.check_structure``, from headers and configs) are in
    its ``findings``. ``base_spectra``: base spectra already in memory, by parameter name
    (``engine.audit``).
    """
    from ..checkpoints import open_stream
    from ..checkpoints.hub import hub_settings
    from ..checkpoints.structure import check_structure
    from ..device import resolve_device
    from .engine import audit

    settings = SpectrumSettings.of(settings, **changes)
    resolve_device(settings.device)  # DeviceError before any loading
    cache = open_cache(settings.cache_dir) if settings.use_cache else None
    tuned = [str(t) for t in tuned]
    stream = open_stream(base, tuned, include_embeddings=settings.include_embeddings, dtype=settings.torch_dtype,  # type: ignore[arg-type]
                         allow_pickle=settings.allow_pickle)
    # after the stream: PEFT's default targets depend on the base's model type, as the stream read it
    findings = [check_structure(t, base=base, base_config=stream.base_source.config) for t in tuned]
    labels = list(tuned_labels) if tuned_labels else list(stream.tuned)  # adapter sets give one per member
    result = audit(stream, settings, cache=cache, progress=progress, base_label=base_label or str(base),
                   tuned_labels=labels, base_spectra=base_spectra, extra_settings={**hub_settings([base, *tuned]), **(extra_settings or {})})
    found = dict(zip(tuned, findings, strict=True))
    for r, spec_path in zip(result.results, stream.sources, strict=True):
        r.findings = list(found.get(spec_path, []))
    return result
