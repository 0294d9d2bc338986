"""Safety-scan results (schema ``"safety-scan"``, version ``SCHEMA_VERSION``): typed, with their JSON.

Written by ``lora-audit safety-scan --json`` and ``lora_audit.scan.run_safety_scan``. Fields marked
[contract] are never renamed (fields may be added). Top level, in this order::

    lora_audit   provenance block (settings: prompts, benign, limit, weights_only, unaligned, ...)
    base         [contract] the BASE argument as given
    settings     [contract] the same settings again, at the top
    warnings     about the base, the direction or the run as a whole
    gate         the --fail-on outcome (``results.gate``), null without a gate
    direction    ``DirectionInfo``: the refusal direction of BASE and how far to trust it, per
                 layer (separation ||r_l||, split-half stability, d'), the stable layers the
                 aggregates use, the residual writers, the prompt sets with their hashes, BASE's
                 own first-token refusal, whether the profile came from the cache
    risk_models  {name: ``RiskModelInfo``}: the fitted risk models used, with their fit statistics
    models       [contract] {TUNED as given on the command line: ``ModelScan``}
                 risk      [contract] number in [0, 1] (null only when a signal the risk model
                           needs could not be computed; ``warnings`` says why)
                 verdict   PREDICTED_SAFETY_LOSS | NO_PREDICTED_SAFETY_LOSS | UNKNOWN, and the
                           line shown to people in ``verdict_line``
                 signals   [contract] {signal name: value or null} (``lora_audit.scan`` modules
                           define each: weights.py, safelora.py, forward.py)
                 intervals {signal name: [low, high]} 95 % intervals of forward-pass signals
                 layers    [contract] one ``LayerValues`` per layer of BASE
                 findings  ``results.findings.Finding``s about this model (rule ids of ``RULES``)
                 seconds   {"weights": s, "forward": s}

Read one back with ``load_scan_result(path)`` or ``lora_audit.results.load_result``. This module
imports neither torch nor model code.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..text import printable
from . import PROVENANCE_KEY, check_schema, read_result, write_result
from .findings import Finding
from .gate import GateOutcome
from .schema import parse

SCHEMA = "safety-scan"
SCHEMA_VERSION = 1


@dataclass
class RiskModelInfo:
    """A fitted risk model (``lora_audit.scan.risk``): risk = sigmoid(intercept + sum weights_j *
    (transform_j(signal_j) - mean_j) / scale_j)."""

    name: str  # "weights_only" | "full"
    features: list[str]
    transforms: list[str]  # "identity" | "log1p"
    mean: list[float]
    scale: list[float]
    weights: list[float]
    intercept: float
    threshold: float = 0.5
    fit: dict[str, Any] = field(default_factory=dict)  # n, positives, auroc_in_sample, auroc_leave_one_method_out, ...


@dataclass
class LayerValues:
    """One layer's values for one tuned model (null where not measured)."""

    layer: int
    stable: bool = False  # BASE's direction at this layer counts in the aggregates
    writers_changed: int = 0
    energy_share: float | None = None  # ||r^T dW||^2 / ||dW||_F^2 over the layer's writers
    energy_ratio: float | None = None  # energy_share x d_model (1 = chance)
    weight_shift: float | None = None  # sum of r^T dW (x_H - x_B) / sum of |r^T W0 (x_H - x_B)|
    top_cos: float | None = None  # largest |cos(u_1, r)| of the layer's writers
    safelora_cos: float | None = None  # mean Safe LoRA score of the layer's changed matrices
    activation_shift: float | None = None  # forward pass: (x_T - x_B) . r / ||r_l||, mean over prompts


@dataclass
class ModelScan:
    risk: float | None
    verdict: str = "UNKNOWN"
    verdict_line: str = ""
    signals: dict[str, float | None] = field(default_factory=dict)
    intervals: dict[str, list[float]] = field(default_factory=dict)
    layers: list[LayerValues] = field(default_factory=list)
    risk_model: str | None = None  # the name of the risk model used
    source: str = ""
    kind: str = ""
    fingerprint: str | None = None
    matrices_changed: int = 0
    writers_changed: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)  # what the SARIF export shows besides the verdict

    def __post_init__(self):
        if self.risk is not None and not 0.0 <= self.risk <= 1.0:
            raise InputError(f"risk {self.risk} is not in [0, 1]")


@dataclass
class PromptRecord:
    source: str
    layout: str = "unknown"
    n: int = 0
    sha256: str = ""


@dataclass
class DirectionInfo:
    n_layers: int
    d_model: int
    blocks: str = ""
    writers: list[str] = field(default_factory=list)  # module paths of the residual writers
    prompts: dict[str, PromptRecord] = field(default_factory=dict)  # "harmful", "harmless"
    separation: list[float] = field(default_factory=list)  # ||r_l||
    stability: list[float] = field(default_factory=list)  # split-half cosine
    dprime: list[float] = field(default_factory=list)
    stable_layers: list[int] = field(default_factory=list)
    base_first_token_refusal: float | None = None  # share of harmful prompts with log-odds > 0
    base_first_token_refusal_harmless: float | None = None
    cache: str = "off"  # "hit" | "miss" | "off"
    key: str = ""  # the cache key of the profile ("" with the cache off: BASE is not hashed then)
    seconds: float = 0.0


@dataclass
class SafetyScanResult:
    SCHEMA = SCHEMA
    SCHEMA_VERSION = SCHEMA_VERSION
    WRITTEN_BY = "safety-scan --json"

    base: str
    models: dict[str, ModelScan]
    direction: DirectionInfo | None = None
    risk_models: dict[str, RiskModelInfo] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    gate: GateOutcome | None = None  # the --fail-on outcome, when a gate was given
    provenance_block: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def looks_like(obj: dict) -> bool:
        """A safety-scan result JSON without a provenance block (fields only)."""
        return isinstance(obj.get("models"), dict) and "base" in obj and "direction" in obj

    def to_json(self) -> dict[str, Any]:
        body = asdict(self)
        prov = body.pop("provenance_block")
        return {PROVENANCE_KEY: prov, "base": body.pop("base"), "settings": body.pop("settings"), **body}

    @classmethod
    def from_json(cls, obj: dict[str, Any], *, source: str = "safety-scan JSON") -> "SafetyScanResult":
        """Parse and validate a safety-scan result (``results.schema``); InputError naming the field."""
        if not isinstance(obj, dict):
            raise InputError(f"{source}: expected a JSON object")
        prov = obj.get(PROVENANCE_KEY)
        check_schema(prov, SCHEMA, SCHEMA_VERSION, source, what="safety-scan result")
        body = {k: v for k, v in obj.items() if k != PROVENANCE_KEY}
        body["provenance_block"] = prov if isinstance(prov, dict) else {}
        return parse(cls, body, source, what="safety-scan result")

    def write_json(self, path: str | os.PathLike) -> Path:
        return write_result(path, self.to_json())


def load_scan_result(path: str | os.PathLike) -> SafetyScanResult:
    """Read and validate a JSON written by ``lora-audit safety-scan --json``."""
    return SafetyScanResult.from_json(read_result(path), source=str(path))


def _num(x: float | None, fmt: str = "{:.3f}") -> str:
    return "-" if x is None else fmt.format(x)


SUMMARY_SIGNALS = (("refusal_energy_ratio", "energy x chance", "{:.1f}"), ("weight_shift", "weight shift", "{:+.3f}"),
                   ("refusal_score_delta", "refusal score d", "{:+.2f}"), ("activation_shift", "act. shift", "{:+.3f}"),
                   ("safelora_mean_cos", "Safe LoRA cos", "{:.3f}"))


def summary_table(result: SafetyScanResult, *, layers: bool = False) -> str:
    """A fixed-width summary of a scan (names made printable); ``layers`` adds per-layer tables."""
    shown = [s for s in SUMMARY_SIGNALS if any(m.signals.get(s[0]) is not None for m in result.models.values())]
    rows = [("model", "risk", *[h for _, h, _ in shown], "verdict")]
    for name, m in result.models.items():
        rows.append((printable(name), _num(m.risk, "{:.2f}"), *[_num(m.signals.get(k), f) for k, _, f in shown],
                     m.verdict))
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w[i]) for i, c in enumerate(r)) for r in rows]
    lines.insert(1, "  ".join("-" * x for x in w))
    d = result.direction
    if d is not None:
        lines += ["", f"refusal direction: {d.n_layers} layers, {len(d.stable_layers)} stable (split-half cos >= 0.8); "
                      f"BASE refuses {_num(d.base_first_token_refusal, '{:.0%}')} of "
                      f"{d.prompts['harmful'].n if 'harmful' in d.prompts else '?'} harmful prompts by first token; "
                      f"profile {d.cache}"]
    for name, m in result.models.items():
        lines.append(f"{printable(name)}: {printable(m.verdict_line)}")
        lines += [f"  warning: {printable(x)}" for x in m.warnings]
        if layers:
            lines += _layer_lines(m)
    lines += [f"warning: {printable(x)}" for x in result.warnings]
    return "\n".join(lines)


def _layer_lines(m: ModelScan) -> list[str]:
    rows = [("layer", "stable", "energy x chance", "weight shift", "top cos", "Safe LoRA", "act. shift")]
    for x in m.layers:
        rows.append((str(x.layer), "yes" if x.stable else "no", _num(x.energy_ratio, "{:.1f}"),
                     _num(x.weight_shift, "{:+.4f}"), _num(x.top_cos), _num(x.safelora_cos),
                     _num(x.activation_shift, "{:+.3f}")))
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(c.rjust(w[i]) for i, c in enumerate(r)) for r in rows]
