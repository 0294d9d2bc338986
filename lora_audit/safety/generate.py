"""Batched greedy generation with left padding (transformers), chat template applied, and an
early stop for sequences already classified as refusals."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InputError
from ..progress import progress


def chat_texts(tokenizer, prompts: list[str], chat_template: str | None = None) -> list[str]:
    """Apply the tokenizer's chat template (or ``chat_template`` text) with the assistant prefix."""
    tmpl = chat_template or getattr(tokenizer, "chat_template", None)
    if not tmpl:
        raise InputError("the model's tokenizer has no chat template; pass one with --chat-template FILE "
                         "(a Jinja template as in tokenizer_config.json)")
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], chat_template=tmpl,
                                          tokenize=False, add_generation_prompt=True) for p in prompts]


def read_chat_template(path: str | None) -> str | None:
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{path}: no such chat template file")
    return p.read_text(encoding="utf-8")


@dataclass
class GenSettings:
    max_new_tokens: int = 64
    batch_size: int = 16
    seed: int = 0
    early_stop: bool = True


class _RefusalStop:
    """StoppingCriteria: marks a sequence done once its decoded continuation is a refusal."""

    def __init__(self, tokenizer, prompt_len: int, is_refusal):
        self.tok, self.n, self.is_refusal = tokenizer, prompt_len, is_refusal

    def __call__(self, input_ids, scores, **kw):
        texts = self.tok.batch_decode(input_ids[:, self.n:], skip_special_tokens=True)
        return torch.tensor([self.is_refusal(t) for t in texts], device=input_ids.device)


@torch.no_grad()
def generate(model, tokenizer, texts: list[str], settings: GenSettings, *, is_refusal=None,
             desc: str = "generate") -> list[str]:
    """Greedy continuations of chat-formatted ``texts`` in batches (left padding)."""
    from transformers import StoppingCriteriaList

    torch.manual_seed(settings.seed)
    dev = next(model.parameters()).device
    tokenizer.padding_side = "left"
    out: list[str] = []
    with progress(total=len(texts), desc=desc, unit="prompt") as bar:
        for i in range(0, len(texts), settings.batch_size):
            enc = tokenizer(texts[i:i + settings.batch_size], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(dev)
            n = enc["input_ids"].shape[1]
            stop = None
            if settings.early_stop and is_refusal is not None:
                stop = StoppingCriteriaList([_RefusalStop(tokenizer, n, is_refusal)])
            gen = model.generate(**enc, max_new_tokens=settings.max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, stopping_criteria=stop)
            out.extend(tokenizer.batch_decode(gen[:, n:], skip_special_tokens=True))
            bar.update(len(enc["input_ids"]))
    return out


def generate_vllm(model_path: str, texts: list[str], settings: GenSettings) -> list[str]:
    """vllm backend (GPU); untested here (no GPU, vllm not installed)."""
    try:
        from vllm import LLM, SamplingParams
    except ImportError:
        raise InputError("--backend vllm needs the optional 'vllm' package (pip install vllm; GPU only)") from None
    llm = LLM(model=model_path, seed=settings.seed)
    res = llm.generate(texts, SamplingParams(temperature=0.0, max_tokens=settings.max_new_tokens))
    return [r.outputs[0].text for r in res]
