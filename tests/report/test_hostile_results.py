"""``lora-audit report`` on forged and impossible result JSON (issue 24, cases 15 and 20): values
outside what a field can take are refused when the file is parsed, with one error naming the file,
the field and the value, never rendered as a normal report; and whatever a mutated real result
holds, report ends in a report or in that clean error, never a traceback (hypothesis)."""

from __future__ import annotations

import copy
import json
import re

import pytest
from click.testing import CliRunner

from lora_audit.cli import cli
from lora_audit.errors import InputError
from lora_audit.results import load_result

from . import synth

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402


def _spectrum() -> dict:
    return copy.deepcopy(synth.spectrum(["a"], layers=1, modules=["q_proj"], k=3, seed=2))  # shares synth.SWEEP


def _safety() -> dict:
    return copy.deepcopy(synth.safety({"t": 0.2}, n=6))


def _at(obj: dict, path: list) -> tuple[dict | list, object]:
    for key in path[:-1]:
        obj = obj[key]
    return obj, path[-1]


M0 = ["results", 0, "matrices", 0]
# (case, which file, where, value, what the message must show)
IMPOSSIBLE = [
    ("cos 2.5", "spectrum", M0 + ["max_cos", 0], 2.5, r"matrices\[0\]\.max_cos\[0\]: expected a number in \[0, 1\.0001\], got 2\.5"),
    ("negative cos", "spectrum", M0 + ["cos_top_base", 0, 1], -0.5, r"cos_top_base\[0\]\[1\]: .* got -0\.5"),
    ("intruders -5", "spectrum", M0 + ["intruders"], -5, r"matrices\[0\]\.intruders: expected an integer >= 0, got -5"),
    ("total -5", "spectrum", ["results", 0, "total_intruders"], -5, r"results\[0\]\.total_intruders: .* got -5"),
    ("intruders above k", "spectrum", M0 + ["intruders"], 7, r"intruders: 7 of 3 examined directions"),
    ("shape 0x0", "spectrum", M0 + ["shape"], [0, 0], r"shape\[0\]: expected an integer >= 1, got 0"),
    ("shape of 3", "spectrum", M0 + ["shape"], [4, 4, 4], r"shape: expected \[rows, columns\], got 3 values"),
    ("epsilon 5", "spectrum", ["epsilon"], 5, r"epsilon: expected a number in \(0, 1\), got 5"),
    ("k 0", "spectrum", ["k"], 0, r"\bk: expected an integer >= 1, got 0"),
    ("sweep value 2", "spectrum", ["epsilon_sweep", 0], 2.0, r"epsilon_sweep\[0\]: .* got 2\.0"),
    ("negative singular value", "spectrum", M0 + ["tuned_singular_values"], [1e308, -1e308, 0],
     r"tuned_singular_values\[1\]: expected a number >= 0, got -1e\+308"),
    ("refusal rate 1.5", "safety", ["models", "base", "refusal_rate"], 1.5,
     r"models\['base'\]\.refusal_rate: expected a number in \[0, 1\], got 1\.5"),
    ("interval upside down", "safety", ["models", "t", "refusal_ci"], [0.9, 0.1],
     r"models\['t'\]\.refusal_ci: expected an interval \[low, high\] with low <= high, both in \[0, 1\], got \[0\.9, 0\.1\]"),
    ("interval of one", "safety", ["models", "t", "refusal_ci"], [0.5], r"refusal_ci: .* got 1 values"),
    ("refused more than asked", "safety", ["models", "t", "n_refused"], 60, r"n_refused: 60 of 6 prompts"),
    ("drop above 1", "safety", ["verdict", "t", "refusal_drop"], 1.7, r"verdict\['t'\]\.refusal_drop: .* got 1\.7"),
    # case 20: forged JSON
    ("unhashable schema", "spectrum", ["lora_audit", "schema"], ["spectrum"],
     r"lora_audit\.schema: expected a string, got a list"),
    ("400-digit epsilon", "spectrum", ["epsilon"], 10 ** 400, r"epsilon: expected a finite number, got an integer of 401 digits"),
    ("400-digit k", "spectrum", ["k"], 10 ** 400, None),  # an integer >= 1: allowed, must render or refuse cleanly
]


@pytest.mark.parametrize("case,kind,path,value,message", IMPOSSIBLE, ids=[c[0] for c in IMPOSSIBLE])
def test_report_refuses_impossible_values_naming_field_and_value(tmp_path, case, kind, path, value, message):
    obj = _spectrum() if kind == "spectrum" else _safety()
    where, key = _at(obj, path)
    where[key] = value
    f = tmp_path / f"{kind}.json"
    f.write_text(json.dumps(obj))
    out = tmp_path / "r.html"
    r = CliRunner().invoke(cli, ["report", str(f), "--out", str(out), "--no-csv"])
    assert "Traceback" not in r.output and (r.exception is None or isinstance(r.exception, SystemExit)), r.output
    if message is None:
        assert r.exit_code in (0, 1), r.output
        return
    assert r.exit_code == 1 and r.output.startswith("Error: ") and str(f) in r.output, r.output
    assert re.search(message, r.output), r.output
    assert len(r.output.strip().splitlines()) == 1 and not out.exists()


def test_huge_singular_values_still_render(tmp_path):
    """Finite but enormous values (1e308: their squares overflow) are legal and the figures cope."""
    obj = _spectrum()
    obj["results"][0]["matrices"][0]["tuned_singular_values"] = [1e308, 1e308, 0.0]
    obj["results"][0]["matrices"][0]["delta_norm"] = 1e308
    f = tmp_path / "s.json"
    f.write_text(json.dumps(obj))
    r = CliRunner().invoke(cli, ["report", str(f), "--out", str(tmp_path / "r.html"), "--no-csv"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "r.html").read_text(encoding="utf-8").count("<svg") >= 1


# ---- property tests: mutated real results ----------------------------------------------------------
LEAVES = st.one_of(st.none(), st.booleans(), st.integers(min_value=-10 ** 30, max_value=10 ** 30),
                   st.integers(min_value=-10 ** 400, max_value=10 ** 400),
                   st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8),
                   st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


def _paths(obj, prefix=()):
    """Every path to a value in a JSON object (the object itself excluded)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield prefix + (k,)
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield prefix + (i,)
            yield from _paths(v, prefix + (i,))


BASES = {"spectrum": _spectrum(), "safety": _safety()}
PATHS = {k: list(_paths(v)) for k, v in BASES.items()}


@st.composite
def mutated(draw):
    kind = draw(st.sampled_from(sorted(BASES)))
    obj = copy.deepcopy(BASES[kind])
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(PATHS[kind]))
        try:
            where, key = _at(obj, list(path))
            action = draw(st.sampled_from(["replace", "delete"]))
            if action == "delete" and isinstance(where, dict):
                del where[key]
            else:
                where[key] = draw(LEAVES)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed or replaced the way there
    return kind, obj


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_results_parse_to_a_result_or_a_clean_input_error(case):
    _, obj = case
    try:
        result = load_result(obj, "x.json")
    except InputError as e:
        assert str(e).startswith("x.json: ") and "\n" not in str(e)
        return
    json.dumps(result.to_json(), allow_nan=False)  # what parsed writes back as valid JSON


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(mutated())
def test_report_on_mutated_results_never_prints_a_traceback(tmp_path, case):
    kind, obj = case
    f = tmp_path / f"{kind}.json"
    f.write_text(json.dumps(obj))
    out = tmp_path / "r.html"
    r = CliRunner().invoke(cli, ["report", str(f), "--out", str(out), "--no-csv", "--overwrite"])
    assert r.exit_code in (0, 1), r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in r.output
    if r.exit_code == 1:
        assert r.output.startswith("Error: ")
