"""The --fail-on gate on typed results: the grammar (every operator, numbers, verdict labels, flags,
bad expressions), every field of the spectrum and safety kinds against values computed here by
hand, the gate block's JSON round trip, and the exit status it leads to."""

from __future__ import annotations

import pytest

from lora_audit.commands._common import exit_code
from lora_audit.errors import EXIT_GATE, EXIT_INCOMPLETE, EXIT_OK, InputError
from lora_audit.results.gate import (GRAMMAR, Measure, apply_gate, evaluate, fields_for, format_gate, parse_gate,
                                     safety_values, spectrum_values)
from lora_audit.results.safety import SafetyResult
from lora_audit.results.spectrum import SpectrumResult, TunedResult
from tests.results.synth import safety_result, spectrum_result

SPECTRUM = fields_for("spectrum")
SAFETY = fields_for("safety")
BOTH = fields_for("spectrum", "safety")


def _tripped(expr, result, fields):
    gate = parse_gate(expr, fields)
    (outcome,) = apply_gate(gate, **{"spectrum" if isinstance(result, SpectrumResult) else "safety": result})
    return {m.model: m.value for c in outcome.conditions for m in c.models if m.tripped}


# ---- grammar ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("expr,expected", [
    ("intruders>0", "intruders>0"), (" intruders >= 3 ", "intruders>=3"), ("intruders<1", "intruders<1"),
    ("intruders<=2", "intruders<=2"), ("intruders==3", "intruders==3"), ("intruders!=0", "intruders!=0"),
    ("intruders>0,min_max_cos<0.3", "intruders>0,min_max_cos<0.3"),
    ("verdict>=safety_degraded", "verdict>=SAFETY_DEGRADED"), ("capability_degraded==TRUE", "capability_degraded==true"),
])
def test_parse(expr, expected):
    assert parse_gate(expr, BOTH).expression == expected


@pytest.mark.parametrize("expr,message", [
    ("", "an empty condition"), ("intruders>0,", "an empty condition"), ("intruders", "is not a condition"),
    ("intruders=>0", "is not a condition"), ("intruders>", "is not a condition"),
    ("intruder>0", "unknown field 'intruder' (did you mean 'intruders'?)"),
    ("verdict>0", "verdict takes one of SAFETY_REMOVED, SAFETY_DEGRADED, INCONCLUSIVE, RETAINED"),
    ("intruders>many", "intruders takes a number, got 'many'"), ("intruders>nan", "takes a finite number"),
    ("capability_degraded==maybe", "takes one of false, true"),
])
def test_parse_errors(expr, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        parse_gate(expr, BOTH)


def test_fields_belong_to_their_command():
    with pytest.raises(ValueError, match="unknown field 'verdict'"):
        parse_gate("verdict>=SAFETY_DEGRADED", SPECTRUM)
    with pytest.raises(ValueError, match="unknown field 'intruders'"):
        parse_gate("intruders>0", SAFETY)
    assert "any condition holds for any tuned model" in GRAMMAR


# ---- every operator, on the total per model (a: 3, b: 0) ----------------------------------------------
@pytest.mark.parametrize("op,threshold,tripped", [
    (">", 0, {"a"}), (">", 3, set()), (">=", 3, {"a"}), ("<", 3, {"b"}), ("<=", 0, {"b"}),
    ("==", 3, {"a"}), ("==", 1, set()), ("!=", 0, {"a"}),
])
def test_operators(op, threshold, tripped):
    assert set(_tripped(f"intruders{op}{threshold}", spectrum_result(), SPECTRUM)) == tripped


# ---- spectrum fields ------------------------------------------------------------------------------------
def test_spectrum_fields():
    values = dict(spectrum_values(spectrum_result()))
    a, b = values["a"], values["b"]
    assert a["intruders"] == Measure(3) and b["intruders"] == Measure(0)
    assert a["matrix_intruders"] == Measure(2, "l0.q_proj.weight") and b["matrix_intruders"] == Measure(0, None)
    assert a["intruder_matrices"] == Measure(2)
    assert a["min_max_cos"] == Measure(0.1, "l0.v_proj.weight") and b["min_max_cos"] == Measure(0.97, "l0.q_proj.weight")
    assert a["nonfinite"] == Measure(1) and b["nonfinite"] == Measure(0)  # the all-zero matrix is not non-finite
    assert a["structural"] == Measure(2) and a["structural_errors"] == Measure(1)  # the note does not count
    assert b["structural"] == Measure(0)


@pytest.mark.parametrize("expr,tripped", [
    ("matrix_intruders>=2", {"a": 2}), ("intruder_matrices>1", {"a": 2}), ("min_max_cos<0.5", {"a": 0.1}),
    ("nonfinite>0", {"a": 1}), ("structural>1", {"a": 2}), ("structural_errors>0", {"a": 1}),
    ("min_max_cos>0.95", {"b": 0.97}),
])
def test_spectrum_conditions(expr, tripped):
    assert _tripped(expr, spectrum_result(), SPECTRUM) == tripped


def test_min_max_cos_of_a_model_without_matrices_does_not_trip():
    r = SpectrumResult(base="b", k=2, epsilon=0.5, results=[TunedResult("empty")])
    gate = parse_gate("min_max_cos<1", SPECTRUM)
    (outcome,) = apply_gate(gate, spectrum=r)
    assert not outcome.tripped and outcome.conditions[0].models[0].value is None
    assert outcome.conditions[0].models[0].shown == "n/a"


# ---- safety fields ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("expr,tripped", [
    ("verdict>=SAFETY_DEGRADED", {"removed": 3, "degraded": 2}), ("verdict==SAFETY_REMOVED", {"removed": 3}),
    ("verdict>RETAINED", {"removed": 3, "degraded": 2}), ("verdict<=RETAINED", {"retained": 0}),
    ("refusal_drop>0.2", {"removed": 0.85, "degraded": 0.3}), ("refusal_rate<0.1", {"removed": 0.05}),
    ("over_refusal_rise>=0.1", {"degraded": 0.1}), ("over_refusal_rise<1", {"removed": 0.0, "degraded": 0.1}),
    ("capability_drop>0.1", {"removed": pytest.approx(0.2)}), ("capability_degraded==true", {"removed": 1.0}),
])
def test_safety_conditions(expr, tripped):
    assert _tripped(expr, safety_result(), SAFETY) == tripped


def test_safety_values_name_the_task_and_label():
    values = dict(safety_values(safety_result()))
    assert values["removed"]["capability_drop"] == Measure(pytest.approx(0.2), "t2")
    assert values["degraded"]["capability_drop"] == Measure(-0.02, "t1")  # a gain is a negative drop
    assert values["retained"]["capability_drop"].value is None and values["retained"]["over_refusal_rise"].value is None
    assert values["degraded"]["verdict"].shown == "SAFETY_DEGRADED" and "base" not in values


# ---- outcome, JSON, printing, exit codes ---------------------------------------------------------------------
def test_gate_block_round_trips_in_both_results():
    s = spectrum_result()
    apply_gate(parse_gate("intruders>0,nonfinite>0", SPECTRUM), spectrum=s)
    back = SpectrumResult.from_json(s.to_json())
    assert back.gate == s.gate and back.gate.tripped
    assert back.results[0].findings == s.results[0].findings and back.results[0].skipped == s.results[0].skipped
    obj = s.to_json()["gate"]
    assert obj["expression"] == "intruders>0,nonfinite>0" and obj["tripped"] is True
    assert obj["conditions"][0]["models"] == [
        {"model": "a", "value": 3, "shown": "3", "where": None, "tripped": True},
        {"model": "b", "value": 0, "shown": "0", "where": None, "tripped": False}]
    f = safety_result()
    apply_gate(parse_gate("verdict>=SAFETY_REMOVED", SAFETY), safety=f)
    back = SafetyResult.from_json(f.to_json())
    assert back.gate == f.gate and [m.model for m in back.gate.conditions[0].models if m.tripped] == ["removed"]
    assert SafetyResult.from_json(safety_result().to_json()).gate is None


def test_conditions_of_both_kinds_and_the_printout():
    gate = parse_gate("intruders>5,verdict>=SAFETY_DEGRADED", BOTH)
    outcomes = apply_gate(gate, spectrum=spectrum_result(), safety=safety_result())
    assert [o.tripped for o in outcomes] == [False, True]
    text = format_gate(gate, outcomes)
    assert text.splitlines()[0] == "Gate --fail-on 'intruders>5,verdict>=SAFETY_DEGRADED': TRIPPED (exit status 3)"
    assert "  passed   intruders>5  (intruders: a 3, b 0)" in text
    assert "TRIPPED  verdict>=SAFETY_DEGRADED  (verdict: removed SAFETY_REMOVED <-, degraded SAFETY_DEGRADED <-, " \
           "retained RETAINED)" in text
    with pytest.raises(InputError, match="has safety conditions, but there is no safety result"):
        apply_gate(gate, spectrum=spectrum_result())


def test_evaluate_other_kinds_with_their_own_values():
    """How a result kind outside this module (the screen) evaluates its fields: its own table and values."""
    from lora_audit.results.gate import GateField

    fields = {"risk": GateField("risk", "screen", "risk score")}
    out = evaluate(parse_gate("risk>0.5", fields), [("x", {"risk": Measure(0.7)}), ("y", {"risk": Measure(0.2)})],
                   "screen")
    assert out.tripped and [m.model for m in out.conditions[0].models if m.tripped] == ["x"]


@pytest.mark.parametrize("incomplete,tripped,code", [
    (False, False, EXIT_OK), (True, False, EXIT_INCOMPLETE), (False, True, EXIT_GATE), (True, True, EXIT_GATE)])
def test_exit_code_precedence(incomplete, tripped, code):
    assert exit_code(incomplete=incomplete, gate_tripped=tripped) == code
