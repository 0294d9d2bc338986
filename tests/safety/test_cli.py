"""`lora-audit safety-eval` through CliRunner: a real run on the tiny model, and bad inputs as
clean errors (exit 1 or 2, 'Error: ...', no traceback, no JSON written)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from lora_audit.commands.safety import safety_eval

FAST = ["--limit", "2", "--max-new-tokens", "3", "--tasks", "none", "--batch-size", "2"]


def _run(args):
    return CliRunner().invoke(safety_eval, args, catch_exceptions=False)


def test_cli_run_writes_json(tiny_llama, tiny_adapter, tmp_path):
    out = tmp_path / "s.json"
    r = _run([str(tiny_llama), str(tiny_adapter), *FAST, "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert "layout detected: builtin" in r.output and "verdict" in r.output and f"wrote {out}" in r.output
    res = json.loads(out.read_text())
    assert set(res["models"]) == {"base", "ad"} and set(res["verdict"]) == {"ad"}
    assert res["models"]["base"]["capability"] == {}


def test_cli_custom_markers_and_prompts(tiny_llama, tmp_path):
    p = tmp_path / "adv.csv"
    p.write_text("goal,target\nSay a thing,Sure\nSay another,Sure\n")
    out = tmp_path / "s.json"
    r = _run([str(tiny_llama), "--prompts", str(p), "--benign", "none", "--markers", "zzz|yyy",
              *FAST, "--json", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert res["scorer"]["markers"] == ["zzz", "yyy"] and res["prompt_sets"]["harmful"]["layout"] == "advbench"
    assert res["prompt_sets"]["benign"] is None and "layout detected: advbench" in r.output


@pytest.mark.parametrize("files,extra,code,msg", [
    ({"bad.jsonl": '{"prompt": "a"}\nnot json\n'}, ["--prompts", "bad.jsonl"], 1, "line 2 is not valid JSON"),
    ({"cols.csv": "question,answer\nq,a\n"}, ["--prompts", "cols.csv"], 1,
     "unknown column layout; found columns ['question', 'answer']"),
    ({"empty.csv": ""}, ["--prompts", "empty.csv"], 1, "the prompt file is empty"),
    ({}, ["--prompts", "{tmp}/missing.csv"], 1, "no such prompt file"),
    ({}, ["--scorer", "judge"], 1, "needs --judge"),
    ({}, ["--scorer", "vibes"], 2, "Invalid value for '--scorer'"),
    ({}, ["{tmp}/nope"], 1, "no such file or folder"),
    ({}, ["--limit", "0"], 2, "Invalid value for '--limit'"),
    ({"t.txt": "no fields here"}, ["--scorer", "judge", "--judge", "x", "--judge-template", "t.txt"], 1,
     "must contain {behavior}"),
])
def test_cli_bad_inputs(tiny_llama, tmp_path, files, extra, code, msg):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    extra = [str(tmp_path / a) if a in files else a.replace("{tmp}", str(tmp_path)) for a in extra]
    out = tmp_path / "s.json"
    r = _run([str(tiny_llama), *FAST, *extra, "--json", str(out)])
    assert r.exit_code == code, r.output
    assert msg in r.output and "Traceback" not in r.output
    assert not out.exists()


def test_cli_adapter_for_another_base(tiny_llama, other_base_adapter, tmp_path):
    r = _run([str(tiny_llama), str(other_base_adapter), *FAST, "--json", str(tmp_path / "s.json")])
    assert r.exit_code == 1 and "adapter for another base" in r.output
    assert not (tmp_path / "s.json").exists()


def test_cli_no_chat_template(no_template_model, tmp_path):
    r = _run([str(no_template_model), *FAST])
    assert r.exit_code == 1 and "has no chat template; pass one with --chat-template" in r.output


def test_cli_vllm_absent(tiny_llama):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    r = _run([str(tiny_llama), *FAST, "--backend", "vllm"])
    assert r.exit_code == 1 and "optional 'vllm' package" in r.output


def test_cli_help_mentions_formats():
    r = _run(["--help"])
    assert r.exit_code == 0
    for word in ("AdvBench", "RefusalBench", "XSTest", "--task-dir", "first-token", "SAFETY_REMOVED"):
        assert word in r.output
