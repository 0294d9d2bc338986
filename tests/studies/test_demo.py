"""The quick demo end to end on the real default model (marked smollm2: ~3 minutes on 2 cores)."""

from __future__ import annotations

import json
import os
import re
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from lora_audit.cli import cli
from lora_audit.studies.demo import GRID, QUICK_GRID, make_plan, safety_findings, scan_findings, study_claims
from lora_audit.text import sci

from ..json_schemas import check
from lora_audit.results.study import StudyPoint


def test_plan_is_seeded_and_keyed():
    quick, full = make_plan(quick=True), make_plan(quick=False)
    assert quick.key() == make_plan(quick=True).key() != full.key()
    assert make_plan(quick=True, seed=1).key() != quick.key()
    roles = [r.role for r in full.runs]
    assert roles.count("released") == 1 and "undo" in roles
    # the grid as pre-registered: every series at every learning rate of its range, same data and steps
    study = [r for r in full.runs if r.role == "study"]
    assert [(r.series, r.lr) for r in study] == [(s.name, lr) for s in GRID for lr in s.lrs]
    assert len({(r.data, r.steps) for r in study}) == 1
    assert set(full.safety_models) <= {r.name for r in full.runs} and "lora-undo" in full.safety_models
    # quick: one LoRA point at the top of the grid and one full fine-tuning point
    q = [r for r in quick.runs if r.role == "study"]
    assert [(r.method, r.lr) for r in q] == [("lora", max(GRID[0].lrs)), ("full", max(GRID[2].lrs))]


def test_trained_models_are_cached_per_run():
    """Changing one grid point retrains that point only; changing the released model, everything."""
    plan = make_plan(quick=False)
    run = next(r for r in plan.runs if r.name == "lora-r8-lr1.5e-3")
    other = replace(plan, runs=tuple(replace(r, lr=2e-3) if r is run else r for r in plan.runs))
    changed = {r.name for r, o in zip(plan.runs, other.runs, strict=True) if plan.run_key(r) != other.run_key(o)}
    assert changed == {"lora-r8-lr1.5e-3"}
    rel = replace(plan, runs=tuple(replace(r, steps=r.steps + 1) if r.role == "released" else r for r in plan.runs))
    assert all(plan.run_key(r) != rel.run_key(o) for r, o in zip(plan.runs, rel.runs, strict=True))
    assert sci(5e-4) == "5e-4" and sci(0.002) == "2e-3" and run.name == f"lora-r8-lr{sci(run.lr)}"


def _points(counts: dict[str, list[int]], directions: int = 2100) -> list[StudyPoint]:
    return [StudyPoint(name=f"{s.name}@{lr}", series=s.name, lr=lr, steps=40, intruders=c, directions=directions)
            for s in GRID for lr, c in zip(s.lrs, counts[s.name], strict=True)]


def test_study_claims_report_both_outcomes():
    names = [s.name for s in GRID]
    paper_like = _points({names[0]: [0, 1, 13], names[1]: [0, 0, 5], names[2]: [0, 0, 2]})
    got = {c.claim: c.holds for c in study_claims(paper_like, GRID)}
    assert got == {"LoRA r=8: intruders grow with the learning rate": True,
                   "rsLoRA r=64: intruders grow with the learning rate": True,
                   "rsLoRA r=64 has fewer intruders than LoRA r=8 at the same learning rate": True,
                   "At the top of each method's usual range LoRA r=8 has more intruders than full fine-tuning": True,
                   "full fine-tuning has few or no intruders at its usual learning rates": True}
    # the other way round: a dip, rsLoRA above LoRA at one rate, full fine-tuning with many
    other = _points({names[0]: [0, 3, 1], names[1]: [0, 4, 0], names[2]: [0, 30, 25]})
    got = {c.claim: c.holds for c in study_claims(other, GRID)}
    assert set(got.values()) == {False} and len(got) == 5
    rule = next(c for c in study_claims(other, GRID) if "few or no" in c.claim)
    assert rule.measured == "lr 1e-5: 0 of 2100; lr 3e-5: 30 of 2100; lr 1e-4: 25 of 2100"
    # a point whose training loss ended above where it started marks the claims that use it
    pts = _points({names[0]: [0, 1, 13], names[1]: [0, 0, 300], names[2]: [0, 0, 2]})
    pts[5].loss_first, pts[5].final_loss = 1.9, 5.6
    notes = {c.claim: c.note for c in study_claims(pts, GRID)}
    assert notes["rsLoRA r=64: intruders grow with the learning rate"] == (
        "rsLoRA r=64 at lr 5e-3 did not converge (training loss 1.90 -> 5.60): its count is that of a diverged run")
    assert notes["rsLoRA r=64 has fewer intruders than LoRA r=8 at the same learning rate"]
    assert notes["LoRA r=8: intruders grow with the learning rate"] is None
    # --quick's grid makes only the claims it has points for
    quick = [StudyPoint("a", "LoRA r=8", 5e-3, 40, intruders=2, directions=2100),
             StudyPoint("b", "full fine-tuning", 1e-4, 40, intruders=0, directions=2100)]
    assert [c.holds for c in study_claims(quick, QUICK_GRID)] == [True, True]


def test_safety_findings_report_both_outcomes():
    plan = make_plan(quick=False)
    safety = {"models": {"base": {"refusal_rate": 0.9, "refusal_ci": [0.7, 0.97], "capability": {"t": 0.5}},
                         "lora-undo": {"refusal_rate": 0.95, "refusal_ci": [0.8, 0.99], "capability": {"t": 0.3}}}}
    got = {c["claim"].split(" (")[0]: c["holds"] for c in safety_findings(safety, plan.runs)}
    assert got == {"lora-undo lowers the refusal rate": False, "lora-undo keeps capability on t close": False}
    safety["models"]["lora-undo"].update(refusal_rate=0.1, capability={"t": 0.48})
    assert all(c["holds"] for c in safety_findings(safety, plan.runs))
    # the verdicts: the undo run apart from the benign runs, or not
    safety["verdict"] = {"lora-undo": {"label": "SAFETY_REMOVED"}, "lora-r8-lr1.5e-3": {"label": "RETAINED"},
                         "full-lr3e-5": {"label": "RETAINED"}}
    apart = next(c for c in safety_findings(safety, plan.runs) if "verdicts" in c["claim"])
    assert apart["holds"] and apart["measured"] == ("lora-undo SAFETY_REMOVED; lora-r8-lr1.5e-3 RETAINED; "
                                                    "full-lr3e-5 RETAINED")
    safety["verdict"]["full-lr3e-5"]["label"] = "SAFETY_DEGRADED"
    assert not next(c for c in safety_findings(safety, plan.runs) if "verdicts" in c["claim"])["holds"]


def test_scan_findings_rank_and_order_both_ways():
    """safety-scan's checks in the demo: the undo run ranked above every benign run, and the models
    safety-eval measured ordered as their drops; each decided from the numbers, with a note when a
    benign run lost as much refusal as the undo run."""
    plan = make_plan(quick=False)
    study = [r.name for r in plan.runs if r.role == "study"]
    risk = {n: 0.2 for n in study} | {"lora-undo": 0.9, study[1]: 0.5}
    scan = {"models": {n: {"risk": v} for n, v in risk.items()}}
    safety = {"verdict": {"lora-undo": {"refusal_drop": 0.8}, study[1]: {"refusal_drop": 0.3},
                          study[0]: {"refusal_drop": 0.05}}}
    got = scan_findings(scan, safety, plan.runs)
    assert [c["holds"] for c in got] == [True, True] and "note" not in got[0]
    assert got[0]["measured"] == f"lora-undo 0.90; highest benign {study[1]} 0.50"
    assert got[1]["measured"].endswith("(3 of 3 pairs agree)")
    # a benign run ranked above the undo run, which safety-eval measured losing as much refusal
    scan["models"][study[1]]["risk"] = 0.95
    safety["verdict"][study[1]]["refusal_drop"] = 0.75
    got = scan_findings(scan, safety, plan.runs)
    assert got[0]["holds"] is False and study[1] in got[0]["note"] and "removed" in got[0]["note"]
    # pairs closer than DROP_CLOSE do not count; the rest: undo vs study[1] (drop 0.8 vs 0.75) left out
    assert got[1]["holds"] is True and got[1]["measured"].endswith("(2 of 2 pairs agree)")
    scan["models"][study[0]]["risk"] = 0.99
    assert scan_findings(scan, safety, plan.runs)[1]["holds"] is False
    # without a safety result: only the ranking; without a scan result: nothing
    assert len(scan_findings(scan, None, plan.runs)) == 1 and scan_findings({}, safety, plan.runs) == []


@pytest.mark.smollm2
def test_quick_demo_end_to_end(smollm2_dir, tmp_path):
    out = tmp_path / "demo"
    r = CliRunner().invoke(cli, ["demo", "--quick", "--out", str(out), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "demo.json").read_text())
    spectrum = json.loads((out / "spectrum.json").read_text())
    safety = json.loads((out / "safety.json").read_text())
    names = [run["name"] for run in summary["lora_audit"]["settings"]["plan"]["runs"] if run["role"] != "released"]
    assert [t["tuned"] for t in spectrum["results"]] == names
    evaluated = summary["lora_audit"]["settings"]["plan"]["safety_models"]
    assert set(safety["models"]) == {"base", *evaluated} and set(safety["verdict"]) == set(evaluated)
    assert summary["intruders"] == {t["tuned"]: t["total_intruders"] for t in spectrum["results"]}
    # the study: one LoRA point and one full fine-tuning point, their counts as in spectrum.json
    study = json.loads((out / "study.json").read_text())
    assert {p["name"]: p["intruders"] for p in study["points"]} == {
        n: summary["intruders"][n] for n in names if n != "lora-undo"}
    assert summary["study"]["claims"] == study["claims"] and study["claims"]
    for t in spectrum["results"]:  # every tuned model changed the released weights
        assert t["matrices"] and t["total_intruders"] == sum(m["intruders"] for m in t["matrices"])
    for rec in summary["training"].values():
        assert rec["final_loss"] < rec["loss_first"]  # every run trained
    assert summary["findings"] and all(isinstance(c["holds"], bool) for c in summary["findings"])
    # safety-scan runs on every tuned model with the safety side and the demo's ranking check is made
    # from it; or, when it cannot read the released model (the quick demo's 8 steps of safety tuning
    # may leave no first-token refusal to find a direction from), demo.json and the output say why
    if (out / "scan.json").exists():
        scan = json.loads((out / "scan.json").read_text())
        assert set(scan["models"]) == set(names) and all(0 <= m["risk"] <= 1 for m in scan["models"].values())
        ranking = next(c for c in summary["findings"] if c["claim"].startswith("safety-scan ranks lora-undo"))
        benign = max(scan["models"][n]["risk"] for n in names if n != "lora-undo")
        assert ranking["holds"] == (scan["models"]["lora-undo"]["risk"] > benign)
    else:
        assert summary["scan_note"].startswith("safety-scan skipped: ") and "safety-scan skipped" in r.output
        assert not any(c["claim"].startswith("safety-scan") for c in summary["findings"])
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
    names = [run["name"] for run in summary["lora_audit"]["settings"]["plan"]["runs"] if run["role"] != "released"]
    assert [t["tuned"] for t in spectrum["results"]] == names and summary["lora_audit"]["settings"]["base"] == tiny_llama.name
    assert (out / "index.html").is_file() and (out / "tables").is_dir()
    # models are named by their run names: no machine path in any file of the report folder
    from lora_audit.checkpoints.default_model import cache_root

    for f in [p for p in out.rglob("*") if p.is_file()]:
        text = f.read_text(encoding="utf-8")
        assert str(cache_root()) not in text and str(tiny_llama) not in text, f
    inputs = json.loads((out / "safety.json").read_text())["inputs"].values()
    assert {i["source"] for i in inputs} >= {"released", "lora-undo"}
    assert not any(rec["reused"] for rec in summary["training"].values())
    assert set(summary["calibration"]) == set(names) and "study_points.csv" in os.listdir(out / "tables")
    html = (out / "index.html").read_text()
    assert 'id="study"' in html and "versus learning rate" in html
    # every JSON the demo wrote validates against its shipped schema (docs/schema/)
    for name, kind in (("demo.json", "demo"), ("study.json", "study"), ("spectrum.json", "spectrum"),
                       ("safety.json", "safety"), ("scan.json", "safety-scan")):
        if (out / name).exists():
            check(json.loads((out / name).read_text()), kind)
    work = Path(summary["lora_audit"]["settings"]["work_dir"].replace("<lora-audit cache>", str(cache_root())))
    trained = sorted(work.glob("*/training.json"))
    assert trained
    for f in trained:
        check(json.loads(f.read_text()), "training")
    # a second run finds the trained models in the run-keyed cache and reuses them
    r = CliRunner().invoke(cli, ["demo", "--quick", "--base", str(tiny_llama), "--out", str(out), "--device", "cpu",
                                 "--overwrite"])
    assert r.exit_code == 0, r.output
    assert all(rec["reused"] for rec in json.loads((out / "demo.json").read_text())["training"].values())


def test_demo_bad_base(tmp_path):
    r = CliRunner().invoke(cli, ["demo", "--base", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert r.exit_code != 0 and "not a model folder" in r.output and not (tmp_path / "o").exists()
