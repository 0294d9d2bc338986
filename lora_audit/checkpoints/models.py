"""Load whole models (for generation, scoring and training), as opposed to the streaming
matrix reader used by the spectral audit.

``load_model("path/or/id")`` accepts a Hugging Face folder, a GGUF file (dequantised by
transformers), a hub id (when online), or a PEFT adapter folder together with ``base=``.
Never ``trust_remote_code`` unless the caller asks; never unpickle unless ``allow_pickle``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..device import resolve_device
from ..errors import FormatError, InputError
from .detect import PICKLE_REFUSAL, Kind, detect, read_adapter_config


@dataclass
class LoadedModel:
    model: "torch.nn.Module"  # a transformers PreTrainedModel, or a peft PeftModel
    tokenizer: object  # a transformers tokenizer
    source: str  # what the user passed
    kind: Kind
    base: str | None = None  # for adapters: the base it was applied to
    merged: bool = False  # adapter merged into the weights (merge_and_unload)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def load_model(source: str | os.PathLike, *, base: str | os.PathLike | None = None, device: str = "auto",
               dtype: torch.dtype = torch.float32, merge: bool = False, allow_pickle: bool = False,
               trust_remote_code: bool = False) -> LoadedModel:
    """Load a causal LM and its tokenizer, ready for ``eval()`` use on ``device``.

    Args:
        source: model folder, .gguf file, hub id, or PEFT adapter folder (then ``base`` is needed,
            unless the adapter config names a base path that exists locally).
        base: the base model for an adapter (anything ``load_model`` accepts).
        merge: merge an adapter into the base weights (faster generation; needs a float base).
        allow_pickle: permit pytorch_model.bin, loaded with torch.load(weights_only=True).
    """
    source = str(source)
    kind = detect(source)
    dev = resolve_device(device)
    if kind == Kind.PEFT_ADAPTER:
        return _load_adapter(source, base, dev, dtype, merge, allow_pickle, trust_remote_code)
    if kind in (Kind.SAFETENSORS_FILE, Kind.KOHYA_LORA):
        raise InputError(f"{source}: a bare .safetensors file has no model config; pass the model folder "
                         "that holds config.json")
    if kind == Kind.PICKLE and not allow_pickle:
        raise InputError(PICKLE_REFUSAL.format(path=source))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    path = source
    if kind == Kind.GGUF:
        p = Path(source)
        gguf = p if p.is_file() else next(x for x in p.iterdir() if x.name.lower().endswith(".gguf"))
        path, kwargs["gguf_file"] = str(gguf.parent), gguf.name
    elif kind == Kind.HF_FOLDER:
        kwargs["use_safetensors"] = True
        if not (Path(source) / "config.json").is_file():
            raise InputError(f"{source}: no config.json; a model folder needs its config to be loaded whole")
    elif kind == Kind.PICKLE:
        kwargs["use_safetensors"] = False  # transformers loads .bin with weights_only=True
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as e:
        raise InputError(f"{source}: could not load the model ({_first_line(e)})") from None
    except (ValueError, KeyError) as e:
        raise FormatError(f"{source}: could not load the model ({_first_line(e)})") from None
    tok_kwargs = {"trust_remote_code": trust_remote_code}
    if "gguf_file" in kwargs:
        tok_kwargs["gguf_file"] = kwargs["gguf_file"]
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **tok_kwargs)
    except (OSError, ValueError) as e:
        raise InputError(f"{source}: no usable tokenizer next to the model ({_first_line(e)})") from None
    _prepare_tokenizer(tokenizer)
    model.to(dev).eval()
    return LoadedModel(model=model, tokenizer=tokenizer, source=source, kind=kind)


def _load_adapter(source, base, dev, dtype, merge, allow_pickle, trust_remote_code) -> LoadedModel:
    cfg = read_adapter_config(source)
    if base is None:
        guess = cfg.get("base_model_name_or_path")
        if guess and Path(guess).exists():
            base = guess
        else:
            raise InputError(f"{source}: a PEFT adapter needs its base model; pass it with --base "
                             f"(the adapter names {guess!r})")
    loaded = load_model(base, device=str(dev), dtype=dtype, allow_pickle=allow_pickle,
                        trust_remote_code=trust_remote_code)
    from peft import PeftModel

    try:
        model = PeftModel.from_pretrained(loaded.model, source, is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as e:
        raise InputError(f"{source}: adapter does not fit base {base} ({_first_line(e)})") from None
    model.to(dev).eval()
    if merge:
        model = model.merge_and_unload()
    return LoadedModel(model=model, tokenizer=loaded.tokenizer, source=source, kind=Kind.PEFT_ADAPTER,
                       base=str(base), merged=merge)


def _prepare_tokenizer(tokenizer) -> None:
    """Left padding for batched generation; a pad token when the model has none."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else type(e).__name__
