"""lora-audit as a release gate, end to end on real adapters: every exit status (0 ok, 1 error,
2 usage, 3 gate tripped, 4 incomplete, 3 before 4) of spectrum, safety-eval and audit, the gate
block in the JSON, SARIF files a code-scanning UI reads, structural findings and the base-mismatch
warning in the output. Intruder counts are checked against the float64 reference."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from lora_audit.cli import cli
from lora_audit.results.spectrum import SpectrumResult
from tests.helpers import make_peft_adapter, make_tiny_llama
from tests.report.test_sarif import validate
from tests.spectral.reference import reference_audit

FAST = ["--device", "cpu", "--k", "4", "--no-cache", "--exact"]


@pytest.fixture(scope="module")
def ckpts(tiny_llama, tmp_path_factory):
    d = tmp_path_factory.mktemp("gate")
    ad = make_peft_adapter(tiny_llama, d / "adapter", r=2, seed=4, target_modules=["q_proj", "v_proj"])
    ref = reference_audit(tiny_llama, ad, k=4)
    return {"adapter": ad, "total": sum(c for _, c in ref.values()), "dir": d}


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_spectrum_gate_trips_and_passes(tiny_llama, ckpts, tmp_path):
    total = ckpts["total"]
    assert total > 0  # the adapter has intruders (B random, r = 2)
    js, sarif = tmp_path / "s.json", tmp_path / "s.sarif"
    r = run("spectrum", tiny_llama, ckpts["adapter"], *FAST, "--fail-on", "intruders>0", "--json", js, "--sarif", sarif)
    assert r.exit_code == 3, r.output
    assert "Gate --fail-on 'intruders>0': TRIPPED (exit status 3)" in r.output
    assert f"TRIPPED  intruders>0  (intruders: {ckpts['adapter']} {total})" in r.output
    gate = json.loads(js.read_text())["gate"]
    assert gate["tripped"] and gate["conditions"][0]["models"][0]["value"] == total
    log = json.loads(sarif.read_text())
    validate(log)
    results = log["runs"][0]["results"]
    assert {x["ruleId"] for x in results} == {"LA001"} and sum(x["properties"]["detail"]["intruders"] for x in results) \
        == total
    assert log["runs"][0]["invocations"][0]["exitCode"] == 3
    # a passing gate exits 0, and the same outputs are replaced (lora-audit wrote them)
    r = run("spectrum", tiny_llama, ckpts["adapter"], *FAST, "--fail-on", f"intruders>{total}", "--json", js,
            "--sarif", sarif)
    assert r.exit_code == 0, r.output
    assert f"passed   intruders>{total}" in r.output and json.loads(js.read_text())["gate"]["tripped"] is False
    assert json.loads(sarif.read_text())["runs"][0]["invocations"][0]["exitCode"] == 0


def test_a_second_fail_on_adds_conditions(tiny_llama, ckpts, tmp_path):
    """Issue 24 case 5: two --fail-on combine (any condition holds -> status 3); the second one used to
    replace the first, and the run passed with intruders."""
    js = tmp_path / "s.json"
    r = run("spectrum", tiny_llama, ckpts["adapter"], *FAST, "--fail-on", "intruders>0", "--fail-on", "structural>0",
            "--json", js)
    assert r.exit_code == 3, r.output
    gate = json.loads(js.read_text())["gate"]
    assert gate["expression"] == "intruders>0,structural>0"
    assert [(c["condition"], c["tripped"]) for c in gate["conditions"]] == [("intruders>0", True),
                                                                            ("structural>0", False)]
    r = run("spectrum", tiny_llama, ckpts["adapter"], *FAST, "--fail-on", "structural>0", "--fail-on",
            f"intruders>{ckpts['total']}")
    assert r.exit_code == 0, r.output
    r = run("spectrum", tiny_llama, ckpts["adapter"], *FAST, "--fail-on", "intruders>0", "--fail-on", "bad")
    assert r.exit_code == 2 and "'bad' is not a condition" in r.output


@pytest.mark.parametrize("expr,message", [
    ("intruders", "'intruders' is not a condition; expected FIELD OP VALUE[,FIELD OP VALUE...] with OP one of"),
    ("verdict>=SAFETY_DEGRADED", "this command's fields are: intruders (total intruder dimensions"),
    ("intruders>>0", "intruders takes a number, got '>0'; expected FIELD OP VALUE"),
])
def test_bad_expression_is_a_usage_error(tiny_llama, ckpts, tmp_path, expr, message):
    js = tmp_path / "s.json"
    r = run("spectrum", tiny_llama, ckpts["adapter"], "--fail-on", expr, "--json", js)
    assert r.exit_code == 2 and "Invalid value for '--fail-on'" in r.output and message in r.output, r.output
    assert not js.exists()


def test_error_is_status_1_and_writes_nothing(tiny_llama, tmp_path):
    sarif = tmp_path / "s.sarif"
    r = run("spectrum", tiny_llama, tmp_path / "nope", "--fail-on", "intruders>0", "--sarif", sarif)
    assert r.exit_code == 1 and "Error:" in r.output and not sarif.exists()


def test_incomplete_is_4_and_the_gate_comes_first(tiny_llama, ckpts, monkeypatch):
    monkeypatch.setattr(SpectrumResult, "incomplete", property(lambda self: True))
    assert run("spectrum", tiny_llama, ckpts["adapter"], *FAST).exit_code == 4
    assert run("spectrum", tiny_llama, ckpts["adapter"], *FAST, "--fail-on", "intruders>0").exit_code == 3
    assert run("spectrum", tiny_llama, ckpts["adapter"], *FAST, "--fail-on", "intruders<0").exit_code == 4


def test_json_to_stdout_keeps_the_gate_on_stderr(tiny_llama, ckpts):
    r = CliRunner().invoke(cli, ["spectrum", str(tiny_llama), str(ckpts["adapter"]), *FAST, "--fail-on",
                                 "intruders>0", "--json", "-"])
    assert r.exit_code == 3
    assert json.loads(r.stdout)["gate"]["tripped"] is True and "TRIPPED" in r.stderr


def test_structural_findings_gate_and_sarif(tiny_llama, ckpts, tmp_path):
    import shutil

    ad = tmp_path / "adapter"
    shutil.copytree(ckpts["adapter"], ad)
    (ad / "optimizer.pt").write_bytes(b"\x80\x04")
    sarif = tmp_path / "s.sarif"
    r = run("spectrum", tiny_llama, ad, *FAST, "--fail-on", "structural>0", "--sarif", sarif)
    assert r.exit_code == 3, r.output
    assert "Structural findings:" in r.output and "[warning] LA025 executable-file: optimizer.pt: a pickle file" in r.output
    log = json.loads(sarif.read_text())
    validate(log)
    (hit,) = [x for x in log["runs"][0]["results"] if x["ruleId"] == "LA025"]
    assert hit["locations"][0]["physicalLocation"]["artifactLocation"]["uri"].endswith("adapter/optimizer.pt")


def test_base_mismatch_warning(tiny_llama, ckpts, tmp_path):
    """The adapter names the tiny Llama; audited against another model of the same shapes, the output
    and the JSON name both and say their files differ."""
    other = make_tiny_llama(tmp_path / "other", seed=9, tokenizer=False)
    js = tmp_path / "s.json"
    r = run("spectrum", other, ckpts["adapter"], *FAST, "--json", js, "--fail-on", "structural>0")
    assert r.exit_code == 3, r.output
    line = next(x for x in r.output.splitlines() if "LA020" in x)
    assert str(tiny_llama) in line and str(other) in line and "their files differ" in line
    (f,) = json.loads(js.read_text())["results"][0]["findings"]
    assert f["rule"] == "LA020" and f["level"] == "warning" and f["detail"]["named_base"] == str(tiny_llama)


def test_real_subprocess_exit_status(tiny_llama, ckpts):
    """The console entry point (not CliRunner) passes the gate's status to the shell."""
    cmd = [sys.executable, "-m", "lora_audit", "spectrum", str(tiny_llama), str(ckpts["adapter"]), *FAST, "-q"]
    env = {**os.environ, "LORA_AUDIT_NO_PROGRESS": "1"}
    tripped = subprocess.run(cmd + ["--fail-on", "intruders>0"], capture_output=True, text=True, timeout=300, env=env)
    assert tripped.returncode == 3, tripped.stderr
    assert subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env).returncode == 0
    usage = subprocess.run(cmd + ["--fail-on", "nope"], capture_output=True, text=True, timeout=300, env=env)
    assert usage.returncode == 2 and "Invalid value for '--fail-on'" in usage.stderr


SAFETY_FAST = ["--limit", "2", "--max-new-tokens", "3", "--tasks", "none", "--batch-size", "2", "--benign", "none"]


def test_safety_eval_gate_and_sarif(tiny_llama, ckpts, tmp_path):
    js, sarif = tmp_path / "f.json", tmp_path / "f.sarif"
    args = ["safety-eval", tiny_llama, ckpts["adapter"], *SAFETY_FAST, "--json", js, "--sarif", sarif]
    r = run(*args, "--fail-on", "verdict>=RETAINED")  # every label is at least RETAINED
    assert r.exit_code == 3, r.output
    res = json.loads(js.read_text())
    (model,) = res["gate"]["conditions"][0]["models"]
    assert model["model"] == "adapter" and model["shown"] == res["verdict"]["adapter"]["label"] and model["tripped"]
    log = json.loads(sarif.read_text())
    validate(log)
    assert [x["ruleId"] for x in log["runs"][0]["results"] if x["ruleId"] == "LA010"] == (
        [] if res["verdict"]["adapter"]["label"] == "RETAINED" else ["LA010"])
    r = run(*args, "--fail-on", "refusal_rate>1")
    assert r.exit_code == 0, r.output
    assert run("safety-eval", tiny_llama, "--fail-on", "intruders>0").exit_code == 2


def test_audit_gate(tiny_llama, ckpts, tmp_path):
    out, sarif = tmp_path / "audit", tmp_path / "a.sarif"
    base_args = ["audit", tiny_llama, ckpts["adapter"], "--skip-safety", "--k", "4", "--no-cache", "--exact", "-q"]
    r = run(*base_args, "--out", out, "--fail-on", "verdict>=SAFETY_DEGRADED")
    assert r.exit_code == 2 and "--skip-safety skips both" in r.output and not out.exists()
    r = run(*base_args, "--out", out, "--fail-on", "intruders>0", "--sarif", sarif)
    assert r.exit_code == 3, r.output
    spec = json.loads((out / "spectrum.json").read_text())
    assert spec["gate"]["tripped"] and spec["results"][0]["total_intruders"] == ckpts["total"]
    validate(json.loads(sarif.read_text()))
    assert "TRIPPED  intruders>0" in r.output


def test_audit_gate_on_both_results(tiny_llama, ckpts, tmp_path):
    out = tmp_path / "audit"
    r = run("audit", tiny_llama, ckpts["adapter"], "--limit", "2", "--max-new-tokens", "3", "--tasks", "none",
            "--benign", "none", "--k", "4", "--no-cache", "--exact", "-q", "--out", out,
            "--fail-on", "intruders>1000,refusal_rate>=0")
    assert r.exit_code == 3, r.output
    spec, saf = (json.loads((out / n).read_text()) for n in ("spectrum.json", "safety.json"))
    assert [c["condition"] for c in spec["gate"]["conditions"]] == ["intruders>1000"] and not spec["gate"]["tripped"]
    assert [c["condition"] for c in saf["gate"]["conditions"]] == ["refusal_rate>=0"] and saf["gate"]["tripped"]
