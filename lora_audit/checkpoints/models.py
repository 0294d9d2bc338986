"""Load whole models (for generation, scoring and training), as opposed to the streaming
matrix reader used by the spectral audit.

``load_model("path/or/id")`` accepts a Hugging Face folder, a GGUF file (dequantised into a plain
float model), a hub id (when online), or a PEFT adapter (folder or hub id) together with ``base=``.
Never ``trust_remote_code`` unless the caller asks; never unpickle unless ``allow_pickle``, for
every source (hub ids included). ``match_adapter_to_model`` checks an adapter against a loaded
model before peft patches it.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

from ..device import resolve_device
from ..errors import FormatError, InputError
from .adapters import AdapterFile, AdapterMatch, match_adapter, read_peft_adapter
from .detect import PICKLE_REFUSAL, Kind, pickle_refused
from .loading import LoadOptions, load_dtype, pretrained_kwargs
from .sources import gguf_file, load_gguf_model, local_path, open_weights, read_model_config
from .stream import conv1d_weights


@dataclass
class LoadedModel:
    model: torch.nn.Module  # a transformers PreTrainedModel, or a peft PeftModel
    tokenizer: object  # a transformers tokenizer
    source: str  # what the user passed
    kind: Kind
    base: str | None = None  # for adapters: the base it was applied to
    merged: bool = False  # adapter merged into the weights (merge_and_unload)
    path: str | None = None  # the local folder or file read (a hub reference's pinned snapshot)
    options: LoadOptions = LoadOptions()  # dtype, device map and quantisation it was loaded with

    @property
    def device(self) -> torch.device:
        """Where inputs go: the device of the first parameter (the embedding, under a device map)."""
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype it was loaded in (the compute dtype of a quantised model)."""
        return getattr(self.model, "dtype", None) or next(self.model.parameters()).dtype


def load_model(source: str | os.PathLike, *, base: str | os.PathLike | None = None, device: str = "auto",
               dtype: torch.dtype | str | None = None, merge: bool = False, allow_pickle: bool = False,
               trust_remote_code: bool = False, options: LoadOptions | None = None) -> LoadedModel:
    """Load a causal LM and its tokenizer, ready for ``eval()`` use on ``device``.

    Args:
        source: model folder, .gguf file, hub id, or PEFT adapter folder or hub id (then ``base`` is
            needed, unless the adapter config names its base: a local path or a hub id, pinned to its revision).
        base: the base model for an adapter (anything ``load_model`` accepts).
        dtype: auto (the checkpoint's own dtype on CUDA, float32 elsewhere), bfloat16, float16,
            float32 or a torch dtype; default ``options.dtype``.
        merge: merge an adapter into the base weights (faster generation; needs a float base).
        allow_pickle: permit pytorch_model.bin, loaded with torch.load(weights_only=True).
        options: dtype, device map (accelerate) and bitsandbytes quantisation (``loading.LoadOptions``);
            an adapter on a quantised base stays a PeftModel (never merged into quantised weights).

    A hub id is first resolved to a local snapshot holding no pickle (``sources.local_path``) and
    classified there; a folder's config, shard index and weight files are checked (``open_weights``)
    before transformers reads them, and transformers is told to read safetensors only unless
    ``allow_pickle``; a GGUF gives a plain float model (``sources.load_gguf_model``).
    """
    source = str(source)
    opts = options or LoadOptions()
    opts.check("auto" if opts.device_map is not None else device)
    path, kind = local_path(source)
    dev = resolve_device(device)
    if kind == Kind.PEFT_ADAPTER:
        return _load_adapter(source, path, base, dev, dtype, merge, allow_pickle, trust_remote_code, opts)
    if opts.places_itself and kind not in (Kind.HF_FOLDER, Kind.PICKLE):
        raise InputError(f"{source}: --device-map and --load-in-4bit/8bit load model folders (config.json and "
                         "safetensors); this is a " + kind.value.replace("_", " "))
    if kind in (Kind.SAFETENSORS_FILE, Kind.KOHYA_LORA, Kind.DIFFUSERS_LORA):
        raise InputError(f"{source}: a bare .safetensors file has no model config; pass the model folder "
                         "that holds config.json")
    if kind == Kind.DIFFUSERS_PIPELINE:
        raise InputError(f"{source}: a diffusers pipeline is not a causal language model; lora-audit loads causal "
                         "LMs whole (generation, training) and audits the weights of every family (spectrum)")
    if kind == Kind.PICKLE and not allow_pickle:
        raise InputError(PICKLE_REFUSAL.format(path=source))
    tok_path, tok_kwargs = path, {"trust_remote_code": trust_remote_code}
    if kind == Kind.GGUF:
        model = load_gguf_model(path, dtype=load_dtype(dtype or opts.dtype, dev))
        gguf = gguf_file(path)
        tok_path, tok_kwargs["gguf_file"] = gguf.parent, gguf.name
    else:
        folder = path if path.is_dir() else path.parent
        if not (folder / "config.json").is_file():
            raise InputError(f"{source}: no config.json; a model folder needs its config to be loaded whole")
        if kind == Kind.HF_FOLDER:
            config = open_weights(path).config  # config, shard index and weight files checked before transformers
        else:
            config = read_model_config(folder)
        dt = load_dtype(dtype or opts.dtype, dev, folder, config)
        model = _from_pretrained(source, folder, dtype=dt, use_safetensors=kind != Kind.PICKLE,
                                 trust_remote_code=trust_remote_code, **pretrained_kwargs(opts, dt, dev))
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tok_path), **tok_kwargs)
    except (OSError, ValueError) as e:
        raise InputError(f"{source}: no usable tokenizer next to the model ({_first_line(e)})") from None
    _prepare_tokenizer(tokenizer)
    if not opts.places_itself:
        model.to(dev)
    model.eval()
    contiguous_head_input(model)
    return LoadedModel(model=model, tokenizer=tokenizer, source=source, kind=kind, path=str(path), options=opts)


def contiguous_head_input(model) -> None:
    """Give the output layer a contiguous input. transformers hands it ``hidden[:, -k:, :]`` (a
    strided view) whenever only the last positions' logits are wanted (``logits_to_keep``: generation,
    the first-token scores). On the CPU, torch's 16-bit linear with a strided 3-D input and a weight
    that does not require grad (peft freezes the base) converts the whole weight for every call:
    measured, +0.39 GB transient per call for a 49k x 1024 bfloat16 output layer (the peak of a
    bfloat16 safety-eval with an adapter), 0 with a contiguous input; the logits are the same."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, torch.nn.Module) and not getattr(head, "_lora_audit_contiguous", False):
        head.register_forward_pre_hook(lambda mod, args: (args[0].contiguous(), *args[1:])
                                       if args and isinstance(args[0], torch.Tensor) else None)
        head._lora_audit_contiguous = True


def _from_pretrained(source: str, folder: Path, *, dtype: torch.dtype, use_safetensors: bool,
                     trust_remote_code: bool, **kw):
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, use_safetensors=use_safetensors,
                                                    trust_remote_code=trust_remote_code, **kw)
    except pickle.UnpicklingError as e:  # allow_pickle: torch.load(weights_only=True) refused the file
        raise pickle_refused(source, e) from None
    except OSError as e:
        raise InputError(f"{source}: could not load the model ({_first_line(e)})") from None
    except (ValueError, KeyError) as e:
        raise FormatError(f"{source}: could not load the model ({_first_line(e)})") from None
    except (RuntimeError, EOFError) as e:
        if use_safetensors:
            raise
        raise pickle_refused(source, e) from None  # a truncated or corrupted pytorch_model.bin


def accepts_logits_to_keep(model) -> bool:
    """Whether the (peft-unwrapped) model's forward takes transformers' ``logits_to_keep`` (the
    output layer applied to the last positions only)."""
    import inspect

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "logits_to_keep" in inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):
        return False


def model_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of a loaded model, tied parameters under each of their names; a
    bitsandbytes 4-bit weight (stored packed) under the shape it stands for."""
    return {n: tuple(getattr(getattr(p, "quant_state", None), "shape", None) or p.shape)
            for n, p in model.named_parameters(remove_duplicate=False)}


def match_adapter_to_model(af: AdapterFile, model: torch.nn.Module, *, base: str) -> AdapterMatch:
    """``adapters.match_adapter`` against a loaded model (GPT-2 Conv1D weights taken transposed):
    ShapeMismatchError before peft touches the model, which it would leave half-patched."""
    shapes = model_shapes(model)
    config = model.config.to_dict() if hasattr(model.config, "to_dict") else {}
    return match_adapter(af, shapes, transposed=conv1d_weights(shapes, getattr(model.config, "model_type", None)),
                         base=base, config=config)


def _load_adapter(source, path, base, dev, dtype, merge, allow_pickle, trust_remote_code, opts) -> LoadedModel:
    af = read_peft_adapter(path)
    if merge and opts.quantization is not None:
        raise InputError(f"{source}: an adapter is not merged into a quantised base (the result would be "
                         "rounded again); load it without merge, or the base without --load-in-4bit/8bit")
    if base is None:
        from .hub import named_base

        base = named_base(path, af.config, source)  # a hub id: resolved and pinned like any other
    loaded = load_model(base, device="auto" if opts.device_map else str(dev), dtype=dtype, allow_pickle=allow_pickle,
                        trust_remote_code=trust_remote_code, options=opts)
    if loaded.kind == Kind.PEFT_ADAPTER:
        raise InputError(f"{base}: is a PEFT adapter; the base of adapter {source} must be a full model")
    match_adapter_to_model(af, loaded.model, base=f"base {base}")
    from peft import PeftModel

    try:
        model = PeftModel.from_pretrained(loaded.model, str(path), is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as e:
        raise InputError(f"{source}: adapter does not fit base {base} ({_first_line(e)})") from None
    if not opts.places_itself:
        model.to(dev)
    model.eval()
    if merge:
        model = model.merge_and_unload()
    return LoadedModel(model=model, tokenizer=loaded.tokenizer, source=source, kind=Kind.PEFT_ADAPTER,
                       base=str(base), merged=merge, path=str(path), options=opts)


def behaviour_not_applicable(base: str | os.PathLike, tuned: list[str | os.PathLike]) -> str | None:
    """Why the behavioural audit (safety-eval: generation with a causal language model and a PEFT
    adapter or full model) cannot run on these inputs, or None when it can. Reads configs only; a hub
    id is left to safety-eval (which downloads it)."""
    from .adapter_sets import is_adapter_set
    from .detect import detect

    kind = detect(base)
    if kind == Kind.DIFFUSERS_PIPELINE:
        return f"BASE {base} is a diffusers pipeline, not a causal language model"
    if kind == Kind.SAFETENSORS_FILE:
        return f"BASE {base} is a single .safetensors file without a model config"
    if kind == Kind.HF_FOLDER:
        config = read_model_config(Path(base))
        arch = (config.get("architectures") or [None])[0] if isinstance(config.get("architectures"), list) else None
        if isinstance(config.get("_class_name"), str):
            return f"BASE {base} is a diffusers {config['_class_name']}, not a causal language model"
        if isinstance(arch, str) and not _is_causal_lm(arch):
            return f"BASE {base} is a {arch}, not a causal language model"
    for t in tuned:
        tk = detect(t)
        what = {Kind.KOHYA_LORA: "kohya LoRA file", Kind.DIFFUSERS_LORA: "diffusers LoRA file"}.get(tk)
        if tk == Kind.PEFT_ADAPTER and is_adapter_set(t):
            what = "set of LoRA experts with a router"
        if what:
            return f"TUNED {t} is a {what}; the behavioural audit runs full models and PEFT LoRA adapters"
    return None


def _is_causal_lm(arch: str) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return arch in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()) or arch.endswith("ForCausalLM")


def _prepare_tokenizer(tokenizer) -> None:
    """Left padding for batched generation; a pad token when the model has none."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else type(e).__name__
