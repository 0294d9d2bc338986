"""``lora-audit screen`` on the command line: options, exit codes, what it prints."""

from __future__ import annotations

import sys

import pytest
from click.testing import CliRunner

from lora_audit.cli import cli


def _run(*args):
    return CliRunner().invoke(cli, ["screen", *map(str, args)])


@pytest.mark.parametrize("args, message", [
    ([], "give ADAPTER_DIR... or --manifest FILE"),
    (["a", "--resume", "--overwrite"], "--resume continues the screen in --out and --overwrite starts it again"),
    (["a", "--retry-failed"], "--retry-failed needs --resume"),
    (["a", "--address", "auto"], "--address and --spectra are for --engine ray"),
    (["a", "--spectra", "cache"], "--address and --spectra are for --engine ray"),
])
def test_usage_errors(tmp_path, args, message):
    res = _run("base", *args, "--out", tmp_path / "s")
    assert res.exit_code == 2 and message in res.output
    assert not (tmp_path / "s").exists()


def test_missing_ray_is_a_clear_error(screen_set, tmp_path, monkeypatch):
    base, ads = screen_set
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    res = _run(base, ads["tiny1"], "--out", tmp_path / "s", "--engine", "ray")
    assert res.exit_code == 1
    assert "--engine ray needs Ray, which is not installed: pip install 'lora-auditor[ray]'" in res.output
    assert not (tmp_path / "s").exists()


def test_screen_prints_the_ranking_and_failures_and_resumes(screen_set, tmp_path):
    base, ads = screen_set
    manifest = tmp_path / "list.txt"
    manifest.write_text(f"{ads['tiny1']}\tgood \x1b[31mone\n{ads['corrupt']}\tbroken\n")
    out = tmp_path / "s"
    res = _run(base, "--manifest", manifest, "--out", out, "--workers", "0", "--detail", "0")
    assert res.exit_code == 4, res.output
    assert "Screened 2 adapters of" in res.output and "1 ok, 1 failed (2 audited now, 0 from the store" in res.output
    assert "good \\x1b[31mone" in res.output and "\x1b" not in res.output
    assert "Failed (1):\n  broken: " in res.output and "not a readable safetensors file" in res.output
    assert f"report: {out / 'report.html'}" in res.output

    res = _run(base, "--manifest", manifest, "--out", out, "--workers", "0")
    assert res.exit_code == 1 and "holds an earlier screen; pass --resume" in res.output
    res = _run(base, "--manifest", manifest, "--out", out, "--workers", "0", "--resume", "--k", "5")
    assert res.exit_code == 1 and "k: 10 then, 5 now" in res.output
    res = _run(base, "--manifest", manifest, "--out", out, "--workers", "0", "--resume", "-q")
    assert res.exit_code == 4 and "(0 audited now, 2 from the store" in res.output


def test_help_lists_the_options():
    res = CliRunner().invoke(cli, ["screen", "--help"])
    assert res.exit_code == 0
    for opt in ("--manifest", "--out", "--engine", "--address", "--workers", "--spectra", "--resume", "--retry-failed",
                "--detail"):
        assert opt in res.output
    assert "screen" in CliRunner().invoke(cli, ["--help"]).output


def test_fail_on_gates_a_screen(screen_set, tmp_path):
    """--fail-on on a screen: spectrum fields per adapter (here: intruders, from each adapter's own
    spectrum result) and `failed`; exit 3 when a condition holds, the outcome in summary.json."""
    import json

    from .conftest import spectrum_of

    base, ads = screen_set
    want = {str(ads[n]): spectrum_of(base, str(ads[n]))["total_intruders"] for n in ("big", "tiny1")}
    res = _run(base, ads["big"], ads["tiny1"], "--out", tmp_path / "s", "--workers", "0", "--fail-on", "intruders>0")
    assert res.exit_code == (3 if max(want.values()) > 0 else 0), res.output
    gate = json.loads((tmp_path / "s" / "summary.json").read_text())["gate"]
    (cond,) = gate["conditions"]
    assert {m["model"]: m["value"] for m in cond["models"]} == want
    assert "Gate --fail-on 'intruders>0'" in res.output
    res = _run(base, ads["tiny1"], ads["corrupt"], "--out", tmp_path / "f", "--workers", "0", "--fail-on", "failed")
    assert res.exit_code == 2 and "failed" in res.output  # a flag needs a comparison
    res = _run(base, ads["tiny1"], ads["corrupt"], "--out", tmp_path / "f", "--workers", "0",
               "--fail-on", "failed==true")
    assert res.exit_code == 3, res.output
