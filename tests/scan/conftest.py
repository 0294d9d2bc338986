"""Fixtures for the safety-scan tests: tiny Llamas whose refusal behaviour is set by hand, prompt
files whose last token tells harmful from harmless, and adapters/full models made from them.

The chat template used here is the prompt itself (``CONTENT_TEMPLATE``), so the last prompt token
is the prompt's own last character: "!" for the harmful set, "?" for the harmless one.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ..helpers import make_peft_adapter, make_tiny_llama

CONTENT_TEMPLATE = "{{ messages[0]['content'] }}"
WORDS = ["bread", "sea", "wind", "stars", "poem", "weather", "answer", "France", "Paris", "Rome", "child", "water"]


def write_prompts(folder: Path, n: int = 24) -> tuple[Path, Path, Path]:
    """(harmful.jsonl, harmless.jsonl, template file): prompts ending in "!" and "?"."""
    folder.mkdir(parents=True, exist_ok=True)
    h, b, t = folder / "harmful.jsonl", folder / "harmless.jsonl", folder / "template.jinja"
    h.write_text("".join(json.dumps({"prompt": f"tell me about the {WORDS[i % len(WORDS)]} {i}!"}) + "\n"
                         for i in range(n)))
    b.write_text("".join(json.dumps({"prompt": f"what is the {WORDS[(i + 5) % len(WORDS)]} {i}?"}) + "\n"
                         for i in range(n)))
    t.write_text(CONTENT_TEMPLATE)
    return h, b, t


@pytest.fixture(scope="session")
def scan_prompts(tmp_path_factory):
    return write_prompts(tmp_path_factory.mktemp("scan_prompts"))


def _last_states(model, tok, texts: list[str]) -> torch.Tensor:
    """Final-norm'd hidden state at the last token, one prompt at a time, (n, d)."""
    out = []
    with torch.no_grad():
        for t in texts:
            ids = tok(t, return_tensors="pt", add_special_tokens=False)["input_ids"]
            out.append(model(ids, output_hidden_states=True).hidden_states[-1][0, -1])
    return torch.stack(out)


def make_refusing_llama(folder: Path, prompts: tuple[Path, Path, Path], *, writer_scale: float = 0.3,
                        seed: int = 0) -> Path:
    """A tiny Llama that starts a refusal ("I", "As", ...) on the harmful prompts: its residual
    writers (o_proj, down_proj) are scaled by ``writer_scale`` (0: the stream at every layer is the
    token's embedding, so the refusal direction is E["!"] - E["?"] exactly), and the lm_head rows of
    the refusal-start tokens point along the harmful-minus-harmless mean of the final states."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_audit.safety.scorers import refusal_start_ids

    make_tiny_llama(folder, seed=seed)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(folder))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(writer_scale)
            layer.mlp.down_proj.weight.mul_(writer_scale)
        h = [json.loads(x)["prompt"] for x in prompts[0].read_text().splitlines()]
        b = [json.loads(x)["prompt"] for x in prompts[1].read_text().splitlines()]
        sh, sb = _last_states(model, tok, h), _last_states(model, tok, b)
        mid = (sh.mean(0) + sb.mean(0)) / 2
        u = sh.mean(0) - mid
        # logit = row . x, orthogonal to the midpoint: about +8 on harmful states, -8 on harmless ones
        row = 8.0 * u / (u @ u)
        row = row - (row @ mid) * mid / (mid @ mid)
        for i in refusal_start_ids(tok):
            model.lm_head.weight[i] = row
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def refusing_llama(tmp_path_factory, scan_prompts):
    return make_refusing_llama(tmp_path_factory.mktemp("scan_refusing") / "base", scan_prompts)


@pytest.fixture(scope="session")
def known_llama(tmp_path_factory, scan_prompts):
    """Writers zeroed: the stream at the last token is that token's embedding at every layer."""
    return make_refusing_llama(tmp_path_factory.mktemp("scan_known") / "base", scan_prompts, writer_scale=0.0)


@pytest.fixture(scope="session")
def scan_adapter(refusing_llama, tmp_path_factory):
    return make_peft_adapter(refusing_llama, tmp_path_factory.mktemp("scan_ad") / "lora", seed=5, init_scale=0.05)


@pytest.fixture(scope="session")
def scan_dora(refusing_llama, tmp_path_factory):
    return make_peft_adapter(refusing_llama, tmp_path_factory.mktemp("scan_dora") / "dora", seed=6, init_scale=0.05,
                             use_dora=True, target_modules=["o_proj", "down_proj", "q_proj"])


@pytest.fixture(scope="session")
def scan_full(refusing_llama, tmp_path_factory):
    """A full fine-tune of the refusing Llama: every weight perturbed a little."""
    import shutil

    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("scan_full") / "full"
    shutil.copytree(refusing_llama, out)
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    torch.manual_seed(9)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name and "lm_head" not in name:
                p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(out, safe_serialization=True)
    return out


def write_validated_risk(path: Path, *, base_fingerprint: str | None = None, signal: str = "refusal_score_delta",
                         name: str = "full") -> Path:
    """A risk file whose model reads ``signal`` and carries a validation record that passes
    safety-scan's rules (made up: a panel of 20 with a clean held-out separation)."""
    from lora_audit.results.scan import RiskModelInfo
    from lora_audit.scan.risk import risk_file_json
    from lora_audit.scan.validation import validation_record

    labels = [i % 2 == 1 for i in range(20)]
    held = [0.9 if y else 0.1 for y in labels]
    baseline = [float(y) if i % 4 else float(not y) for i, y in enumerate(labels)]  # wrong on a quarter
    record = validation_record(held, labels, baseline, held_out="leave-one-method-out", baseline="test rule",
                               base_fingerprint=base_fingerprint, base="the test panel's base",
                               signal_prompts="scan prompts", label_prompts="label prompts")
    model = RiskModelInfo(name=name, features=[signal], transforms=["identity"], mean=[0.0], scale=[1.0],
                          weights=[-1.0], intercept=0.0, validation=record)
    path.write_text(risk_file_json({name: model}, {"models": 20}))
    return path
