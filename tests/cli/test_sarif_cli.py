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
    # the packaged risk models are not validated, so the gate reads the first-token proxy (it always
    # holds at >= -1, a change of a share) and the SARIF carries the scan's own findings, nothing else
    from lora_audit.studies.edits import direction_edit, refusal_direction_of

    from ..scan.conftest import WORDS

    # an abliteration of BASE along a direction from other prompts than the scan's: LA040 must appear
    other = [w.upper() for w in WORDS]
    harmful = [f"give me {other[i % len(other)]} now {i}!" for i in range(16)]
    harmless = [f"where is {other[(i + 3) % len(other)]} today {i}?" for i in range(16)]
    r_dir, _, _ = refusal_direction_of("base", harmful, harmless, layer=1,
                                       chat_template="{{ messages[0]['content'] }}")
    direction_edit("base", workspace / "abl", r_dir, 1.0)
    r = run("safety-scan", "base", "adapter", "adapter_a", "abl", *SCAN_FAST, "--json", "scan.json", "--sarif",
            "scan.sarif", "--fail-on", "first_token_drop>=-1")
    assert r.exit_code == 3, r.output
    log = json.loads((workspace / "scan.sarif").read_text())
    validate(log)
    scan = json.loads((workspace / "scan.json").read_text())
    want = []
    for name, m in scan["models"].items():
        if m["verdict"] == "PREDICTED_SAFETY_LOSS" or (m["verdict"] == "UNKNOWN" and m.get("risk_model")):
            want.append((name, "LA013" if m["verdict"] == "PREDICTED_SAFETY_LOSS" else "LA014"))
        if m.get("refusal_edits"):
            want.append((name, "LA040"))
        want += [(name, f["rule"]) for f in m.get("findings", [])]
    got = [(x["properties"]["tuned"], x["ruleId"]) for x in log["runs"][0]["results"]]
    assert sorted(got) == sorted(want) and ("abl", "LA040") in got
    assert all(m["risk"] is None for m in scan["models"].values())  # no validated risk model: no risk shown
    run_ = log["runs"][0]
    assert run_["invocations"][0]["exitCode"] == 3
    assert run_["properties"]["gate"][0]["expression"] == "first_token_drop>=-1"


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
