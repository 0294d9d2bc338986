"""The release gate (``--fail-on EXPR``): conditions on a result's own fields, evaluated per tuned
model; when one holds, the command exits with status 3 (``lora_audit.errors.EXIT_GATE``) after
writing its results, and the JSON says which condition tripped, for which model, with what value.

Grammar (whitespace between the parts is allowed)::

    EXPR  := COND ( "," COND )*      the gate trips when ANY condition holds for ANY tuned model
    COND  := FIELD OP VALUE
    OP    := ">" | ">=" | "<" | "<=" | "==" | "!="
    VALUE := a number; for "verdict" a label compared by severity (RETAINED < INCONCLUSIVE <
             SAFETY_DEGRADED < SAFETY_REMOVED); for flags true / false

Fields, per tuned model (``all_fields()``; ``describe_fields`` prints them):

    spectrum  intruders          total intruder dimensions at the run's epsilon
              matrix_intruders   the most intruders in one matrix (the JSON names the matrix)
              intruder_matrices  matrices with at least one intruder
              min_max_cos        the lowest max|cos| of any examined direction (names the matrix)
              nonfinite          matrices left out for NaN/Inf values or an overflowing update
              structural         structural findings at level error or warning
              structural_errors  structural findings at level error
    safety    verdict            the verdict label, by severity
              refusal_drop       base - tuned refusal rate on the harmful prompts (0..1)
              refusal_rate       the tuned model's refusal rate (0..1)
              over_refusal_rise  tuned - base refusal rate on the benign prompts (0..1)
              capability_drop    the largest score drop of any lm-eval task (names the task)
              capability_degraded  the verdict's capability flag (true / false)
    scan      refusal_edits      matrices edited along BASE's causal refusal direction (names the
                                 first; also in --weights-only)
              first_token_drop   the first-token refusal proxy's drop on the scan's prompts (0..1;
                                 needs the forward pass: an error with --weights-only)
              risk               safety-scan's risk of safety loss (0..1; only from a validated risk
                                 model: an error without one)
              predicted_loss     safety-scan's verdict is PREDICTED_SAFETY_LOSS (true / false)

A field without a value for a model (no matrices, no benign set, no tasks) does not make a
condition hold; the JSON shows its value as null. Other result kinds (the screen) evaluate their
own fields with the same machinery: a table of ``GateField`` of their kind, values as
``[(model, {field: Measure})]`` and ``evaluate``.

This module reads results only (no model code, no torch).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import InputError
from ..text import printable

GRAMMAR = ("FIELD OP VALUE[,FIELD OP VALUE...] with OP one of > >= < <= == !=; the gate trips when any "
           "condition holds for any tuned model")
OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, "<=": operator.le, "==": operator.eq, "!=": operator.ne, ">": operator.gt, "<": operator.lt,
}
_COND = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(>=|<=|==|!=|>|<)\s*(\S+)\s*$")
FLAG = {"false": 0.0, "true": 1.0}


@dataclass(frozen=True)
class GateField:
    """A field conditions may name: the result kind it belongs to, what it measures, and the
    symbolic values it accepts (label -> number compared), if any."""

    name: str
    kind: str
    doc: str
    labels: Mapping[str, float] | None = None


def _verdict_labels() -> dict[str, float]:
    from .safety import VERDICT_RANK  # here: results.safety imports this module

    return {label: float(rank) for label, rank in VERDICT_RANK.items()}


@functools.lru_cache(maxsize=1)
def all_fields() -> dict[str, GateField]:
    """Every field of every result kind (built on first use: ``results.safety``, whose
    verdict ranks it reads, imports this module)."""
    spec = [
        ("intruders", "total intruder dimensions at the run's epsilon"),
        ("matrix_intruders", "the most intruders in one matrix"),
        ("intruder_matrices", "matrices with at least one intruder"),
        ("min_max_cos", "the lowest max|cos| of any examined direction"),
        ("nonfinite", "matrices left out for NaN/Inf values or an overflowing update"),
        ("structural", "structural findings at level error or warning"),
        ("structural_errors", "structural findings at level error"),
    ]
    out = {name: GateField(name, "spectrum", doc) for name, doc in spec}
    out["verdict"] = GateField("verdict", "safety", "the verdict, by severity: RETAINED < INCONCLUSIVE < "
                               "SAFETY_DEGRADED < SAFETY_REMOVED", _verdict_labels())
    for name, doc in (("refusal_drop", "base - tuned refusal rate on harmful prompts (0..1)"),
                      ("refusal_rate", "the tuned model's refusal rate (0..1)"),
                      ("over_refusal_rise", "tuned - base refusal rate on benign prompts (0..1)"),
                      ("capability_drop", "the largest score drop of any lm-eval task")):
        out[name] = GateField(name, "safety", doc)
    out["capability_degraded"] = GateField("capability_degraded", "safety", "the verdict's capability flag "
                                           "(true / false)", FLAG)
    out["refusal_edits"] = GateField("refusal_edits", "scan", "safety-scan: matrices edited along BASE's causal "
                                     "refusal direction (also with --weights-only)")
    out["first_token_drop"] = GateField("first_token_drop", "scan", "safety-scan: drop of the first-token refusal "
                                        "share on its own prompts (0..1; not with --weights-only)")
    out["risk"] = GateField("risk", "scan", "safety-scan's risk of safety loss (0..1; needs a validated risk model)")
    out["predicted_loss"] = GateField("predicted_loss", "scan", "safety-scan's verdict is PREDICTED_SAFETY_LOSS "
                                      "(true / false)", FLAG)
    out["failed"] = GateField("failed", "screen", "the adapter could not be audited (true / false)", FLAG)
    return out


def fields_for(*kinds: str) -> dict[str, GateField]:
    """The fields of the given result kinds ("spectrum", "safety", "scan", "screen"), in
    documentation order."""
    return {n: f for n, f in all_fields().items() if f.kind in kinds}


def describe_fields(fields: Mapping[str, GateField]) -> str:
    return "; ".join(f"{f.name} ({f.doc})" for f in fields.values())


# ---- the parsed expression ---------------------------------------------------------------------
@dataclass(frozen=True)
class Condition:
    field: GateField
    op: str
    threshold: float
    shown: str  # the value as written (a number or a label)

    @property
    def text(self) -> str:
        return f"{self.field.name}{self.op}{self.shown}"

    def holds(self, value: float | None) -> bool:
        return value is not None and OPS[self.op](value, self.threshold)


@dataclass(frozen=True)
class Gate:
    expression: str
    conditions: tuple[Condition, ...]

    @property
    def kinds(self) -> set[str]:
        return {c.field.kind for c in self.conditions}


def _threshold(f: GateField, token: str) -> tuple[float, str]:
    if f.labels is not None:
        key = {k.lower(): k for k in f.labels}.get(token.lower())
        if key is None:
            raise ValueError(f"{f.name} takes one of {', '.join(f.labels)}, got {token!r}")
        return f.labels[key], key
    try:
        v = float(token)
    except ValueError:
        raise ValueError(f"{f.name} takes a number, got {token!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"{f.name} takes a finite number, got {token!r}")
    return v, token


def parse_gate(text: str, fields: Mapping[str, GateField]) -> Gate:
    """``"intruders>0, verdict>=SAFETY_DEGRADED"`` -> Gate; ValueError naming the bad part, the
    grammar and the fields accepted (``fields``: the command's table, e.g. ``fields_for("spectrum")``)."""
    conditions = []
    parts = [p for p in (text or "").split(",")]
    if not (text or "").strip() or any(not p.strip() for p in parts):
        raise ValueError(f"an empty condition in {text!r}; expected {GRAMMAR}")
    for part in parts:
        m = _COND.match(part)
        if m is None:
            raise ValueError(f"{part.strip()!r} is not a condition; expected {GRAMMAR}")
        name, op, token = m.groups()
        f = fields.get(name)
        if f is None:
            import difflib

            close = difflib.get_close_matches(name, list(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown field {name!r}{hint}; expected {GRAMMAR}; this command's fields are: "
                             f"{describe_fields(fields)}")
        try:
            threshold, shown = _threshold(f, token)
        except ValueError as e:
            raise ValueError(f"{e}; expected {GRAMMAR}") from None
        conditions.append(Condition(f, op, threshold, shown))
    return Gate(",".join(c.text for c in conditions), tuple(conditions))


def parse_gates(texts: Sequence[str], fields: Mapping[str, GateField]) -> Gate:
    """Several ``--fail-on`` expressions as one gate: the conditions of all of them, in order, each
    once (the gate trips when any holds, as within one expression); ValueError as ``parse_gate``."""
    if isinstance(texts, str):
        texts = [texts]
    conditions: dict[str, Condition] = {}
    for text in texts:
        for c in parse_gate(text, fields).conditions:
            conditions.setdefault(c.text, c)
    if not conditions:
        raise ValueError(f"no condition given; expected {GRAMMAR}")
    return Gate(",".join(conditions), tuple(conditions.values()))


# ---- values and evaluation -----------------------------------------------------------------------
@dataclass(frozen=True)
class Measure:
    """A field's value for one model: None when not measured; ``where`` names the matrix or task
    it comes from; ``shown`` is how to print it when not as a number (a verdict label)."""

    value: float | None
    where: str | None = None
    shown: str | None = None


Values = Sequence[tuple[str, Mapping[str, Measure]]]  # [(model, {field: Measure})] in result order


@dataclass
class ModelCheck:
    """One model's value of a condition's field, and whether the condition holds for it."""

    model: str
    value: float | None
    shown: str
    where: str | None = None
    tripped: bool = False


@dataclass
class ConditionOutcome:
    condition: str  # as normalised: "intruders>0"
    field: str
    op: str
    threshold: float
    tripped: bool
    models: list[ModelCheck] = dataclasses.field(default_factory=list)  # `field` is a column name in this class


@dataclass
class GateOutcome:
    """The ``gate`` block of a result JSON: the expression, and per condition every model's value."""

    expression: str
    tripped: bool
    conditions: list[ConditionOutcome] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        """What the command prints: one line per condition with every model's value."""
        out = []
        for c in self.conditions:
            values = ", ".join(f"{printable(m.model)} {m.shown}" + (f" in {printable(m.where)}" if m.where else "")
                               + (" <-" if m.tripped and not all(x.tripped for x in c.models) else "")
                               for m in c.models)
            out.append(f"  {'TRIPPED' if c.tripped else 'passed '}  {c.condition}  ({c.field}: {values})")
        return out


def _shown(value: float | None, given: str | None) -> str:
    if given is not None:
        return given
    if value is None:
        return "n/a"
    return str(int(value)) if float(value).is_integer() else f"{value:.4g}"


def evaluate(gate: Gate, values: Values, kind: str) -> GateOutcome:
    """The outcome of the gate's conditions on fields of ``kind`` over ``values``."""
    conditions = []
    for cond in (c for c in gate.conditions if c.field.kind == kind):
        checks = []
        for model, measures in values:
            m = measures.get(cond.field.name, Measure(None))
            checks.append(ModelCheck(model, m.value, _shown(m.value, m.shown), m.where, cond.holds(m.value)))
        conditions.append(ConditionOutcome(cond.text, cond.field.name, cond.op, cond.threshold,
                                           any(c.tripped for c in checks), checks))
    return GateOutcome(gate.expression, any(c.tripped for c in conditions), conditions)


def tuned_values(r) -> dict[str, Measure]:
    """The spectrum fields of one tuned model (a ``TunedResult``)."""
    worst = max(r.matrices, key=lambda m: m.intruders, default=None)
    cosines = [m for m in r.matrices if m.min_cos is not None]
    low = min(cosines, key=lambda m: m.min_cos, default=None)
    return {
        "intruders": Measure(r.total_intruders),
        "matrix_intruders": Measure(worst.intruders if worst else 0, worst.name if worst and worst.intruders else None),
        "intruder_matrices": Measure(sum(m.intruders > 0 for m in r.matrices)),
        "min_max_cos": Measure(low.min_cos, low.name) if low else Measure(None),
        "nonfinite": Measure(sum(s.unmeasured for s in r.skipped)),
        "structural": Measure(sum(f.counts for f in r.findings)),
        "structural_errors": Measure(sum(f.level == "error" for f in r.findings)),
    }


def spectrum_values(result) -> list[tuple[str, dict[str, Measure]]]:
    """The spectrum fields of every tuned model of a ``SpectrumResult``."""
    return [(r.tuned, tuned_values(r)) for r in result.results]


def screen_values(result) -> list[tuple[str, dict[str, Measure]]]:
    """Every adapter of a ``ScreenResult``: the spectrum fields stored in its row (none for an
    adapter that failed: its conditions cannot hold) and ``failed``."""
    out = []
    for row in result.adapters:
        measures = {name: Measure(value) for name, value in row.gate_values.items()}
        measures["failed"] = Measure(float(row.status != "ok"), shown="true" if row.status != "ok" else "false")
        out.append((row.adapter, measures))
    return out


def apply_screen_gate(gate: Gate, result) -> GateOutcome:
    """Evaluate ``gate`` (spectrum and screen conditions) on every adapter of a ``ScreenResult``,
    store the outcome in its ``gate`` field (mutates it) and return it."""
    values = screen_values(result)
    parts = [evaluate(gate, values, kind) for kind in ("spectrum", "screen")]
    result.gate = GateOutcome(gate.expression, any(p.tripped for p in parts),
                              [c for p in parts for c in p.conditions])
    return result.gate


def safety_values(result) -> list[tuple[str, dict[str, Measure]]]:
    """The safety fields of every tuned model of a ``SafetyResult``."""
    from .safety import VERDICT_RANK

    out = []
    for name in result.tuned_names:
        v, c = result.verdict.get(name), result.comparisons.get(name)
        drops = sorted(((-d, task) for task, d in (c.capability_delta.items() if c else ())), reverse=True)
        out.append((name, {
            "verdict": Measure(VERDICT_RANK[v.label], shown=v.label) if v else Measure(None),
            "refusal_drop": Measure(v.refusal_drop if v else None),
            "refusal_rate": Measure(result.models[name].refusal_rate),
            "over_refusal_rise": Measure(c.over_refusal_rate_delta if c else None),
            "capability_drop": Measure(drops[0][0], drops[0][1]) if drops else Measure(None),
            "capability_degraded": (Measure(float(v.capability_degraded), shown=str(v.capability_degraded).lower())
                                    if v else Measure(None)),
        }))
    return out


def scan_values(result) -> list[tuple[str, dict[str, Measure]]]:
    """The safety-scan fields of every tuned model of a ``SafetyScanResult`` (a model whose risk
    could not be computed has neither: its conditions cannot hold)."""
    out = []
    for name, m in result.models.items():
        known = m.verdict != "UNKNOWN"
        loss = m.verdict == "PREDICTED_SAFETY_LOSS"
        first = m.refusal_edit_matrices[0]["name"] if m.refusal_edit_matrices else None
        out.append((name, {"risk": Measure(m.risk),
                           "predicted_loss": (Measure(float(loss), shown=str(loss).lower()) if known
                                              else Measure(None)),
                           "refusal_edits": Measure(None if m.refusal_edits is None else float(m.refusal_edits), first),
                           "first_token_drop": Measure(m.signals.get("first_token_drop"))}))
    return out


def apply_gate(gate: Gate, *, spectrum=None, safety=None, scan=None) -> list[GateOutcome]:
    """Evaluate ``gate`` on the results given and store each kind's outcome in that result's
    ``gate`` field (mutates them). InputError when a condition's kind has no result."""
    outcomes = []
    for kind, result, values in (("spectrum", spectrum, spectrum_values), ("safety", safety, safety_values),
                                 ("scan", scan, scan_values)):
        if kind not in gate.kinds:
            continue
        if result is None:
            raise InputError(f"--fail-on {gate.expression!r} has {kind} conditions, but there is no {kind} result")
        result.gate = evaluate(gate, values(result), kind)
        outcomes.append(result.gate)
    return outcomes


def format_gate(gate: Gate, outcomes: Sequence[GateOutcome]) -> str:
    """The gate's verdict as printed by the commands."""
    tripped = any(o.tripped for o in outcomes)
    head = f"Gate --fail-on '{gate.expression}': " + ("TRIPPED (exit status 3)" if tripped else "passed")
    return "\n".join([head] + [line for o in outcomes for line in o.lines()])
