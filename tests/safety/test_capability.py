"""lm-eval capability on the already loaded tiny model: the built-in offline task against a plain
log-likelihood reference, local task folders, unknown task names."""

from __future__ import annotations

import json

import pytest
import torch

from lora_audit.checkpoints import load_model
from lora_audit.errors import InputError
from lora_audit.safety.capability import BUILTIN_TASK, Capability, builtin_task_dir


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    return load_model(tiny_llama, device="cpu")


def _reference_acc(model, tok, docs) -> float:
    """Multiple choice by hand: argmax over choices of sum log p(" " + choice | "Question: q\\nAnswer:"),
    the continuation tokens being those of the whole text after the context's tokens."""
    right = 0
    for d in docs:
        ctx = f"Question: {d['question']}\nAnswer:"
        ctx_ids = tok(ctx, add_special_tokens=False)["input_ids"]
        lls = []
        for c in d["choices"]:
            whole = tok(ctx + " " + c, add_special_tokens=False)["input_ids"]
            n_ctx = len(ctx_ids)
            if whole[:n_ctx] != ctx_ids:  # the boundary token merged: move it to the continuation
                n_ctx -= 1
            ids = torch.tensor([whole])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
            lls.append(sum(float(logp[i - 1, whole[i]]) for i in range(n_ctx, len(whole))))
        right += int(max(range(len(lls)), key=lls.__getitem__) == d["answer"])
    return right / len(docs)


def test_builtin_task_matches_reference(tiny):
    scores, metrics = Capability([BUILTIN_TASK], limit=6, batch_size=4).run(tiny.model, tiny.tokenizer)
    docs = [json.loads(x) for x in (builtin_task_dir() / f"{BUILTIN_TASK}.jsonl").read_text().splitlines()[:6]]
    assert metrics[BUILTIN_TASK] == "acc,none"
    assert scores[BUILTIN_TASK] == pytest.approx(_reference_acc(tiny.model, tiny.tokenizer, docs))
    assert tiny.tokenizer.padding_side == "left"


def test_builtin_task_is_well_formed():
    rows = [json.loads(x) for x in (builtin_task_dir() / f"{BUILTIN_TASK}.jsonl").read_text().splitlines()]
    assert len(rows) >= 40
    assert all(0 <= r["answer"] < len(r["choices"]) and len(set(r["choices"])) == len(r["choices"]) for r in rows)


def test_local_task_dir(tiny, tmp_path):
    data = tmp_path / "d.jsonl"
    docs = [{"question": "Is fire hot?", "choices": ["yes", "no"], "answer": 0},
            {"question": "Is ice hot?", "choices": ["yes", "no"], "answer": 1},
            {"question": "Two plus two?", "choices": ["four", "five", "six"], "answer": 0}]
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "my_local_task.yaml").write_text(
        f"task: my_local_task\ndataset_path: json\ndataset_kwargs:\n  data_files: {json.dumps(str(data))}\n"
        "test_split: train\noutput_type: multiple_choice\n"
        "doc_to_text: \"Question: {{question}}\\nAnswer:\"\ndoc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: answer\nmetric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    scores, _ = Capability(["my_local_task"], task_dir=str(tmp_path), batch_size=2).run(tiny.model, tiny.tokenizer)
    assert scores["my_local_task"] == pytest.approx(_reference_acc(tiny.model, tiny.tokenizer, docs))


def test_unknown_task_suggests(tmp_path):
    with pytest.raises(InputError, match=r"unknown lm-eval task\(s\) \['lora_audit_general_mcq'\].*did you mean "
                                         r"lora_audit_general_mc"):
        Capability(["lora_audit_general_mcq"])
    with pytest.raises(InputError, match="--task-dir must be a folder"):
        Capability([BUILTIN_TASK], task_dir=str(tmp_path / "nope"))


def test_parse_tasks_option():
    from lora_audit.safety.capability import BUILTIN_TASK, parse_tasks

    assert parse_tasks(None) == [BUILTIN_TASK]
    assert parse_tasks("none") == parse_tasks(" ") == []
    assert parse_tasks("mmlu, hellaswag,") == ["mmlu", "hellaswag"]
