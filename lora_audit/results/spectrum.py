"""Result records of ``lora-audit spectrum`` and their JSON / CSV.

Schema ``"spectrum"``, version ``SCHEMA_VERSION`` (bump on any incompatible change). Fields
marked [contract] are the stable core that readers rely on and are never renamed; the rest may grow. Indices
are 0-based. Top level, in this order::

    {
      "lora_audit": {...},              provenance: schema, schema_version, tool_version,
                                        git_hash, created, python, libraries, settings
                                        (k, epsilon, epsilon_sweep, device, dtype, exact, ...)
      "base": str,                      [contract] the BASE argument as given
      "k": int,                         [contract] top-k tuned singular vectors examined
      "epsilon": float,                 [contract] intruder threshold: max_cos < epsilon
      "epsilon_sweep": [float, ...],    thresholds of the sweep, ascending
      "warnings": [str, ...],           about the base or the run as a whole (per-model ones
                                        are under each result)
      "gate": {...} | null,             the --fail-on outcome (``results.gate.GateOutcome``):
                                        "expression", "tripped", "conditions": [{"condition",
                                        "field", "op", "threshold", "tripped", "models": [{"model",
                                        "value", "shown", "where", "tripped"}]}]; null without a gate
      "results": [                      [contract] one entry per TUNED, in argument order
        {
          "tuned": str,                 [contract] the TUNED argument as given
          "total_intruders": int,       [contract] sum of "intruders" over "matrices"
          "sweep_totals": [int, ...],   total intruders at each epsilon of "epsilon_sweep"
          "matrices_audited": int,      len(matrices)
          "matrices_unchanged": int,    matrices of the audit plan (those any tuned model
                                        touches) that this model leaves exactly as they were
          "skipped": [                  matrices left out of the statistics, with the reason
            {"name": str, "where": "base" | "tuned" | "lora_A" | "lora_B" | "magnitude" |
             "scale" | "update", "reason": str, "nonfinite_values": int}
          ],                            NaN/Inf weights, or an update that overflows the audit's
                                        dtype (where "update"): the audit is incomplete; or a
                                        tuned matrix that is all zeros (where "tuned",
                                        nonfinite_values 0): nothing to examine, no intruder
          "findings": [                 structural findings on the tuned files, read before any
                                        matrix (``checkpoints.structure``; rules in
                                        ``results.findings.RULES``)
            {"rule": "LA021", "level": "error"|"warning"|"note", "message": str,
             "file": str | null, "detail": {...}}
          ],
          "by_module": {module: int},   intruders per module name (q_proj, down_proj, ...)
          "by_layer": {"0": int, ...},  intruders per layer index (matrices with a layer)
          "info": {...},                what the loader found (format, adapter config, ...)
          "warnings": [str, ...],       e.g. adapters initialised by rewriting the base (pissa)
          "seconds": float,             compute time spent on this model
          "drift": float | null,        max of the matrices' "drift" (1 - the model's lowest
                                        max_cos)
          "mean_drift": float | null,   mean of the matrices' "drift"
          "intruder_energy": float | null,  mean over matrices of their "intruder_energy"
          "sweep_energy": [float | null],   mean over matrices at each epsilon of the sweep
          "null_max_cos": {"m x n": float}, the null reference of each audited shape
          "matrices": [                 [contract] one per matrix that differs from the base
            {
              "name": str,              [contract] BASE parameter name, e.g.
                                        "model.layers.0.self_attn.q_proj.weight"
              "shape": [m, n],          [contract] analysed as (out x in)
              "max_cos": [float]*k',    [contract] k' = k_used values, in the order of
                                        the tuned singular values (largest first)
              "intruders": int,         [contract] count of max_cos < epsilon
              "k_used": int,            directions examined: min(k, m, n, numerical rank of
                                        W1); singular values <= max(m, n) eps sigma_1 are null
                                        directions, never examined (= len(max_cos))
              "module": str,            e.g. "q_proj" (the name's last component before .weight)
              "layer": int | null,      transformer block index, null for non-block weights
              "kind": str,              "linear" | "embedding" | "conv"
              "transposed": bool,       stored (in x out) (GPT-2 Conv1D) and transposed
              "delta_type": str,        "dense" | "lowrank" | "dora"
              "adapter_rank": int|null, r of a LoRA/DoRA delta
              "method": str,            "exact" | "lowrank" | "block_krylov" (how top-k was
                                        found; files from earlier versions say "randomized"
                                        for the block Krylov path)
              "converged": bool,        False when an iterative method missed its tolerance
              "tuned_singular_values": [float]*k',   sigma_j of W1
              "base_index": [int]*k',   best-matching base left singular vector of each y_j
              "cos_top_base": [[float]*k'']*k' | null,  |<y_j, u0_i>| for the top k'' = min(k, p)
                                        base vectors: row j = tuned vector j (heat maps, the
                                        paper's Fig. 1); null when the method did not give it
              "sweep_counts": [int],    intruders at each epsilon of "epsilon_sweep"
              "intruder_details": [     one per intruder
                {"index": j, "singular_value": float, "max_cos": float,
                 "base_index": i, "base_singular_value": float | null}
              ],
              "delta_norm": float,      ||dW||_F
              "relative_delta_norm": float | null,   ||dW||_F / ||W0||_F
              "spectral_norm": float,   ||dW||_2
              "effective_rank": float,  Roy & Vetterli 2007, exp entropy of s_i / sum s
              "stable_rank": float,     ||dW||_F^2 / ||dW||_2^2
              "notes": [str, ...],      loader notes, fast-path fallbacks
              "reshaped_from": [int]|null,  a conv kernel's stored shape (out, in, k...), analysed
                                        as (out x in*prod(k))
              "expert": int | null,     the expert of a fused (experts x out x in) stack; the
                                        name is then "<parameter>[expert]"
              "dequantization": {...} | null,  a quantised base's error record for this matrix
                                        (method, error_max_abs_bound, error_fro_bound,
                                        error_fro_expected; checkpoints.quantized)
              "null_max_cos": float,    E max|cos| of a uniformly random direction against
                                        this base's left singular basis (m x min(m, n)):
                                        what "unrelated to the base" means at this width
                                        (``spectral.calibration.null_max_cos``, exact)
              "drift": float,           1 - min(max_cos): continuous, informative when
                                        "intruders" is 0
              "intruder_energy": float | null,  share of the top-k singular energy
                                        (sum sigma_j^2) carried by the intruders at epsilon
              "sweep_energy": [float | null]    the same at each epsilon of "epsilon_sweep"
            }, ...
          ]
        }, ...
      ]
    }

The CSV export (``to_csv``) has one row per tuned model x matrix; see ``CSV_COLUMNS``.
This module imports neither torch nor the checkpoint code: report code reads results here.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar

from ..errors import InputError
from ..settings import DEFAULT_EPSILON_SWEEP
from .base import Result
from .findings import Finding
from .gate import GateOutcome
from .schema import AT_LEAST_1, Cos, Count, Epsilon, NonNeg, Range, Rate

SCHEMA = "spectrum"
SCHEMA_VERSION = 1

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block|encoder\.layer|decoder\.layer)\.(\d+)(?:\.|$)")
_ANY_INDEX_RE = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def split_name(name: str) -> tuple[str, int | None]:
    """(module, layer) of a parameter name: "model.layers.3.mlp.down_proj.weight" -> ("down_proj", 3);
    "transformer.h.0.attn.c_attn.weight" -> ("c_attn", 0); "lm_head.weight" -> ("lm_head", None)."""
    parts = re.sub(r"\[\d+\]$", "", name).split(".")  # "...experts.down_proj[3]": one expert of a stack
    if parts and parts[-1] in ("weight", "bias", "base_layer"):
        parts = parts[:-1]
    if parts and parts[-1] == "base_layer":
        parts = parts[:-1]
    module = parts[-1] if parts else name
    m = _LAYER_RE.search(name) or _ANY_INDEX_RE.search(name)
    return module, (int(m.group(1)) if m else None)


Dim = Annotated[int, AT_LEAST_1]  # a matrix dimension, a rank
Drift = Annotated[float, Range(ge=-1e-4, le=1)]  # 1 - a max|cos| (which rounding may put a hair above 1)


@dataclass
class IntruderRecord:
    index: Count
    singular_value: NonNeg
    max_cos: Cos
    base_index: Count
    base_singular_value: NonNeg | None = None


@dataclass
class MatrixResult:
    """One matrix that differs from the base: the top-k directions examined and their max |cos|."""

    JSON_EXTRA: ClassVar[dict[str, Any]] = {"k_used": "Count"}

    name: str
    shape: list[Dim]
    max_cos: list[Cos]
    intruders: Count
    module: str = ""
    layer: Count | None = None
    kind: str = "linear"
    transposed: bool = False
    delta_type: str = "dense"
    adapter_rank: Dim | None = None
    method: str = "exact"
    converged: bool = True
    tuned_singular_values: list[NonNeg] = field(default_factory=list)
    base_index: list[Count] = field(default_factory=list)
    cos_top_base: list[list[Cos]] | None = None
    sweep_counts: list[Count] = field(default_factory=list)
    intruder_details: list[IntruderRecord] = field(default_factory=list)
    delta_norm: NonNeg | None = None
    relative_delta_norm: NonNeg | None = None
    spectral_norm: NonNeg | None = None
    effective_rank: NonNeg | None = None
    stable_rank: NonNeg | None = None
    notes: list[str] = field(default_factory=list)
    reshaped_from: list[Dim] | None = None
    expert: Count | None = None
    dequantization: dict[str, Any] | None = None
    null_max_cos: Cos | None = None  # calibration.null_for_shape(shape)
    drift: Drift | None = None  # calibration.drift(max_cos)
    intruder_energy: Rate | None = None  # calibration.intruder_energy at epsilon
    sweep_energy: list[Rate | None] = field(default_factory=list)  # ... at each epsilon of the sweep

    def __post_init__(self):
        if len(self.shape) != 2:
            raise InputError(f"shape: expected [rows, columns], got {len(self.shape)} values")
        if self.intruders > len(self.max_cos):
            raise InputError(f"intruders: {self.intruders} of {len(self.max_cos)} examined directions")
        if any(c > len(self.max_cos) for c in self.sweep_counts):
            raise InputError(f"sweep_counts: a count above the {len(self.max_cos)} examined directions")

    @property
    def min_cos(self) -> float | None:
        return min(self.max_cos) if self.max_cos else None

    @property
    def k_used(self) -> int:
        """Directions examined: min(k, m, n, numerical rank of W1)."""
        return len(self.max_cos)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        for key, value in asdict(self).items():
            d[key] = value
            if key == "intruders":
                d["k_used"] = self.k_used
        d["shape"] = [int(x) for x in self.shape]
        return d

    @classmethod
    def _from_json_hook(cls, raw: dict[str, Any]) -> dict[str, Any]:
        """Files written before "module" and "layer" existed: derive them from the name."""
        if ("module" not in raw or "layer" not in raw) and isinstance(raw.get("name"), str):
            module, layer = split_name(raw["name"])
            raw.setdefault("module", module)
            raw.setdefault("layer", layer)
        return raw


@dataclass
class SkippedMatrix:
    """A matrix left out of the spectral statistics (``lora_audit.spectral.findings``)."""

    name: str  # the BASE parameter name
    where: str  # "base" | "tuned" | "lora_A" | "lora_B" | "magnitude" | "scale" | "update"
    reason: str  # what is wrong, for people
    nonfinite_values: Count = 0  # NaN/Inf values found where ``where`` says

    @property
    def unmeasured(self) -> bool:
        """Whether the audit could not measure this matrix (NaN/Inf values, an overflowing update):
        every finding but an all-zero tuned matrix, which has no direction to examine."""
        return self.where == "update" or self.nonfinite_values > 0


def _mean(values: list[float | None]) -> float | None:
    """Mean of the values that are not None (None when there are none)."""
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


@dataclass
class TunedResult:
    """One tuned model: its matrices, totals, what was left out and why, structural findings."""

    # computed from the matrices when written (checked when a file carries them, not kept)
    JSON_EXTRA: ClassVar[dict[str, Any]] = {
        "total_intruders": "Count", "matrices_audited": "Count", "by_module": "dict[str, Count]",
        "by_layer": "dict[str, Count]", "drift": "Drift | None", "mean_drift": "Drift | None",
        "intruder_energy": "Rate | None", "sweep_energy": "list[Rate | None]", "null_max_cos": "dict[str, Cos]"}

    tuned: str
    matrices: list[MatrixResult] = field(default_factory=list)
    sweep_totals: list[Count] = field(default_factory=list)
    matrices_unchanged: Count = 0
    info: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    seconds: NonNeg = 0.0
    skipped: list[SkippedMatrix] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)

    @property
    def total_intruders(self) -> int:
        return sum(m.intruders for m in self.matrices)

    @property
    def incomplete(self) -> bool:
        """True when a matrix was left out for NaN/Inf values or an overflowing update."""
        return any(s.unmeasured for s in self.skipped)

    def by_module(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for m in self.matrices:
            out[m.module] = out.get(m.module, 0) + m.intruders
        return out

    def by_layer(self) -> dict[str, int]:
        out: dict[int, int] = {}
        for m in self.matrices:
            if m.layer is not None:
                out[m.layer] = out.get(m.layer, 0) + m.intruders
        return {str(k): out[k] for k in sorted(out)}

    @property
    def drift(self) -> float | None:
        """The largest matrix drift: 1 - the lowest max|cos| of any examined direction."""
        vals = [m.drift for m in self.matrices if m.drift is not None]
        return max(vals) if vals else None

    @property
    def mean_drift(self) -> float | None:
        return _mean([m.drift for m in self.matrices])

    @property
    def intruder_energy(self) -> float | None:
        """Mean over matrices of the share of top-k singular energy carried by intruders (each
        matrix counts once, as in the plain-sum count)."""
        return _mean([m.intruder_energy for m in self.matrices])

    @property
    def sweep_energy(self) -> list[float | None]:
        n = max((len(m.sweep_energy) for m in self.matrices), default=0)
        return [_mean([m.sweep_energy[i] for m in self.matrices if len(m.sweep_energy) == n]) for i in range(n)]

    def null_by_shape(self) -> dict[str, float]:
        """The null reference (``MatrixResult.null_max_cos``) of every audited shape, "m x n"."""
        out: dict[str, float] = {}
        for m in self.matrices:
            if m.null_max_cos is not None:
                out.setdefault(f"{m.shape[0]} x {m.shape[1]}", m.null_max_cos)
        return out

    def worst_matrices(self, n: int = 5) -> list[MatrixResult]:
        """Most intruders first, then lowest similarity."""
        ranked = sorted(self.matrices, key=lambda m: (-m.intruders, m.min_cos if m.min_cos is not None else 1.0))
        return ranked[:n]

    def to_json(self) -> dict[str, Any]:
        return {
            "tuned": self.tuned,
            "total_intruders": int(self.total_intruders),
            "sweep_totals": [int(x) for x in self.sweep_totals],
            "matrices_audited": len(self.matrices),
            "matrices_unchanged": int(self.matrices_unchanged),
            "skipped": [asdict(s) for s in self.skipped],
            "findings": [f.to_json() for f in self.findings],
            "by_module": self.by_module(),
            "by_layer": self.by_layer(),
            "info": self.info,
            "warnings": list(self.warnings),
            "seconds": round(float(self.seconds), 3),
            "drift": self.drift,
            "mean_drift": self.mean_drift,
            "intruder_energy": self.intruder_energy,
            "sweep_energy": self.sweep_energy,
            "null_max_cos": self.null_by_shape(),
            "matrices": [m.to_json() for m in self.matrices],
        }


@dataclass
class SpectrumResult(Result):
    """Intruder dimensions of every TUNED against BASE (Shuttleworth et al. 2024): per tuned model and
    matrix the max |cos| of the top-k tuned singular vectors to the base's, counts at epsilon and over
    the sweep, update metrics and calibrated statistics."""

    SCHEMA: ClassVar[str] = SCHEMA
    SCHEMA_VERSION: ClassVar[int] = SCHEMA_VERSION
    WHAT: ClassVar[str] = "spectrum result"
    WRITTEN_BY: ClassVar[str] = "spectrum --json"
    REQUIRED: ClassVar[tuple[str, ...]] = ("base", "k", "epsilon", "results")

    base: str
    k: Annotated[int, AT_LEAST_1]
    epsilon: Epsilon
    epsilon_sweep: list[Epsilon] = field(default_factory=lambda: list(DEFAULT_EPSILON_SWEEP))
    results: list[TunedResult] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # about the base / the run as a whole
    gate: GateOutcome | None = None  # the --fail-on outcome, when a gate was given

    @property
    def incomplete(self) -> bool:
        """True when any matrix of any tuned model was skipped for NaN/Inf values or an overflowing
        update (``TunedResult.skipped``): the CLI's exit status 4."""
        return any(r.incomplete for r in self.results)

    def body(self) -> dict[str, Any]:
        return {
            "base": self.base,
            "k": int(self.k),
            "epsilon": float(self.epsilon),
            "epsilon_sweep": [float(e) for e in self.epsilon_sweep],
            "warnings": list(self.warnings),
            "gate": self.gate.to_json() if self.gate is not None else None,
            "results": [r.to_json() for r in self.results],
        }

    # ---- tables -------------------------------------------------------------------------
    def rows(self) -> list[dict[str, Any]]:
        """One flat row per tuned model x matrix (the CSV's rows)."""
        out = []
        for r in self.results:
            for m in r.matrices:
                row = {
                    "tuned": r.tuned, "name": m.name, "module": m.module, "layer": m.layer,
                    "rows": m.shape[0], "cols": m.shape[1], "kind": m.kind, "delta_type": m.delta_type,
                    "adapter_rank": m.adapter_rank, "method": m.method, "intruders": m.intruders,
                    "k_used": m.k_used,
                    "min_max_cos": m.min_cos,
                    "max_cos": ";".join(f"{c:.6f}" for c in m.max_cos),
                    "delta_norm": m.delta_norm, "relative_delta_norm": m.relative_delta_norm,
                    "effective_rank": m.effective_rank, "stable_rank": m.stable_rank,
                    "null_max_cos": m.null_max_cos, "drift": m.drift, "intruder_energy": m.intruder_energy,
                }
                # not strict: a result read from a file may carry a shorter sweep; the row has what is there
                for e, c in zip(self.epsilon_sweep, m.sweep_counts, strict=False):
                    row[f"intruders_eps_{e:g}"] = c
                for e, x in zip(self.epsilon_sweep, m.sweep_energy, strict=False):
                    row[f"energy_eps_{e:g}"] = x
                out.append(row)
        return out

    def csv_columns(self) -> list[str]:
        return (CSV_COLUMNS + [f"intruders_eps_{e:g}" for e in self.epsilon_sweep] + CALIBRATION_COLUMNS
                + [f"energy_eps_{e:g}" for e in self.epsilon_sweep])

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame(self.rows(), columns=self.csv_columns())

    def to_csv(self) -> str:
        """The rows as CSV; text cells are neutralised against spreadsheet formulas."""
        from ..io import csv_text

        return csv_text(self.to_dataframe())

    def write_csv(self, path: str | os.PathLike) -> Path:
        from ..io import atomic_write_text

        return atomic_write_text(path, self.to_csv())


CSV_COLUMNS = ["tuned", "name", "module", "layer", "rows", "cols", "kind", "delta_type", "adapter_rank",
               "method", "intruders", "k_used", "min_max_cos", "max_cos", "delta_norm", "relative_delta_norm",
               "effective_rank", "stable_rank"]
# after the intruders_eps_* columns, so that the columns of earlier versions keep their places
CALIBRATION_COLUMNS = ["null_max_cos", "drift", "intruder_energy"]


def load_spectrum(path: str | os.PathLike) -> SpectrumResult:
    """Read a ``lora-audit spectrum --json`` file (InputError when it is not one)."""
    return SpectrumResult.load(path)
