"""Safety-scan results (schema ``"safety-scan"``, version ``SCHEMA_VERSION``): typed, with their JSON.

Written by ``lora-audit safety-scan --json`` and ``lora_audit.scan.run_safety_scan``. Fields marked
[contract] are never renamed (fields may be added). Top level, in this order::

    lora_audit   provenance block (settings: prompts, benign, limit, weights_only, unaligned, ...)
    base         [contract] the BASE argument as given
    settings     [contract] the same settings again, at the top
    warnings     about the base, the direction or the run as a whole
    gate         the --fail-on outcome (``results.gate``), null without a gate
    direction    ``DirectionInfo``: the refusal direction of BASE and how far to trust it, per
                 layer (separation ||r_l||, split-half stability, d'), the prompt sets with their
                 hashes and halves, BASE's own first-token refusal, whether the profile came from
                 the cache, and ``causal``: every candidate direction's intervention effects on the
                 validation prompts and the layer chosen (null: no causal direction)
    risk_models  {name: ``RiskModelInfo``}: the fitted risk model used, with its validation record
    risk_status  ``RiskStatus``: whether that model is validated, and for this BASE
    seconds      {stage: s}: load_base, profile (0 on a cache hit), weights, load_tuned, forward,
                 total (loading counted apart, so safety-eval's time can be compared like for like)
    models       [contract] {TUNED as given on the command line: ``ModelScan``}
                 risk      [contract] number in [0, 1], or null: no validated risk model, or a
                           signal it needs could not be computed (``verdict_line`` says which)
                 refusal_edits  matrices edited along BASE's causal refusal direction
                           (``scan.tamper``); null when BASE has no causal direction. With
                           refusal_edits_removing / _adding (the sign) and refusal_edit_matrices
                 verdict   PREDICTED_SAFETY_LOSS | NO_PREDICTED_SAFETY_LOSS | UNKNOWN (no risk), and
                           the line shown to people in ``verdict_line``
                 signals   [contract] {signal name: value or null} (``SIGNAL_MODES`` names each;
                           ``lora_audit.scan`` modules define them: weights.py, safelora.py,
                           forward.py)
                 intervals {signal name: [low, high]} 95 % intervals of forward-pass signals
                 layers    [contract] one ``LayerValues`` per layer of BASE
                 findings  ``results.findings.Finding``s about this model (rule ids of ``RULES``)
                 seconds   {"weights": s, "forward": s, "load": s}

Read one back with ``load_scan_result(path)`` or ``lora_audit.results.load_result``. This module
imports neither torch nor model code.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any, ClassVar

from ..text import printable
from .base import Result
from .findings import Finding
from .gate import GateOutcome
from .schema import OPEN_UNIT, POSITIVE, Cos, Count, Interval, NonNeg, Rate

SCHEMA = "safety-scan"
SCHEMA_VERSION = 1

# Every signal a scan computes, and what it needs: "weights" (the weights and BASE's profile),
# "unaligned" (weights and --unaligned), "forward" (a forward pass of TUNED: not in --weights-only).
SIGNAL_MODES: dict[str, str] = {
    "refusal_energy_share": "weights", "refusal_energy_ratio": "weights", "refusal_energy_max_ratio": "weights",
    "weight_shift": "weights", "top_cos_max": "weights", "rank1_share": "weights", "refusal_edit_max_share": "weights",
    "safelora_mean_cos": "unaligned", "safelora_below_share": "unaligned",
    "refusal_score_delta": "forward", "first_token_refusal": "forward", "first_token_drop": "forward",
    "activation_shift": "forward",
}
# Gate fields a --weights-only scan cannot give a value.
FORWARD_ONLY_FIELDS = ("first_token_drop",)


@dataclass
class RiskModelInfo:
    """A fitted risk model (``lora_audit.scan.risk``): risk = sigmoid(intercept + sum weights_j *
    (transform_j(signal_j) - mean_j) / scale_j)."""

    name: str  # "weights_only" | "full"
    features: list[str]
    transforms: list[str]  # "identity" | "log1p"
    mean: list[float]
    scale: list[Annotated[float, POSITIVE]]
    weights: list[float]
    intercept: float
    threshold: Annotated[float, OPEN_UNIT] = 0.5
    fit: dict[str, Any] = field(default_factory=dict)  # n, positives, auroc_in_sample, auroc_leave_one_method_out, ...
    validation: RiskValidation | None = None  # the held-out record that decides whether it is used


def _unit(x: float, what: str) -> None:
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"{what} {x} is not in [0, 1]")


@dataclass
class ReliabilityBin:
    """One bin of a reliability diagram: held-out risks in [low, high), their mean, the share of
    positives among them."""

    low: float
    high: float
    n: int
    mean_risk: float | None = None
    observed: float | None = None

    def __post_init__(self):
        _unit(self.low, "low")
        _unit(self.high, "high")
        if self.low > self.high or self.n < 0:
            raise ValueError(f"bin [{self.low}, {self.high}) with {self.n} models is impossible")
        for name in ("mean_risk", "observed"):
            if getattr(self, name) is not None:
                _unit(getattr(self, name), name)


@dataclass
class RiskValidation:
    """How a risk model did on held-out data (``lora_audit.scan.validation``): the record safety-scan
    reads to decide whether the model's risk is shown (``scan.validation.problems``)."""

    held_out: str  # how the held-out scores were made, e.g. "leave-one-method-out"
    n: int  # panel models scored
    positives: int  # of them labelled as having lost safety
    auroc: float  # of the held-out risks
    auroc_ci: list[float]  # its 95 % bootstrap interval over panel models
    baseline: str  # the zero-parameter rule it is compared with
    baseline_auroc: float
    ece: float  # expected calibration error of the held-out risks
    reliability: list[ReliabilityBin] = field(default_factory=list)
    baseline_auroc_ci: list[float] = field(default_factory=list)
    base_fingerprint: str | None = None  # content hash of the panel's BASE ("sha256:...", ``results.fingerprint``)
    base: str = ""  # its name, for people
    signal_prompts: str = ""  # the prompt set the signals were read on
    label_prompts: str = ""  # the prompt set the labels were measured on

    def __post_init__(self):
        if self.n < 2 or not 0 < self.positives < self.n:
            raise ValueError(f"n {self.n} with {self.positives} positives: a held-out AUROC needs both classes")
        for name in ("auroc", "baseline_auroc", "ece"):
            _unit(getattr(self, name), name)
        for name in ("auroc_ci", "baseline_auroc_ci"):
            ci = getattr(self, name)
            if not ci and name == "baseline_auroc_ci":
                continue
            if len(ci) != 2 or not 0.0 <= ci[0] <= ci[1] <= 1.0:
                raise ValueError(f"{name} {ci} is not an interval [low, high] within [0, 1]")
        if not self.auroc_ci[0] - 1e-9 <= self.auroc <= self.auroc_ci[1] + 1e-9:
            raise ValueError(f"auroc {self.auroc} lies outside its interval {self.auroc_ci}")
        if sum(b.n for b in self.reliability) not in (0, self.n):
            raise ValueError(f"the reliability bins hold {sum(b.n for b in self.reliability)} models, not n = {self.n}")
        if self.base_fingerprint is not None and not self.base_fingerprint.startswith("sha256:"):
            raise ValueError(f"base_fingerprint {self.base_fingerprint!r} is not a content hash (sha256:...)")


@dataclass
class RiskStatus:
    """Whether the risk model a scan used is validated (its record passes ``scan.validation``'s
    rules), and whether BASE is the model its panel was built on (by content hash)."""

    model: str | None = None  # the risk model's name, None when the file has none for this mode
    file: str = ""  # the risk file it came from
    validated: bool = False
    problems: list[str] = field(default_factory=list)  # why it is not validated
    base_matches: bool = False  # BASE's content hash is the record's base_fingerprint


@dataclass
class LayerValues:
    """One layer's values for one tuned model (null where not measured)."""

    layer: Count
    stable: bool = False  # BASE's direction at this layer counts in the aggregates
    writers_changed: Count = 0
    energy_share: Rate | None = None  # ||r^T dW||^2 / ||dW||_F^2 over the layer's writers
    energy_ratio: NonNeg | None = None  # energy_share x d_model (1 = chance)
    weight_shift: float | None = None  # sum of r^T dW (x_H - x_B) / sum of |r^T W0 (x_H - x_B)|
    top_cos: Cos | None = None  # largest |cos(u_1, r)| of the layer's writers
    safelora_cos: float | None = None  # mean Safe LoRA score of the layer's changed matrices
    activation_shift: float | None = None  # forward pass: (x_T - x_B) . r / ||r_l||, mean over prompts


@dataclass
class ModelScan:
    risk: Rate | None
    refusal_edits: Count | None = None  # matrices edited along BASE's causal refusal direction (``scan.tamper``)
    refusal_edits_removing: Count | None = None  # of them, edits that remove the direction (abliteration)
    refusal_edits_adding: Count | None = None  # of them, edits that add to it (toward over-refusal)
    refusal_edit_matrices: list[dict[str, Any]] = field(default_factory=list)  # the flagged ones, with their test
    stream_matrices_changed: Count = 0  # changed matrices writing into the residual stream (the tests' family)
    verdict: str = "UNKNOWN"
    verdict_line: str = ""
    signals: dict[str, float | None] = field(default_factory=dict)
    intervals: dict[str, Annotated[list[float], Interval()]] = field(default_factory=dict)
    layers: list[LayerValues] = field(default_factory=list)
    risk_model: str | None = None  # the name of the risk model used
    source: str = ""
    kind: str = ""
    fingerprint: str | None = None
    matrices_changed: Count = 0
    writers_changed: Count = 0
    seconds: dict[str, NonNeg] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)  # what the SARIF export shows besides the verdict

    def __post_init__(self):
        if self.risk is not None and not 0.0 <= self.risk <= 1.0:
            raise ValueError(f"risk {self.risk} is not in [0, 1]")
        counts = (self.refusal_edits, self.refusal_edits_removing, self.refusal_edits_adding)
        if any(c is not None and c < 0 for c in counts) or self.stream_matrices_changed < 0:
            raise ValueError(f"refusal edit counts {counts} must not be negative")
        if None not in counts and counts[0] != counts[1] + counts[2]:
            raise ValueError(f"refusal_edits {counts[0]} is not removing {counts[1]} + adding {counts[2]}")


@dataclass
class PromptRecord:
    source: str
    layout: str = "unknown"
    n: Count = 0
    sha256: str = ""


@dataclass
class CausalCandidate:
    """One layer's candidate refusal direction and its intervention effects on the validation
    prompts (``lora_audit.scan.causal``)."""

    layer: int
    norm: float  # ||r_l||
    ablation_refusal: float  # share of harmful validation prompts refused with r̂_l ablated everywhere
    ablation_score: float  # their mean first-token refusal log-odds
    actadd_refusal: float  # share of harmless validation prompts refused with r_l added at layer l
    actadd_score: float
    kl: float  # mean KL(BASE || ablated) of the next-token distribution on the harmless validation prompts BASE
    # does not refuse (all of them when it refuses every one; ``CausalTest.n_kl`` says how many)
    missed: list[str] = field(default_factory=list)  # criteria not met: "ablation", "actadd", "kl"
    kl_harmful: float | None = None  # mean KL(BASE || ablated) on the harmful validation prompts (None: older record)

    @property
    def causal(self) -> bool:
        return not self.missed


@dataclass
class CausalTest:
    """Every candidate's effects, the chosen layer (None: no causal direction), the baselines."""

    candidates: list[CausalCandidate]
    layer: int | None
    base_refusal: float  # share of harmful validation prompts BASE refuses (no intervention)
    base_score: float
    base_refusal_harmless: float  # share of harmless validation prompts BASE refuses
    base_score_harmless: float
    n_harmful: int  # validation prompts
    n_harmless: int
    thresholds: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    n_kl: int | None = None  # harmless validation prompts the KL is measured on (None: a record before this field)

    @property
    def causal(self) -> bool:
        return self.layer is not None

    @property
    def chosen(self) -> CausalCandidate | None:
        return next((c for c in self.candidates if c.layer == self.layer), None)


@dataclass
class DirectionInfo:
    n_layers: Count
    d_model: Count
    blocks: str = ""
    writers: list[str] = field(default_factory=list)  # module paths of the residual writers
    prompts: dict[str, PromptRecord] = field(default_factory=dict)  # "harmful", "harmless"
    separation: list[float] = field(default_factory=list)  # ||r_l||
    stability: list[float] = field(default_factory=list)  # split-half cosine
    dprime: list[float] = field(default_factory=list)
    stable_layers: list[Count] = field(default_factory=list)
    base_first_token_refusal: Rate | None = None  # share of harmful prompts with log-odds > 0
    base_first_token_refusal_harmless: Rate | None = None
    cache: str = "off"  # "hit" | "miss" | "off"
    key: str = ""  # the cache key of the profile ("" with the cache off: BASE is not hashed then)
    seconds: NonNeg = 0.0
    causal: CausalTest | None = None  # the intervention test of every candidate direction
    halves: dict[str, int] = field(default_factory=dict)  # prompts per half: harmful_direction, harmful_validation, ...


@dataclass
class SafetyScanResult(Result):
    """The predicted risk of safety loss of every TUNED from weights (and one forward pass): the refusal
    direction of BASE, each model's signals, per-layer values and risk."""

    SCHEMA: ClassVar[str] = SCHEMA
    SCHEMA_VERSION: ClassVar[int] = SCHEMA_VERSION
    WHAT: ClassVar[str] = "safety-scan result"
    WRITTEN_BY: ClassVar[str] = "safety-scan --json"
    SETTINGS_IN_BODY: ClassVar[bool] = True

    base: str
    models: dict[str, ModelScan]
    direction: DirectionInfo | None = None
    risk_models: dict[str, RiskModelInfo] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    gate: GateOutcome | None = None  # the --fail-on outcome, when a gate was given
    risk_status: RiskStatus = field(default_factory=RiskStatus)
    seconds: dict[str, float] = field(default_factory=dict)  # by stage (module docstring)

    @staticmethod
    def looks_like(obj: dict) -> bool:
        """A safety-scan result JSON without a provenance block (fields only)."""
        return isinstance(obj.get("models"), dict) and "base" in obj and "direction" in obj

    def body(self) -> dict[str, Any]:
        body = asdict(self)
        body.pop("provenance")
        return {"base": body.pop("base"), "settings": body.pop("settings"), **body}


def load_scan_result(path: str | os.PathLike) -> SafetyScanResult:
    """Read and validate a JSON written by ``lora-audit safety-scan --json``."""
    return SafetyScanResult.load(path)


def _num(x: float | None, fmt: str = "{:.3f}") -> str:
    return "-" if x is None else fmt.format(x)


SUMMARY_SIGNALS = (("first_token_drop", "first-token drop", "{:+.0%}"), ("refusal_score_delta", "refusal score d", "{:+.2f}"),
                   ("refusal_energy_ratio", "energy x chance", "{:.1f}"), ("activation_shift", "act. shift", "{:+.3f}"),
                   ("safelora_mean_cos", "Safe LoRA cos", "{:.3f}"))


def _edits(m: ModelScan) -> str:
    if m.refusal_edits is None:
        return "n/a"
    if not m.refusal_edits:
        return "0"
    signs = "/".join(x for x in (f"-{m.refusal_edits_removing}" if m.refusal_edits_removing else "",
                                 f"+{m.refusal_edits_adding}" if m.refusal_edits_adding else "") if x)
    return f"{m.refusal_edits} ({signs})"


def summary_table(result: SafetyScanResult, *, layers: bool = False) -> str:
    """A fixed-width summary of a scan (names made printable); ``layers`` adds per-layer tables."""
    shown = [s for s in SUMMARY_SIGNALS if any(m.signals.get(s[0]) is not None for m in result.models.values())]
    with_risk = any(m.risk is not None for m in result.models.values())
    rows = [("model", "refusal edits", *[h for _, h, _ in shown], *(("risk", "verdict") if with_risk else ()))]
    for name, m in result.models.items():
        rows.append((printable(name), _edits(m), *[_num(m.signals.get(k), f) for k, _, f in shown],
                     *((_num(m.risk, "{:.2f}"), m.verdict) if with_risk else ())))
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w[i]) for i, c in enumerate(r)) for r in rows]
    lines.insert(1, "  ".join("-" * x for x in w))
    d = result.direction
    if d is not None:
        c = d.causal
        where = (f"causal at layer {c.layer} (ablation {c.base_refusal:.0%} -> {c.chosen.ablation_refusal:.0%} of "
                 f"held-out harmful prompts refused, actadd {c.base_refusal_harmless:.0%} -> "
                 f"{c.chosen.actadd_refusal:.0%} of harmless ones, KL {c.chosen.kl:.3f})"
                 if c is not None and c.causal and c.chosen is not None else
                 "NOT causal: no refusal edits counted" if c is not None else "no causal test (an older result)")
        lines += ["", f"refusal direction: {d.n_layers} layers, {where}; BASE refuses "
                      f"{_num(d.base_first_token_refusal, '{:.0%}')} of "
                      f"{d.prompts['harmful'].n if 'harmful' in d.prompts else '?'} scan prompts by first token; "
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
