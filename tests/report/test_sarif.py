"""SARIF 2.1.0 output: every kind of finding (intruders, verdicts and their flags, structural
findings, matrices left out) validated against the SARIF 2.1.0 schema (the subset lora-audit
writes, tests/data/sarif-2.1.0-subset.schema.json, keywords copied from the OASIS schema), with
its rule ids, levels, files and logical locations checked one by one."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from lora_audit.io import written_by_lora_audit
from lora_audit.report.sarif import artifact_uri, sarif_log, weights_file, write_sarif
from lora_audit.results.findings import RULES, Finding
from lora_audit.results.gate import apply_gate, fields_for, parse_gate
from tests.results.synth import safety_result, spectrum_result

SCHEMA = json.loads((Path(__file__).parent.parent / "data" / "sarif-2.1.0-subset.schema.json").read_text())


def validate(log):
    jsonschema.Draft4Validator.check_schema(SCHEMA)
    v = jsonschema.Draft4Validator(SCHEMA, format_checker=jsonschema.Draft4Validator.FORMAT_CHECKER)
    errors = sorted(v.iter_errors(log), key=lambda e: list(e.path))
    assert not errors, [f"{list(e.path)}: {e.message}" for e in errors]


@pytest.fixture
def log():
    spectrum, safety = spectrum_result(), safety_result()
    apply_gate(parse_gate("intruders>0,verdict>=SAFETY_DEGRADED", fields_for("spectrum", "safety")), spectrum=spectrum,
               safety=safety)
    return sarif_log(spectrum=spectrum, safety=safety, exit_code=3)


def test_valid_sarif_with_every_finding_kind(log):
    validate(log)
    run = log["runs"][0]
    assert log["version"] == "2.1.0" and run["tool"]["driver"]["name"] == "lora-audit"
    rules = run["tool"]["driver"]["rules"]
    assert [r["id"] for r in rules] == list(RULES)
    got = [(r["ruleId"], r["level"], r["properties"]["tuned"]) for r in run["results"]]
    assert got == [
        ("LA001", "warning", "a"), ("LA001", "warning", "a"),  # l0.q_proj (2), l0.v_proj (1); l1.q_proj has none
        ("LA021", "warning", "a"), ("LA028", "note", "a"), ("LA023", "error", "a"),  # structural, as found
        ("LA030", "warning", "a"),  # the NaN matrix; the all-zero one is not left unmeasured
        ("LA010", "error", "removed"), ("LA011", "warning", "removed"), ("LA010", "warning", "degraded")]
    for r in run["results"]:
        assert rules[r["ruleIndex"]]["id"] == r["ruleId"]
    first = run["results"][0]
    assert first["message"]["text"].startswith("2 intruder dimensions in l0.q_proj.weight (lowest max|cos| 0.200")
    assert first["locations"][0]["logicalLocations"] == [
        {"fullyQualifiedName": "l0.q_proj.weight", "name": "q_proj", "kind": "variable"}]
    assert first["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] == "a"  # no such folder: as given
    assert run["results"][2]["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] == \
        "a/adapter_model.safetensors"
    assert "SAFETY_REMOVED" in run["results"][6]["message"]["text"]
    assert run["invocations"] == [{"executionSuccessful": True, "exitCode": 3}]
    assert [g["expression"] for g in run["properties"]["gate"]] == ["intruders>0,verdict>=SAFETY_DEGRADED"] * 2
    fingerprints = [r["partialFingerprints"]["loraAuditFinding/v1"] for r in run["results"]]
    assert len(set(fingerprints)) == len(fingerprints)


def test_fingerprints_are_stable_across_runs(log):
    again = sarif_log(spectrum=spectrum_result(), safety=safety_result())
    assert [r["partialFingerprints"] for r in again["runs"][0]["results"]] == \
        [r["partialFingerprints"] for r in log["runs"][0]["results"]]


@pytest.mark.parametrize("broken", [
    lambda lg: lg["runs"][0]["results"][0].update(level="warn"),
    lambda lg: lg["runs"][0]["results"][0].pop("message"),
    lambda lg: lg["runs"][0]["results"][0]["locations"][0].update(physicalLocation={}),
    lambda lg: lg.update(version="2.0.0"),
    lambda lg: lg["runs"][0]["tool"]["driver"].pop("name"),
    lambda lg: lg["runs"][0]["results"][0].update(ruleIndex=-2),
])
def test_the_schema_rejects_broken_logs(log, broken):
    broken(log)
    with pytest.raises(AssertionError):
        validate(log)


def test_empty_results_and_written_file(tmp_path):
    validate(sarif_log())
    path = write_sarif(tmp_path / "x.sarif", sarif_log(spectrum=spectrum_result()))
    validate(json.loads(path.read_text()))
    assert written_by_lora_audit(path)  # a later run may replace it


def test_files_and_uris(tmp_path, monkeypatch):
    (tmp_path / "ad").mkdir()
    (tmp_path / "ad" / "adapter_model.safetensors").write_bytes(b"")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "model.safetensors.index.json").write_text("{}")
    assert weights_file(str(tmp_path / "ad")) == str(tmp_path / "ad" / "adapter_model.safetensors")
    assert weights_file(str(tmp_path / "full")) == str(tmp_path / "full" / "model.safetensors.index.json")
    assert weights_file("owner/model") == "owner/model"
    monkeypatch.chdir(tmp_path)
    assert artifact_uri(str(tmp_path / "ad" / "adapter_model.safetensors")) == "ad/adapter_model.safetensors"
    assert artifact_uri("./my adapter/x#1.safetensors") == "my%20adapter/x%231.safetensors"
    assert artifact_uri("/elsewhere/a.safetensors") == "file:///elsewhere/a.safetensors"


# ---- safety-scan and screen findings -----------------------------------------------------------------
def _scan_result():
    from lora_audit.results.scan import ModelScan, SafetyScanResult

    return SafetyScanResult(base="base", models={
        "loss": ModelScan(risk=0.9, verdict="PREDICTED_SAFETY_LOSS", verdict_line="risk 0.90 >= 0.50: predicted loss"),
        "fine": ModelScan(risk=0.1, verdict="NO_PREDICTED_SAFETY_LOSS"),
        "unknown": ModelScan(risk=None, verdict="UNKNOWN", warnings=["no forward pass"]),
    })


def test_scan_verdicts_become_findings():
    log = sarif_log(scan=_scan_result(), exit_code=0)
    validate(log)
    got = [(r["ruleId"], r["level"], r["properties"]["tuned"]) for r in log["runs"][0]["results"]]
    assert got == [("LA013", "warning", "loss"), ("LA014", "note", "unknown")]
    assert log["runs"][0]["results"][0]["message"]["text"] == "risk 0.90 >= 0.50: predicted loss"
    assert log["runs"][0]["results"][1]["message"]["text"] == "UNKNOWN: no forward pass"


def test_a_new_scan_rule_is_one_line(monkeypatch):
    """A finding a scan records under a new rule reaches SARIF (rule list and results) and the scan JSON
    with no change but the rule's line in RULES."""
    from lora_audit.results import findings as F
    from lora_audit.results.scan import SafetyScanResult

    monkeypatch.setitem(F.RULES, "LA019", F.Rule("LA019", "refusal-edit", "An edit.", "Why it matters.", "warning"))
    result = _scan_result()
    result.models["fine"].findings.append(Finding("LA019", "warning", "edited the refusal direction", "fine/x",
                                                  {"modules": ["model.layers.1.mlp.down_proj.weight"]}))
    log = sarif_log(scan=result)
    validate(log)
    run = log["runs"][0]
    assert "LA019" in [r["id"] for r in run["tool"]["driver"]["rules"]]
    (hit,) = [r for r in run["results"] if r["ruleId"] == "LA019"]
    assert run["tool"]["driver"]["rules"][hit["ruleIndex"]]["id"] == "LA019"
    assert hit["locations"][0]["logicalLocations"][0]["name"] == "down_proj"
    data = json.loads(json.dumps(result.to_json()))
    data["lora_audit"] = {"schema": "safety-scan", "schema_version": 1}
    back = SafetyScanResult.from_json(data)
    assert back.models["fine"].findings == result.models["fine"].findings


def test_screen_findings_one_per_adapter():
    from lora_audit.report.sarif import screen_findings, tuned_findings
    from lora_audit.results.screen import ScreenResult, ScreenRow

    spec = spectrum_result()
    a = spec.results[0]
    found = {"a": tuned_findings(a, epsilon=0.5, k=3, per_matrix=False),
             "b": tuned_findings(spec.results[1], epsilon=0.5, k=3, per_matrix=False)}
    rows = [ScreenRow("a", "a", "ok", total_intruders=3), ScreenRow("b", "b", "ok", total_intruders=0),
            ScreenRow("c", "c", "failed", error="not a LoRA adapter", record="records/0:3")]
    log = sarif_log(screen=ScreenResult(base="base", k=3, epsilon=0.5, adapters=rows),
                    extra=screen_findings(ScreenResult(base="base", k=3, epsilon=0.5, adapters=rows), found))
    validate(log)
    got = [(r["ruleId"], r["properties"]["tuned"]) for r in log["runs"][0]["results"]]
    assert got == [("LA002", "a"), ("LA021", "a"), ("LA028", "a"), ("LA023", "a"), ("LA030", "a"), ("LA031", "c")]
    first = log["runs"][0]["results"][0]
    assert first["message"]["text"].startswith("3 intruder dimensions in 2 of 3 matrices, most in l0.q_proj.weight (2)")
    assert [x["fullyQualifiedName"] for x in first["locations"][0]["logicalLocations"]] == [
        "l0.q_proj.weight", "l0.v_proj.weight"]
    assert first["properties"]["detail"]["intruders"] == 3 == sum(m.intruders for m in a.matrices)
    assert "not a LoRA adapter" in log["runs"][0]["results"][-1]["message"]["text"]
