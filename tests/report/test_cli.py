"""``lora-audit report`` and ``lora-audit audit`` through click's CliRunner."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner

from lora_audit.cli import cli
from lora_audit.io import MARKER

from ..helpers import make_peft_adapter
from . import synth


def run(args, **kw):
    return CliRunner().invoke(cli, args, catch_exceptions=False, **kw)


@pytest.fixture()
def results(tmp_path):
    s = tmp_path / "spectrum.json"
    s.write_text(json.dumps(synth.spectrum(["lora-a"], seed=7)))
    f = tmp_path / "safety.json"
    f.write_text(json.dumps(synth.safety({"lora-a": 0.0})))
    return s, f


def test_report_html_default_out_and_csv(results, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = run(["report", str(results[0]), str(results[1]), "--title", "Run <1>"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "reports" / "spectrum.html"
    assert f"Report written to {out.relative_to(tmp_path)}" in r.output
    html = out.read_text()
    assert "<title>Run &lt;1&gt;</title>" in html
    assert (tmp_path / "reports" / "spectrum-tables" / "summary.csv").is_file()
    assert not [p for p in (tmp_path / "reports").iterdir() if p.name.startswith(".")]  # no temp files left


def test_report_md_and_csv_dir_and_no_csv(results, tmp_path):
    r = run(["report", str(results[0]), "--format", "md", "--out", str(tmp_path / "a.md"),
             "--csv-dir", str(tmp_path / "tables")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "a.md").read_text().startswith("# lora-audit report")
    assert (tmp_path / "tables" / "intruders_by_module.csv").is_file()
    r = run(["report", str(results[0]), "--out", str(tmp_path / "c.md"), "--no-csv"])  # format from the suffix
    assert r.exit_code == 0, r.output
    assert (tmp_path / "c.md").read_text().startswith("# lora-audit report")
    r = run(["report", str(results[1]), "--out", str(tmp_path / "b.html"), "--no-csv"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "b.html").is_file() and not (tmp_path / "b-tables").exists()


def test_report_bad_inputs(results, tmp_path):
    out = tmp_path / "x.html"
    r = run(["report", str(tmp_path / "missing.json"), "--out", str(out)])
    assert r.exit_code == 1 and "Error:" in r.output and "missing.json: no such file" in r.output
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"lora_audit": {"schema": "training"}, "x": 1}))
    r = run(["report", str(results[0]), str(wrong), "--out", str(out)])
    assert r.exit_code == 1 and "'training' result" in r.output and "Traceback" not in r.output
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    r = run(["report", str(garbage), "--out", str(out)])
    assert r.exit_code == 1 and "not valid JSON" in r.output
    other = tmp_path / "other.json"
    other.write_text(json.dumps([1, 2]))
    r = run(["report", str(other), "--out", str(out)])
    assert r.exit_code == 1 and "JSON object" in r.output
    r = run(["report", str(results[0]), "--out", str(tmp_path)])
    assert r.exit_code == 2 and "is a folder" in r.output
    r = run(["report", str(results[0]), "--format", "pdf"])
    assert r.exit_code == 2
    r = run(["report"])
    assert r.exit_code == 2
    assert not out.exists() and not (tmp_path / "x-tables").exists()


def test_audit_spectrum_only_end_to_end(tiny_llama, tmp_path):
    ad = make_peft_adapter(tiny_llama, tmp_path / "ad<1>", r=2, target_modules=["q_proj", "v_proj"])
    out = tmp_path / "audit"
    r = run(["audit", str(tiny_llama), str(ad), "--skip-safety", "--k", "4", "--no-cache", "--exact", "-q", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir() if p.name != MARKER) == ["index.html", "spectrum.json", "tables"]
    spec = json.loads((out / "spectrum.json").read_text())
    assert spec["k"] == 4 and spec["lora_audit"]["settings"]["inputs"][str(ad)]["fingerprint"].startswith("sha256:")
    html = (out / "index.html").read_text()
    total = spec["results"][0]["total_intruders"]
    assert re.search(rf"ad&lt;1&gt;</span>:\s*<span class=\"parts\">{total} intruder dimension", html)
    assert 'id="safety"' not in html
    # 2 layers x {q_proj, v_proj}: the audit covers exactly the adapted matrices
    assert spec["results"][0]["matrices_audited"] == 4
    # a second run replaces the folder (with --overwrite only); an unrelated non-empty folder is refused
    args = ["audit", str(tiny_llama), str(ad), "--skip-safety", "--k", "4", "--no-cache", "--exact", "-q", "--out", str(out)]
    r = run(args)
    assert r.exit_code == 1 and "--overwrite" in r.output
    r = run(args + ["--overwrite"])
    assert r.exit_code == 0, r.output
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    r = run(["audit", str(tiny_llama), str(ad), "--skip-safety", "--out", str(busy), "--overwrite"])
    assert r.exit_code == 1 and "did not write" in r.output and (busy / "notes.txt").read_text() == "mine"


def test_audit_bad_inputs(tiny_llama, tmp_path):
    r = run(["audit", str(tiny_llama), str(tmp_path / "nope"), "--skip-safety", "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "Error:" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "o").exists()


def test_audit_with_safety_end_to_end(tiny_llama, tmp_path):
    ad = make_peft_adapter(tiny_llama, tmp_path / "ad", r=2, target_modules=["q_proj"])
    out = tmp_path / "audit"
    r = run(["audit", str(tiny_llama), str(ad), "--limit", "2", "--max-new-tokens", "4", "--tasks", "none",
             "--k", "4", "--no-cache", "--exact", "-q", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir() if p.name != MARKER) == ["index.html", "safety.json", "spectrum.json",
                                                                        "tables"]
    assert "safety-scan skipped: BASE refuses" in r.output  # a random model has no refusal direction
    saf = json.loads((out / "safety.json").read_text())
    html = (out / "index.html").read_text()
    assert 'id="safety"' in html and 'id="spectrum"' in html
    # the response texts of the tiny model appear (escaped) in the collapsed samples
    from html import escape

    from lora_audit.report import clean

    for rec in saf["models"]["ad"]["responses"]:
        assert escape(clean(rec["response"]), quote=False) in html
    assert saf["verdict"]["ad"]["label"] in html
