"""lm-eval's own options through safety-eval and audit, with lm-eval's meanings, on the built-in local task."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from lora_audit.cli import cli
from lora_audit.errors import InputError
from lora_audit.safety.capability import BUILTIN_TASK, Capability
from lora_audit.safety.lmeval import LmEvalOptions, parse_args_string


@pytest.fixture
def spy(monkeypatch):
    """Record what lm-eval was asked and what it answered (the real simple_evaluate runs)."""
    import lm_eval

    seen = {}
    real = lm_eval.simple_evaluate

    def wrapped(**kw):
        seen["kwargs"], seen["lm"], seen["turns"] = kw, kw["model"], []
        template = kw["model"].apply_chat_template

        def record(chat_history, *a, **k):  # how lm-eval laid out each prompt: messages per chat
            seen["turns"].append(len(chat_history))
            return template(chat_history, *a, **k)
        kw["model"].apply_chat_template = record
        seen["result"] = real(**kw)
        return seen["result"]
    monkeypatch.setattr(lm_eval, "simple_evaluate", wrapped)
    return seen


def test_options_reach_lm_eval_with_its_meanings(tiny_llama, spy):
    from lora_audit.checkpoints import load_model

    loaded = load_model(str(tiny_llama), device="cpu")
    opts = LmEvalOptions(num_fewshot=2, apply_chat_template=True, gen_kwargs={"max_gen_toks": 8},
                         model_args={"max_length": 48})
    scores, _ = Capability([BUILTIN_TASK], limit=2, batch_size=2, options=opts).run(loaded.model, loaded.tokenizer)
    assert scores[BUILTIN_TASK] is not None
    kw, res = spy["kwargs"], spy["result"]
    assert kw["num_fewshot"] == 2 and kw["apply_chat_template"] is True and kw["fewshot_as_multiturn"] is True
    assert kw["gen_kwargs"] == {"max_gen_toks": 8}
    assert res["n-shot"][BUILTIN_TASK] == 2  # lm-eval built 2-shot prompts
    assert res["configs"][BUILTIN_TASK]["num_fewshot"] == 2
    assert spy["turns"] and set(spy["turns"]) == {5}  # chat template, 2 shots as turns: (user, assistant) x 2 + user
    assert spy["lm"].max_length == 48  # --model-args merged into lora-audit's own HFLM arguments

    Capability([BUILTIN_TASK], limit=2, batch_size=2).run(loaded.model, loaded.tokenizer)  # defaults: lm-eval's
    assert spy["kwargs"]["num_fewshot"] is None and spy["kwargs"]["apply_chat_template"] is False
    assert spy["kwargs"]["fewshot_as_multiturn"] is False and spy["result"]["n-shot"][BUILTIN_TASK] == 0
    assert spy["turns"] == []  # no chat template


def test_safety_eval_passes_and_records_them(tiny_llama, tmp_path, spy):
    out = tmp_path / "s.json"
    r = CliRunner().invoke(cli, ["safety-eval", str(tiny_llama), "--limit", "2", "--max-new-tokens", "2",
                                 "--batch-size", "2", "--benign", "none", "--device", "cpu", "--num-fewshot", "1",
                                 "--apply-chat-template", "--no-fewshot-as-multiturn", "--model-args",
                                 "max_length=64,truncation=True", "--gen-kwargs", "max_gen_toks=4", "--json", str(out)])
    assert r.exit_code == 0, r.output
    recorded = json.loads(out.read_text())["lora_audit"]["settings"]["lm_eval"]
    assert recorded == {"num_fewshot": 1, "apply_chat_template": True, "fewshot_as_multiturn": False,
                        "gen_kwargs": {"max_gen_toks": 4}, "model_args": {"max_length": 64, "truncation": True}}
    assert spy["result"]["n-shot"][BUILTIN_TASK] == 1 and spy["kwargs"]["fewshot_as_multiturn"] is False
    assert spy["turns"] and set(spy["turns"]) == {1}  # the shot inside one user message, not as turns
    assert spy["lm"].max_length == 64


def test_audit_passes_them_too(tiny_llama, tmp_path, spy):
    from ..helpers import make_peft_adapter

    tiny_adapter = make_peft_adapter(tiny_llama, tmp_path / "ad", target_modules=["q_proj"])
    out = tmp_path / "a"
    r = CliRunner().invoke(cli, ["audit", str(tiny_llama), str(tiny_adapter), "--out", str(out), "--limit", "2",
                                 "--max-new-tokens", "2", "--batch-size", "2", "--benign", "none", "--device", "cpu",
                                 "--skip-scan", "--num-fewshot", "3", "--quiet"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "safety.json").read_text())["lora_audit"]["settings"]["lm_eval"]["num_fewshot"] == 3
    assert spy["result"]["n-shot"][BUILTIN_TASK] == 3


def test_args_strings_are_read_as_lm_eval_reads_them():
    assert parse_args_string("max_length=2048,add_bos_token=True,think_end_token=none,x=0.5", "--model-args") == \
        {"max_length": 2048, "add_bos_token": True, "think_end_token": None, "x": 0.5}
    assert parse_args_string('{"until": ["\\n\\n"], "temperature": 0}', "--gen-kwargs") == \
        {"until": ["\n\n"], "temperature": 0}
    assert parse_args_string("  ", "--gen-kwargs") == {}
    for bad, msg in (("=3", "is not key=value"), ("{1: 2}", "not a JSON object"), ("[1]", "is not key=value"), ("[1]", "give key=value,key2=value2")):
        with pytest.raises(InputError, match=msg):
            parse_args_string(bad, "--model-args")
    with pytest.raises(InputError, match="revision: set by lora-audit, use ORG/NAME@REV or --revision"):
        LmEvalOptions(model_args={"revision": "main"})
