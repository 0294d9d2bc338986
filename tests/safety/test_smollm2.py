"""Real generations on SmolLM2-135M-Instruct (marker ``smollm2``); small limits keep each test short."""

from __future__ import annotations

import math

import pytest

from lora_audit.checkpoints import load_model
from lora_audit.safety import EvalConfig, run_safety_eval
from lora_audit.safety.capability import BUILTIN_TASK, Capability
from lora_audit.safety.generate import GenSettings, chat_texts, generate
from lora_audit.safety.prompts import load_prompts
from lora_audit.safety.scorers import KeywordScorer

pytestmark = pytest.mark.smollm2


@pytest.fixture(scope="module")
def smol(smollm2_dir):
    return load_model(smollm2_dir, device="cpu")


def test_smollm2_batched_equals_one_by_one(smol):
    prompts = [p.prompt for p in load_prompts("builtin:benign").prompts[:3]]
    texts = chat_texts(smol.tokenizer, prompts)
    assert texts[0].startswith("<|im_start|>system\n")  # the model's own template
    _, batched = generate(smol.model, smol.tokenizer, texts, GenSettings(8, batch_size=3, early_stop=False),
                          return_ids=True)
    _, single = generate(smol.model, smol.tokenizer, texts, GenSettings(8, batch_size=1, early_stop=False),
                         return_ids=True)
    assert batched == single
    assert all(len(x) > 0 for x in batched)


def test_smollm2_refusal_run(smollm2_dir, smol):
    out = run_safety_eval(smol, [], EvalConfig(limit=4, max_new_tokens=16, tasks=[], benign=None, batch_size=4)).to_json()
    m = out["models"]["base"]
    kw = KeywordScorer()
    for r in m["responses"]:
        assert isinstance(r["response"], str) and sum(ch.isalpha() for ch in r["response"]) > 10
        assert r["refused"] == kw(r["response"])
        assert math.isfinite(r["first_token_score"])
    assert m["n_prompts"] == 4 and 0.0 <= m["refusal_rate"] <= 1.0
    assert out["inputs"]["base"]["source"] == str(smollm2_dir)


def test_smollm2_keyword_stops_early_on_a_refusal(smol):
    """With a marker list matching the opening of the model's own answer, generation stops right
    after the marker appears: the response is a short prefix of the full greedy answer."""
    texts = chat_texts(smol.tokenizer, ["Explain photosynthesis in three sentences."])
    full = generate(smol.model, smol.tokenizer, texts, GenSettings(24, 1, early_stop=False))[0]
    marker = full.strip()[:3]
    assert marker and len(full.strip()) > 10
    stopped = generate(smol.model, smol.tokenizer, texts, GenSettings(24, 1), is_refusal=KeywordScorer([marker]))[0]
    assert marker.lower() in stopped.lower() and len(stopped) < len(full)
    assert full.startswith(stopped)


def test_smollm2_builtin_task_above_chance(smol):
    scores, _ = Capability([BUILTIN_TASK], limit=8, batch_size=8).run(smol.model, smol.tokenizer)
    assert scores[BUILTIN_TASK] >= 0.5  # 4-way multiple choice: chance is 0.25
