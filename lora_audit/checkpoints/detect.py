"""What is this path? One function decides, for every command that takes a checkpoint."""

from __future__ import annotations

import enum
import os
import re
from pathlib import Path

from ..errors import FormatError, InputError

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


class Kind(str, enum.Enum):
    HF_FOLDER = "hf_folder"  # config.json + model.safetensors or shards with an index
    SAFETENSORS_FILE = "safetensors_file"  # a bare .safetensors file (state dict)
    PEFT_ADAPTER = "peft_adapter"  # adapter_config.json + adapter_model.safetensors
    KOHYA_LORA = "kohya_lora"  # a .safetensors file of lora_up/lora_down(/alpha) tensors
    GGUF = "gguf"  # a llama.cpp GGUF file (or a folder holding exactly one)
    HUB_ID = "hub_id"  # "owner/name" on the Hugging Face hub (needs network)
    PICKLE = "pickle"  # only pytorch_model.bin / adapter_model.bin: refused by default


def is_hub_id(text: str) -> bool:
    """True when ``text`` has the form of a Hugging Face hub id ("owner/name")."""
    return bool(_HUB_ID.match(text)) and not text.startswith((".", "/"))


def detect(path: str | os.PathLike) -> Kind:
    """Classify a checkpoint path; raise InputError with a helpful message when it is none."""
    s = str(path)
    p = Path(s).expanduser()
    if not p.exists():
        if is_hub_id(s):
            return Kind.HUB_ID
        raise InputError(f"{s}: no such file or folder")
    if p.is_file():
        suffix = p.suffix.lower()
        if suffix == ".gguf":
            return Kind.GGUF
        if suffix == ".safetensors":
            return Kind.KOHYA_LORA if _looks_like_kohya(p) else Kind.SAFETENSORS_FILE
        if suffix in (".bin", ".pt", ".pth", ".ckpt"):
            return Kind.PICKLE
        raise InputError(f"{s}: unsupported file type {suffix or '(no extension)'}; expected a .safetensors, "
                         ".gguf, a Hugging Face model folder or a PEFT adapter folder")
    names = {x.name for x in p.iterdir()}
    if "adapter_config.json" in names:
        return Kind.PEFT_ADAPTER
    if "model.safetensors" in names or "model.safetensors.index.json" in names or any(
            n.endswith(".safetensors") for n in names):
        return Kind.HF_FOLDER
    ggufs = [n for n in names if n.lower().endswith(".gguf")]
    if len(ggufs) == 1:
        return Kind.GGUF
    if len(ggufs) > 1:
        raise InputError(f"{s}: holds several GGUF files ({', '.join(sorted(ggufs))}); pass one of them")
    if any(n.endswith(".bin") or n.endswith(".pt") for n in names):
        return Kind.PICKLE
    raise InputError(f"{s}: not a model folder (no config.json with *.safetensors), not a PEFT adapter "
                     f"(no adapter_config.json) and no .gguf file inside")


def _looks_like_kohya(p: Path) -> bool:
    try:
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as f:
            keys = list(f.keys())
    except Exception as e:  # noqa: BLE001 - any parse failure is a format error for the user
        raise FormatError(f"{p}: not a readable safetensors file ({e})") from None
    return any(k.endswith(("lora_down.weight", "lora_up.weight")) for k in keys)


PICKLE_REFUSAL = ("{path}: holds only pickle weights (pytorch_model.bin / *.bin). Unpickling can run "
                  "arbitrary code, so lora-audit refuses it by default. Convert it once with a trusted "
                  "tool (e.g. `python -c \"from transformers import AutoModelForCausalLM as M; "
                  "M.from_pretrained('{path}').save_pretrained('{path}-st')\"`), or pass "
                  "--allow-pickle to load it with torch.load(weights_only=True).")
