"""SARIF from every command that can gate, end to end on real adapters: safety-scan's verdicts and
screen's per-adapter findings (intruders, structural flags, adapters that could not be audited),
each file validated against the SARIF 2.1.0 schema and compared with the command's own JSON."""

from __future__ import annotations

import json
import shutil

from click.testing import CliRunner

from lora_audit.cli import cli
from tests.report.test_sarif import validate

from .conftest import SCAN_FAST, SPECTRUM_FAST


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_safety_scan_sarif(workspace):
    r = run("safety-scan", "base", "adapter", "adapter_a", *SCAN_FAST, "--json", "scan.json", "--sarif", "scan.sarif",
            "--fail-on", "risk>=0")
    assert r.exit_code == 3, r.output
    log = json.loads((workspace / "scan.sarif").read_text())
    validate(log)
    scan = json.loads((workspace / "scan.json").read_text())
    expected = {"PREDICTED_SAFETY_LOSS": "LA013", "UNKNOWN": "LA014"}
    want = sorted((name, expected[m["verdict"]]) for name, m in scan["models"].items() if m["verdict"] in expected)
    got = sorted((x["properties"]["tuned"], x["ruleId"]) for x in log["runs"][0]["results"])
    assert got == want and want  # at least one model is predicted to lose its safety training
    run_ = log["runs"][0]
    assert run_["invocations"][0]["exitCode"] == 3 and run_["properties"]["gate"][0]["expression"] == "risk>=0"


def test_screen_sarif(workspace):
    ups = workspace / "uploads"
    ups.mkdir()
    shutil.copytree(workspace / "adapter_a", ups / "a")
    shutil.copytree(workspace / "adapter", ups / "b")
    (ups / "b" / "optimizer.pt").write_bytes(b"\x80\x04")  # a pickle next to the weights: LA025
    (ups / "c").mkdir()
    (ups / "c" / "adapter_config.json").write_text("{}")  # no weights: cannot be audited
    r = run("screen", "base", "uploads", "--out", "s", "--workers", "0", *SPECTRUM_FAST, "--sarif", "s.sarif",
            "--json", "s.json")
    assert r.exit_code == 4, r.output  # one adapter failed
    assert "SARIF written to s.sarif" in r.output
    log = json.loads((workspace / "s.sarif").read_text())
    validate(log)
    summary = json.loads((workspace / "s.json").read_text())
    assert summary == json.loads((workspace / "s" / "summary.json").read_text())
    results = log["runs"][0]["results"]
    by_rule = {}
    for x in results:
        by_rule.setdefault(x["ruleId"], []).append(x)
    rows = {row["adapter"]: row for row in summary["adapters"]}
    # one LA002 per adapter with intruders, carrying the adapter's total
    la002 = {x["properties"]["tuned"]: x["properties"]["detail"]["intruders"] for x in by_rule.get("LA002", [])}
    assert la002 == {a: row["total_intruders"] for a, row in rows.items() if row["status"] == "ok"
                     and row["total_intruders"]}
    assert la002, "the adapters have intruders (random B)"
    (la025,) = by_rule["LA025"]
    assert la025["properties"]["tuned"].endswith("uploads/b")
    (la031,) = by_rule["LA031"]
    assert la031["properties"]["tuned"].endswith("uploads/c") and rows[la031["properties"]["tuned"]]["status"] == "failed"
    assert log["runs"][0]["invocations"][0]["exitCode"] == 4
    # SARIF's order is the ranking's
    order = [a for a in (x["properties"]["tuned"] for x in results)]
    ranked = [row["adapter"] for row in summary["adapters"]]
    assert sorted(dict.fromkeys(order), key=ranked.index) == list(dict.fromkeys(order))
