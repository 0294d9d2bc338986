"""lm-eval's own options, passed through with lm-eval's meanings (``lm-eval run --help``):
``--num_fewshot``, ``--apply_chat_template [NAME]``, ``--fewshot_as_multiturn`` (on by default
with a chat template), ``--gen_kwargs k=v,...`` and ``--model_args k=v,...``.

lora-audit scores the model it already loaded (``HFLM(pretrained=<model>, tokenizer=...,
batch_size=..., device=...)``), so the model arguments that choose or load a model are its own
options; a ``--model-args`` key that names one of them is refused with the option to use
instead, never silently ignored (lm-eval ignores most loading arguments for a loaded model).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import InputError
from ..text import printable

# HFLM arguments lora-audit sets itself, or that only apply when lm-eval loads the model: the option to use.
OWN_MODEL_ARGS = {
    "pretrained": "BASE / TUNED (the model under audit)",
    "tokenizer": "the model's own tokenizer (or --chat-template)",
    "batch_size": "--batch-size",
    "device": "--device",
    "dtype": "--dtype",
    "revision": "ORG/NAME@REV or --revision",
    "parallelize": "--device-map auto",
    "max_memory_per_gpu": "--device-map auto",
    "max_cpu_memory": "--device-map auto",
    "offload_folder": "--device-map auto",
    "device_map": "--device-map",
    "tp_plan": "--device-map auto",
    "peft": "TUNED (a PEFT adapter on BASE)",
    "delta": "TUNED (a full model)",
    "load_in_4bit": "--load-in-4bit",
    "load_in_8bit": "--load-in-8bit",
    "trust_remote_code": "nothing: lora-audit never runs a model's own code",
    "autogptq": "nothing: lora-audit loads safetensors, GGUF and bitsandbytes models",
    "gptqmodel": "nothing: lora-audit loads safetensors, GGUF and bitsandbytes models",
    "gguf_file": "BASE / TUNED (a .gguf file)",
    "subfolder": "BASE / TUNED (the folder itself)",
    "backend": "nothing: lora-audit scores causal language models",
}


@dataclass(frozen=True)
class LmEvalOptions:
    """lm-eval settings for the capability tasks (lm-eval's meanings and defaults)."""

    num_fewshot: int | None = None  # None: each task's own default
    apply_chat_template: bool | str = False  # True, or the name of one of the tokenizer's templates
    fewshot_as_multiturn: bool | None = None  # None: True when a chat template is applied
    gen_kwargs: dict[str, Any] = field(default_factory=dict)  # generate_until tasks
    model_args: dict[str, Any] = field(default_factory=dict)  # further HFLM arguments

    def __post_init__(self):
        if self.num_fewshot is not None and (isinstance(self.num_fewshot, bool) or self.num_fewshot < 0):
            raise InputError(f"--num-fewshot {self.num_fewshot}: must be 0 or more")
        if self.fewshot_as_multiturn and not self.apply_chat_template:
            raise InputError("--fewshot-as-multiturn needs --apply-chat-template (as in lm-eval)")
        own = sorted(k for k in self.model_args if k in OWN_MODEL_ARGS)
        if own:
            raise InputError("--model-args " + "; ".join(f"{printable(k)}: set by lora-audit, use {OWN_MODEL_ARGS[k]}"
                                                          for k in own))

    @property
    def multiturn(self) -> bool:
        """lm-eval's rule: few-shot examples as turns whenever a chat template is applied, unless refused."""
        return bool(self.apply_chat_template) if self.fewshot_as_multiturn is None else self.fewshot_as_multiturn

    def evaluate_kwargs(self) -> dict[str, Any]:
        """The ``lm_eval.simple_evaluate`` arguments these options set."""
        return {"num_fewshot": self.num_fewshot, "apply_chat_template": self.apply_chat_template,
                "fewshot_as_multiturn": self.multiturn, "gen_kwargs": dict(self.gen_kwargs) or None}

    def settings(self) -> dict[str, Any]:
        """As the results record them."""
        return {"num_fewshot": self.num_fewshot, "apply_chat_template": self.apply_chat_template,
                "fewshot_as_multiturn": self.multiturn, "gen_kwargs": dict(self.gen_kwargs),
                "model_args": dict(self.model_args)}


def parse_args_string(text: str | None, option: str) -> dict[str, Any]:
    """lm-eval's ``key=value,key2=value2`` (or a JSON object) as a dict, values typed as lm-eval
    types them (numbers, true/false, none); InputError naming ``option`` for a malformed one."""
    if text is None or not text.strip():
        return {}
    text = text.strip()
    if text.startswith("{"):
        import json

        try:
            value = json.loads(text)
        except ValueError as e:
            raise InputError(f"{option}: not a JSON object ({e})") from None
        if not isinstance(value, dict):
            raise InputError(f"{option}: expected a JSON object or key=value pairs")
        return value
    bad = [p for p in text.split(",") if p and ("=" not in p or not p.split("=", 1)[0].strip())]
    if bad:
        raise InputError(f"{option}: {printable(bad[0])!r} is not key=value; give key=value,key2=value2")
    from lm_eval.utils import simple_parse_args_string

    return {k.strip(): v for k, v in simple_parse_args_string(text).items()}
