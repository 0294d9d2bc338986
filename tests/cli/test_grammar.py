"""One CLI grammar (issue 23, item 3): the shared output options on every command that writes
results, ``--json -`` printing exactly one JSON document on stdout, ``-q``/``-v`` before or after
the command name, BASE and TUNED as arguments everywhere (the old ``--base``/``--tuned`` still
work, with a warning), and ``--fail-on`` offering only the fields a command accepts."""

from __future__ import annotations

import json

import click
import pytest
from click.testing import CliRunner

from lora_audit import progress
from lora_audit.cli import cli
from lora_audit.commands._common import has_verbosity_options

from .conftest import SAFETY_FAST, SCAN_FAST, SPECTRUM_FAST


def run(*args, **kw):
    return CliRunner().invoke(cli, [str(a) for a in args], **kw)


def all_commands() -> dict[str, click.Command]:
    """Every command by its full name ("cache ls"), plugins included."""
    ctx = click.Context(cli)
    out = {}
    for name in cli.list_commands(ctx):
        cmd = cli.get_command(ctx, name)
        if isinstance(cmd, click.Group):
            for sub in cmd.list_commands(ctx):
                out[f"{name} {sub}"] = cmd.get_command(ctx, sub)
        else:
            out[name] = cmd
    return out


def opts(cmd: click.Command) -> set[str]:
    return {o for p in cmd.params for o in p.opts + p.secondary_opts}


def test_every_command_accepts_quiet_and_verbose_after_its_name():
    missing = [name for name, cmd in all_commands().items() if not has_verbosity_options(cmd)]
    assert not missing
    for name, cmd in all_commands().items():
        assert {"-q", "--quiet", "-v", "--verbose"} <= opts(cmd), name


# command -> the output options it must have (the shared group; a command has those that fit it)
OUTPUTS = {
    "spectrum": {"--json", "--sarif", "-o", "--out"},
    "screen": {"--json", "--sarif", "-o", "--out"},
    "safety-eval": {"--json", "--sarif", "-o", "--out"},
    "safety-scan": {"--json", "--sarif", "-o", "--out"},
    "audit": {"--sarif", "-o", "--out"},
    "report": {"-o", "--out"},
    "finetune": {"--json", "-o", "--out"},
    "federated": {"--json", "-o", "--out"},
    "mitigate": {"--json", "-o", "--out"},
    "cache ls": {"--json"},
}


@pytest.mark.parametrize("name", sorted(OUTPUTS))
def test_the_shared_output_options(name):
    cmd = all_commands()[name]
    assert OUTPUTS[name] <= opts(cmd)
    for p in cmd.params:  # one definition: the same help wherever the option appears
        if "--json" in p.opts:
            assert p.metavar == "PATH|-" and "'-' prints it to stdout and everything else to stderr" in p.help
        if "--sarif" in p.opts:
            assert p.help.startswith("Write the findings as SARIF 2.1.0 to PATH")


def test_gating_commands_write_sarif():
    gating = [name for name, cmd in all_commands().items() if "--fail-on" in opts(cmd)]
    assert sorted(gating) == ["audit", "safety-eval", "safety-scan", "screen", "spectrum"]
    assert all("--sarif" in opts(all_commands()[n]) for n in gating)


# Every command with --json, run with --json - in the workspace: (arguments, exit status)
JSON_RUNS = {
    "spectrum": (["spectrum", "base", "adapter", *SPECTRUM_FAST], 0),
    "screen": (["screen", "base", "adapters", "--out", "screen", "--workers", "0", *SPECTRUM_FAST], 0),
    "safety-eval": (["safety-eval", "base", "adapter", *SAFETY_FAST, "--benign", "none"], 0),
    "safety-scan": (["safety-scan", "base", "adapter", "--weights-only", *SCAN_FAST], 0),
    "finetune": (["finetune", "base", "--method", "lora", "--data", "builtin:alpaca-mini", "--out", "ft", "--steps",
                  "2", "--rank", "2", "--max-length", "64", "--device", "cpu"], 0),
    "federated": (["federated", "adapter_a", "adapter_b", "--out", "agg"], 0),
    "mitigate": (["mitigate", "base", "adapter", "--out", "mitigated", "--k", "4", "--device", "cpu"], 0),
    "cache ls": (["cache", "ls"], 0),
    "demo": (["demo", "--quick", "--base", "base", "--out", "demo", "--device", "cpu"], 0),
}


def test_json_runs_cover_every_command_with_json():
    with_json = {name for name, cmd in all_commands().items() if "--json" in opts(cmd)}
    assert with_json == set(JSON_RUNS)


@pytest.mark.parametrize("name", sorted(JSON_RUNS))
def test_json_dash_prints_only_json_on_stdout(workspace, name):
    args, status = JSON_RUNS[name]
    r = run(*args, "--json", "-")
    assert r.exit_code == status, r.output
    data = json.loads(r.stdout)  # the whole of stdout is one JSON document
    assert isinstance(data, dict) and data
    assert r.stderr.strip(), "the summary goes to stderr"
    assert not (workspace / "-").exists()


def test_mitigate_json_dash_is_stdout_and_a_path_is_a_file(workspace):
    r = run("mitigate", "base", "adapter", "--out", "m1", "--k", "4", "--json", "-")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["intruders_before"] >= 0 and not (workspace / "-").exists()
    r = run("mitigate", "base", "adapter", "--out", "m2", "--k", "4", "--json", "rec.json")
    assert r.exit_code == 0, r.output
    assert json.loads((workspace / "rec.json").read_text()) == json.loads((workspace / "m2" / "mitigate.json").read_text())


def test_out_folder_collects_the_results(workspace):
    r = run("spectrum", "base", "adapter", *SPECTRUM_FAST, "-o", "res", "--csv", "mine.csv")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (workspace / "res").iterdir()) == ["spectrum.json", "spectrum.sarif"]
    assert (workspace / "mine.csv").is_file()  # given explicitly: it wins over the folder
    assert json.loads((workspace / "res" / "spectrum.sarif").read_text())["version"] == "2.1.0"
    r = run("safety-eval", "base", "adapter", *SAFETY_FAST, "--benign", "none", "-o", "res")
    assert r.exit_code == 0, r.output
    assert {"safety.json", "safety.sarif"} <= {p.name for p in (workspace / "res").iterdir()}


@pytest.mark.parametrize("where", ["before", "after"])
def test_quiet_and_verbose_before_or_after_the_command(workspace, where, monkeypatch):
    seen = []
    real = progress.set_verbosity
    monkeypatch.setattr(progress, "set_verbosity", lambda level: (seen.append(level), real(level)))
    for flag, level in (("-q", progress.QUIET), ("--verbose", progress.VERBOSE), (None, progress.NORMAL)):
        seen.clear()
        args = ["spectrum", "base", "adapter", *SPECTRUM_FAST]
        if flag:
            args = [flag, *args] if where == "before" else [*args, flag]
        r = run(*args)
        assert r.exit_code == 0, r.output
        assert seen[-1] == level and progress.verbosity() == level
        assert progress._LIBRARY_OUTPUT["on"] is (level == progress.VERBOSE)  # the libraries' own output
    progress.set_verbosity(progress.NORMAL)


def test_quiet_and_verbose_together_is_a_usage_error(workspace):
    r = run("-q", "spectrum", "base", "adapter", "-v")
    assert r.exit_code == 2 and "-q/--quiet and -v/--verbose contradict each other" in r.output


def test_quiet_reaches_every_stage_of_audit(workspace, monkeypatch):
    """audit -q: no stage draws a bar or prints a line; every progress() call of every stage is silent."""
    calls = []
    real = progress.progress

    def spy(*a, **kw):
        bar = real(*a, **kw)
        calls.append((kw.get("desc"), getattr(bar, "disable", False) is True))
        return bar

    monkeypatch.setenv("LORA_AUDIT_NO_PROGRESS", "0")
    monkeypatch.setenv("LORA_AUDIT_PROGRESS", "1")  # bars forced on, as on a terminal
    for mod in ("lora_audit.spectral.engine", "lora_audit.safety.generate", "lora_audit.safety.scorers"):
        m = __import__(mod, fromlist=["x"])
        name = "progress_bar" if hasattr(m, "progress_bar") else "progress"
        monkeypatch.setattr(m, name, spy)
    r = run("audit", "base", "adapter", "-o", "a", *SPECTRUM_FAST, "--limit", "2", "--max-new-tokens", "3",
            "--tasks", "none", "--benign", "none", "--skip-scan", "-q")
    assert r.exit_code == 0, r.output
    assert calls and all(disabled for _, disabled in calls), calls
    assert "-- " not in r.stderr and "..." not in r.stderr
    calls.clear()
    r = run("audit", "base", "adapter", "-o", "b", *SPECTRUM_FAST, "--limit", "2", "--max-new-tokens", "3",
            "--tasks", "none", "--benign", "none", "--skip-scan")
    assert r.exit_code == 0, r.output
    assert {d for d, _ in calls} >= {"spectrum"} and not all(disabled for _, disabled in calls)
    progress.set_verbosity(progress.NORMAL)


def test_safety_eval_and_finetune_take_base_as_an_argument(workspace):
    r = run("safety-eval", "base", "adapter", *SAFETY_FAST, "--benign", "none", "--json", "new.json")
    assert r.exit_code == 0, r.output
    assert "deprecated" not in r.output
    new = json.loads((workspace / "new.json").read_text())
    assert set(new["models"]) == {"base", "adapter"}


def test_old_base_and_tuned_options_still_work_with_one_warning_line(workspace):
    r = run("safety-eval", "--base", "base", "--tuned", "adapter", *SAFETY_FAST, "--benign", "none", "--json", "o.json")
    assert r.exit_code == 0, r.output
    warnings = [x for x in r.stderr.splitlines() if "deprecated" in x]
    assert warnings == ["Warning: --base is deprecated and will be removed; give BASE as the first argument: "
                        "lora-audit safety-eval BASE TUNED...",
                        "Warning: --tuned is deprecated and will be removed; give each TUNED as an argument after "
                        "BASE: lora-audit safety-eval BASE TUNED..."]
    assert set(json.loads((workspace / "o.json").read_text())["models"]) == {"base", "adapter"}
    # --base with TUNED as arguments
    r = run("safety-eval", "--base", "base", "adapter", *SAFETY_FAST, "--benign", "none", "--json", "p.json")
    assert r.exit_code == 0, r.output
    assert set(json.loads((workspace / "p.json").read_text())["models"]) == {"base", "adapter"}
    # the old spelling is hidden from the help
    assert "--base" not in run("safety-eval", "--help").output
    ft = ["--method", "lora", "--data", "builtin:alpaca-mini", "--steps", "1", "--rank", "2", "--max-length", "64",
          "--device", "cpu"]
    r = run("finetune", "--base", "base", *ft, "--out", "ft_old")
    assert r.exit_code == 0, r.output
    assert r.stderr.count("deprecated") == 1 and (workspace / "ft_old" / "training.json").is_file()
    r = run("finetune", "base", *ft, "--out", "ft_new")
    assert r.exit_code == 0 and "deprecated" not in r.output, r.output
    old, new = (json.loads((workspace / d / "adapter_config.json").read_text()) for d in ("ft_old", "ft_new"))
    assert old == new
    r = run("finetune", "base", "--base", "base", *ft, "--out", "ft_twice")
    assert r.exit_code == 2 and "BASE given twice" in r.output


def test_missing_base_is_a_usage_error(workspace):
    for args in (["safety-eval"], ["finetune", "--method", "lora", "--data", "builtin:alpaca-mini", "--out", "x"]):
        r = run(*args)
        assert r.exit_code == 2 and "Missing argument 'BASE'" in r.output, r.output


@pytest.mark.parametrize("name", ["spectrum", "screen", "safety-eval", "safety-scan", "audit"])
def test_fail_on_help_offers_only_accepted_fields(name):
    """Every field and the example the help of --fail-on names parse for that command."""
    import re

    from lora_audit.results.gate import all_fields

    cmd = all_commands()[name]
    (param,) = [p for p in cmd.params if "--fail-on" in p.opts]
    ctx = click.Context(cmd)
    example = re.search(r"Example: '([^']+)'", param.help)[1]
    assert param.process_value(ctx, (example,)) is not None
    named = re.search(r"Fields: ([a-z_, ]+) \(", param.help)[1].split(", ")
    for field in named:
        assert field in all_fields()
        op_value = "==true" if all_fields()[field].labels else ">0"
        if field == "verdict":
            op_value = ">=SAFETY_DEGRADED"
        assert param.process_value(ctx, (field + op_value,)) is not None
    assert "intruders" not in named or name in ("spectrum", "screen", "audit")
