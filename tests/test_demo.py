"""The quick demo end to end on the real default model (marked smollm2: ~3 minutes on 2 cores)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from lora_audit.cli import cli
from lora_audit.demo import findings, make_plan


def test_plan_is_seeded_and_keyed():
    quick, full = make_plan(quick=True), make_plan(quick=False)
    assert quick.key() == make_plan(quick=True).key() != full.key()
    assert make_plan(quick=True, seed=1).key() != quick.key()
    roles = [r.role for r in full.runs]
    assert roles.count("released") == 1 and "undo" in roles
    assert {r.name for r in full.runs} >= {"lora-r8", "rslora-r64", "full-ft", "lora-undo"}


def test_findings_report_both_outcomes():
    plan = make_plan(quick=False)
    spectrum = {"results": [{"tuned": "lora-r8", "total_intruders": 3}, {"tuned": "rslora-r64", "total_intruders": 0},
                            {"tuned": "full-ft", "total_intruders": 1}, {"tuned": "lora-undo", "total_intruders": 2}]}
    safety = {"models": {"base": {"refusal_rate": 0.9, "refusal_ci": [0.7, 0.97], "capability": {"t": 0.5}},
                         "lora-undo": {"refusal_rate": 0.95, "refusal_ci": [0.8, 0.99], "capability": {"t": 0.3}}}}
    got = {c["claim"].split(" (")[0]: c["holds"] for c in findings(spectrum, safety, plan.runs)}
    assert got == {"lora-r8 has more intruder dimensions than full-ft": True,
                   "rslora-r64 has more intruder dimensions than full-ft": False,
                   "lora-undo lowers the refusal rate": False,
                   "lora-undo keeps capability on t close": False}


@pytest.mark.smollm2
def test_quick_demo_end_to_end(smollm2_dir, tmp_path):
    out = tmp_path / "demo"
    r = CliRunner().invoke(cli, ["demo", "--quick", "--out", str(out), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "demo.json").read_text())
    spectrum = json.loads((out / "spectrum.json").read_text())
    safety = json.loads((out / "safety.json").read_text())
    names = [run["name"] for run in summary["settings"]["plan"]["runs"] if run["role"] != "released"]
    assert [t["tuned"] for t in spectrum["results"]] == names
    assert set(safety["models"]) == {"base", *names} and set(safety["verdict"]) == set(names)
    assert summary["intruders"] == {t["tuned"]: t["total_intruders"] for t in spectrum["results"]}
    for t in spectrum["results"]:  # every tuned model changed the released weights
        assert t["matrices"] and t["total_intruders"] == sum(m["intruders"] for m in t["matrices"])
    for rec in summary["training"].values():
        assert rec["final_loss"] < rec["loss_first"]  # every run trained
    assert summary["findings"] and all(isinstance(c["holds"], bool) for c in summary["findings"])
    html = (out / "index.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?https?://""", html)
    for name in names:
        assert name in html
    assert "holds" in r.output and "Report:" in r.output


def test_demo_pipeline_on_tiny_model(tiny_llama, tmp_path):
    """Every stage on a tiny random model (seconds): files, labels, reuse of trained models."""
    out = tmp_path / "demo"
    r = CliRunner().invoke(cli, ["demo", "--quick", "--base", str(tiny_llama), "--out", str(out), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "demo.json").read_text())
    spectrum = json.loads((out / "spectrum.json").read_text())
    names = [run["name"] for run in summary["settings"]["plan"]["runs"] if run["role"] != "released"]
    assert [t["tuned"] for t in spectrum["results"]] == names and summary["settings"]["base"] == str(tiny_llama)
    assert (out / "index.html").is_file() and (out / "tables").is_dir()
    assert not any(rec["reused"] for rec in summary["training"].values())
    # a second run finds the trained models in the plan-keyed cache and reuses them
    from lora_audit.demo import _train

    plan = make_plan(quick=True)
    work = Path(summary["settings"]["work_dir"])
    assert _train(plan.runs[1], work / "released", work / plan.runs[1].name, plan, "cpu")["reused"] is True


def test_demo_bad_base(tmp_path):
    r = CliRunner().invoke(cli, ["demo", "--base", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert r.exit_code != 0 and "not a model folder" in r.output and not (tmp_path / "o").exists()
