"""The settings of a spectrum audit: one frozen, validated object from the command line to the record.

``SpectrumSettings`` is made once (by the CLI from its options, or by a library caller), checked
once (``__post_init__``: an ``InputError`` naming the setting and the value), and then passed
unchanged to ``spectral.api.run_spectrum``, the engine (``spectral.engine.audit``), every screen
worker (it is picklable: Ray and multiprocessing send it as it is), ``lora-audit audit``
(``AuditConfig.spectrum``) and the screen (``ScreenConfig.spectrum``), and written into each
result's provenance settings (``to_json``).

    k                    top singular vectors of each tuned matrix examined (the paper: 10)
    epsilon              intruder threshold: a direction is an intruder when max |cos| < epsilon
    epsilon_sweep        further thresholds counted alongside, sorted, without repeats
    exact                always the paper's two-SVD algorithm (no fast paths)
    float64              SVDs in float64 instead of float32
    include_embeddings   also audit embeddings and lm_head (left out by default, as in the paper)
    dense_metrics        effective and stable rank of dense and DoRA updates (a full SVD of dW each)
    device               "auto", "cpu", "cuda" or "cuda:N"
    use_cache            read and write the base-spectrum cache
    cache_dir            the cache folder (None: the default one)
    allow_pickle         permit pytorch_model.bin checkpoints (read with weights_only=True)

No torch here: the CLI builds settings before it imports torch.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any

from .errors import InputError

DEFAULT_EPSILON_SWEEP = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
MAX_SWEEP = 1000  # thresholds in one sweep: a count per threshold per matrix is stored in the JSON

# the settings that change what a result says (two results are comparable when they agree on these)
MEASURING = ("k", "epsilon", "epsilon_sweep", "exact", "float64", "include_embeddings", "dense_metrics")


def _flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise InputError(f"{name} must be true or false, got {value!r}")


def _unit(name: str, value: Any) -> float:
    """A threshold strictly between 0 and 1 (a cosine); InputError naming it otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{name} must be a number strictly between 0 and 1, got {value!r}")
    try:
        x = float(value)
    except OverflowError:
        raise InputError(f"{name} must be a number strictly between 0 and 1, got an integer of "
                         f"{len(str(abs(value)))} digits") from None
    if not (math.isfinite(x) and 0.0 < x < 1.0):
        raise InputError(f"{name} must lie strictly between 0 and 1 (a cosine threshold), got {value!r}")
    return x


@dataclass(frozen=True)
class SpectrumSettings:
    """How a spectrum audit measures and where it runs (module docstring)."""

    k: int = 10
    epsilon: float = 0.5
    epsilon_sweep: tuple[float, ...] = DEFAULT_EPSILON_SWEEP
    exact: bool = False
    float64: bool = False
    include_embeddings: bool = False
    dense_metrics: bool = True
    device: str = "auto"
    use_cache: bool = True
    cache_dir: str | None = None
    allow_pickle: bool = False

    def __post_init__(self):
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise InputError(f"k must be an integer >= 1, got {self.k!r}")
        object.__setattr__(self, "epsilon", _unit("epsilon", self.epsilon))
        sweep = self.epsilon_sweep
        if isinstance(sweep, (str, bytes)) or not hasattr(sweep, "__iter__"):
            raise InputError(f"epsilon_sweep must be a list of numbers, got {sweep!r}")
        values = [_unit("every epsilon of the sweep", e) for e in sweep]
        if len(set(values)) > MAX_SWEEP:
            raise InputError(f"at most {MAX_SWEEP} thresholds in a sweep, got {len(set(values))}")
        object.__setattr__(self, "epsilon_sweep", tuple(sorted(set(values))))
        for name in ("exact", "float64", "include_embeddings", "dense_metrics", "use_cache", "allow_pickle"):
            _flag(name, getattr(self, name))
        if not isinstance(self.device, str) or not self.device.strip():  # which devices exist: device.resolve_device
            raise InputError(f"device must be a name such as auto, cpu, cuda or cuda:1, got {self.device!r}")
        if isinstance(self.cache_dir, os.PathLike):
            object.__setattr__(self, "cache_dir", os.fspath(self.cache_dir))
        if self.cache_dir is not None and not isinstance(self.cache_dir, str):
            raise InputError(f"cache_dir must be a folder path, got {self.cache_dir!r}")

    @classmethod
    def of(cls, settings: SpectrumSettings | None = None, **changes: Any) -> SpectrumSettings:
        """``settings`` (default: the defaults) with ``changes`` (field names; checked again). The same
        object when there is nothing to change."""
        base = settings if settings is not None else cls()
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise TypeError(f"unknown spectrum settings: {', '.join(unknown)}")
        return dataclasses.replace(base, **changes) if changes else base

    @property
    def dtype_name(self) -> str:
        return "float64" if self.float64 else "float32"

    @property
    def torch_dtype(self):
        """torch.float64 or torch.float32 (imports torch)."""
        import torch

        return torch.float64 if self.float64 else torch.float32

    def to_json(self) -> dict[str, Any]:
        """Every setting, as the provenance block records it."""
        d = dataclasses.asdict(self)
        d["epsilon_sweep"] = list(self.epsilon_sweep)
        return d

    def measuring(self) -> dict[str, Any]:
        """The settings that change what a result says (``MEASURING``): equal for comparable results."""
        d = self.to_json()
        return {k: d[k] for k in MEASURING}
