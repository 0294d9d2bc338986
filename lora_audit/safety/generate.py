"""Batched greedy generation with left padding (transformers), chat template applied, and an
early stop for sequences already classified as refusals."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ..datafile import is_blank
from ..io import read_user_text
from ..errors import InputError
from ..progress import progress


def chat_texts(tokenizer, prompts: list[str], chat_template: str | None = None) -> list[str]:
    """Apply the tokenizer's chat template (or ``chat_template`` text) with the assistant prefix."""
    tmpl = chat_template or getattr(tokenizer, "chat_template", None)
    if not tmpl:
        raise InputError("the model's tokenizer has no chat template; pass one with --chat-template FILE "
                         "(a Jinja template as in tokenizer_config.json)")
    try:
        return [tokenizer.apply_chat_template([{"role": "user", "content": p}], chat_template=tmpl,
                                              tokenize=False, add_generation_prompt=True) for p in prompts]
    except Exception as e:  # noqa: BLE001 - jinja syntax/undefined errors come in many types
        raise InputError(f"the chat template could not be applied ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None


def read_chat_template(path: str | None) -> str | None:
    """The text of a --chat-template file (None: use the tokenizer's), checked to be a Jinja
    template that compiles the way transformers compiles chat templates (its sandbox and its
    extra tags), so a syntax error names the file and line before any model is loaded."""
    if path is None:
        return None
    template = read_user_text(path, "chat template file")
    if is_blank(template):
        raise InputError(f"{path}: the chat template file is empty; it must hold a Jinja chat template "
                         "(as in tokenizer_config.json)")
    import jinja2

    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:  # moved in another transformers version: chat_texts reports errors when applying it
        return template
    try:
        _compile_jinja_template(template)
    except jinja2.TemplateSyntaxError as e:
        raise InputError(f"{path}: line {e.lineno} of the chat template is not valid Jinja ({e.message}); "
                         "it must be a Jinja chat template as in tokenizer_config.json") from None
    return template


@dataclass
class GenSettings:
    max_new_tokens: int = 64
    batch_size: int = 16
    seed: int = 0
    early_stop: bool = True


class _RefusalStop:
    """StoppingCriteria: marks a sequence done once its decoded continuation is classified as a
    refusal (its later tokens are padding; the batch stops when every row is done)."""

    def __init__(self, tokenizer, prompt_len: int, is_refusal):
        self.tok, self.n, self.is_refusal = tokenizer, prompt_len, is_refusal
        self.done: torch.Tensor | None = None

    def __call__(self, input_ids, scores, **kw):
        if self.done is None:
            self.done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for i in (~self.done).nonzero().flatten().tolist():  # decode only rows not yet classified
            self.done[i] = bool(self.is_refusal(self.tok.decode(input_ids[i, self.n:], skip_special_tokens=True)))
        return self.done.clone()


@torch.no_grad()
def generate(model, tokenizer, texts: list[str], settings: GenSettings, *, is_refusal=None,
             desc: str = "generate", return_ids: bool = False):
    """Greedy continuations of chat-formatted ``texts`` in batches of ``settings.batch_size``
    (left padding, so every row's new tokens start at the same column). With ``is_refusal`` and
    ``settings.early_stop`` a row stops as soon as its text so far is classified as a refusal.
    Returns the decoded texts, or (texts, new token ids without trailing padding) with ``return_ids``."""
    from transformers import StoppingCriteriaList

    torch.manual_seed(settings.seed)
    dev = next(model.parameters()).device
    tokenizer.padding_side = "left"
    out: list[str] = []
    ids: list[list[int]] = []
    pad = tokenizer.pad_token_id
    with progress(total=len(texts), desc=desc, unit="prompt") as bar:
        for i in range(0, len(texts), settings.batch_size):
            enc = tokenizer(texts[i:i + settings.batch_size], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(dev)
            n = enc["input_ids"].shape[1]
            stop = None
            if settings.early_stop and is_refusal is not None:
                stop = StoppingCriteriaList([_RefusalStop(tokenizer, n, is_refusal)])
            with warnings.catch_warnings():  # transformers' own deprecation, raised inside generate()
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
                gen = model.generate(**enc, max_new_tokens=settings.max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id, stopping_criteria=stop)
            new = gen[:, n:]  # (b, new tokens)
            out.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
            for row in new.tolist():
                while row and row[-1] == pad:
                    row.pop()
                ids.append(row)
            bar.update(len(enc["input_ids"]))
    return (out, ids) if return_ids else out


VLLM_MISSING = ("--backend vllm needs the optional 'vllm' package (pip install 'lora-auditor[vllm]'; "
                "it needs a CUDA GPU). The default --backend hf runs everywhere.")


def require_vllm() -> None:
    """Fail early (before any model is loaded) when vllm is not installed."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise InputError(VLLM_MISSING)


def generate_vllm(model_path: str, texts: list[str], settings: GenSettings, *, adapter: str | None = None,
                  dtype: str = "auto", tensor_parallel_size: int = 1, quantization: str | None = None) -> list[str]:
    """vllm backend (GPU, greedy): ``model_path`` is a full model (a local folder: a hub reference's
    pinned snapshot); ``adapter`` a PEFT LoRA folder on it. ``dtype`` as --dtype (vllm's own "auto"
    is the checkpoint's dtype too); the model split across ``tensor_parallel_size`` GPUs;
    ``quantization`` "4bit": vllm's in-flight bitsandbytes quantisation. Not exercised by the test
    suite (no GPU, vllm not installed here)."""
    try:
        from vllm import LLM, SamplingParams
    except ImportError:
        raise InputError(VLLM_MISSING) from None
    kw = {"enable_lora": True} if adapter else {}
    if quantization == "4bit":
        kw["quantization"] = "bitsandbytes"  # type: ignore[assignment]
    llm = LLM(model=model_path, seed=settings.seed, dtype=dtype, tensor_parallel_size=tensor_parallel_size, **kw)
    params = SamplingParams(temperature=0.0, max_tokens=settings.max_new_tokens, seed=settings.seed)
    if adapter:
        from vllm.lora.request import LoRARequest

        res = llm.generate(texts, params, lora_request=LoRARequest("tuned", 1, adapter))
    else:
        res = llm.generate(texts, params)
    out = [r.outputs[0].text for r in res]
    del llm
    return out
