"""Property tests of the --fail-on parser (issue 24): any string ends in a Gate or a clean error (a
ValueError here, a usage error with exit status 2 on the command line), never a traceback; what it
accepts round-trips; several --fail-on combine into one gate that trips when any condition holds."""

from __future__ import annotations

import math

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_audit.cli import cli
from lora_audit.results.gate import OPS, Gate, all_fields, evaluate, Measure, parse_gate, parse_gates

FIELDS = all_fields()
NAMES = sorted(FIELDS)

# Strings made of the grammar's own pieces (so many parse), and arbitrary text (so many do not).
piece = st.sampled_from([*NAMES, *OPS, ",", " ", "0", "1", "-1", "0.5", "1e309", "nan", "inf", "true", "FALSE",
                         "SAFETY_DEGRADED", "retained", "=", ">>", "\x00", "\u202e", "\n", "é", "１", "1_0"])
expressions = st.one_of(st.lists(piece, max_size=12).map("".join), st.text(max_size=60))


def _parses_or_value_error(text: str) -> Gate | None:
    try:
        gate = parse_gate(text, FIELDS)
    except ValueError as e:
        assert str(e)  # says what is wrong
        return None
    assert isinstance(gate, Gate) and gate.conditions
    return gate


@settings(max_examples=400, deadline=None)
@given(expressions)
def test_any_string_is_a_gate_or_a_value_error(text):
    gate = _parses_or_value_error(text)
    if gate is not None:
        for c in gate.conditions:
            assert c.field.name in FIELDS and c.op in OPS and math.isfinite(c.threshold)
        again = parse_gate(gate.expression, FIELDS)  # the normalised form parses to the same conditions
        assert again.conditions == gate.conditions


condition = st.builds(
    lambda name, op, num, pick: (name, op, (sorted(FIELDS[name].labels)[pick % len(FIELDS[name].labels)]
                                            if FIELDS[name].labels else repr(num))),
    st.sampled_from(NAMES), st.sampled_from(list(OPS)),
    st.floats(allow_nan=False, allow_infinity=False, width=32), st.integers(0, 10))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(condition, min_size=1, max_size=4), min_size=1, max_size=4))
def test_several_fail_on_are_the_union_of_their_conditions(groups):
    texts = [",".join(f"{n}{op}{v}" for n, op, v in g) for g in groups]
    gate = parse_gates(texts, FIELDS)
    expected = list(dict.fromkeys(c.text for t in texts for c in parse_gate(t, FIELDS).conditions))
    assert [c.text for c in gate.conditions] == expected
    # the combined gate trips exactly when one of the separate gates would
    values = [("m", {name: Measure(0.0) for name in NAMES})]
    for kind in {c.field.kind for c in gate.conditions}:
        separate = any(evaluate(parse_gate(t, FIELDS), values, kind).tripped for t in texts)
        assert evaluate(gate, values, kind).tripped == separate


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(expressions)
def test_on_the_command_line_a_bad_expression_is_a_usage_error(tmp_path, text):
    """Through the real option: exit 2 with 'Invalid value for '--fail-on'' for what does not parse;
    what parses goes on to the (missing) inputs and fails there with exit 1. Never a traceback."""
    r = CliRunner().invoke(cli, ["spectrum", str(tmp_path / "nope"), str(tmp_path / "nope2"), "--fail-on", text])
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    try:
        parse_gate(text, {n: f for n, f in FIELDS.items() if f.kind == "spectrum"})
        assert r.exit_code == 1, r.output
    except ValueError:
        assert r.exit_code == 2 and "Invalid value for '--fail-on'" in r.output, r.output


@pytest.mark.parametrize("texts", [[], [""], ["intruders>0", ""]])
def test_empty_fail_on_is_an_error(texts):
    with pytest.raises(ValueError):
        parse_gates(texts, FIELDS)
