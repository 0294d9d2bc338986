"""What is this path? One function decides, for every command that takes a checkpoint.

The layout is read from the files themselves (folder contents, safetensors key names), never from
the file name alone; a file whose keys fit no accepted layout, or fit two, is a ``FormatError``
that lists what was found and the layouts lora-audit reads (``ACCEPTED``).
"""

from __future__ import annotations

import enum
import os
import re
import stat
from pathlib import Path

from ..errors import FormatError, InputError
from ..io import file_kind, user_path
from ..text import printable


class Kind(str, enum.Enum):
    HF_FOLDER = "hf_folder"  # config.json + model.safetensors or shards with an index
    SAFETENSORS_FILE = "safetensors_file"  # a bare .safetensors file (state dict)
    PEFT_ADAPTER = "peft_adapter"  # adapter_config.json + adapter_model.safetensors
    KOHYA_LORA = "kohya_lora"  # a .safetensors file of lora_up/lora_down(/alpha) tensors
    DIFFUSERS_LORA = "diffusers_lora"  # lora_A/lora_B keys without adapter_config.json (save_lora_weights)
    DIFFUSERS_PIPELINE = "diffusers_pipeline"  # model_index.json + one folder per component
    GGUF = "gguf"  # a llama.cpp GGUF file (or a folder holding exactly one)
    HUB_ID = "hub_id"  # "owner/name[@revision]" on the Hugging Face hub (network, or the local HF cache)
    PICKLE = "pickle"  # only pytorch_model.bin / adapter_model.bin: refused by default


def is_hub_id(text: str) -> bool:
    """True when ``text`` is a Hugging Face hub reference ("owner/name", "owner/name@revision"): a
    valid repository id without path syntax (``hub.parse_ref``)."""
    from .hub import is_hub_ref

    return is_hub_ref(text)


def detect(path: str | os.PathLike) -> Kind:
    """Classify a checkpoint path; raise InputError with a helpful message when it is none."""
    s = str(path)
    p = user_path(s)
    if not os.path.exists(p):  # os.path: False, not an OSError, for a name too long
        if is_hub_id(s):
            return Kind.HUB_ID
        raise InputError(f"{s}: no such file or folder")
    try:
        str(p.resolve()).encode("utf-8")
    except UnicodeEncodeError:  # a name that is not UTF-8, decoded with surrogates
        raise InputError(f"{printable(s)}: its path is not UTF-8 text, and the libraries that read weights "
                         "(safetensors) open only UTF-8 paths; rename it") from None
    mode = p.stat().st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):  # opening a FIFO would wait forever
        raise InputError(f"{printable(s)}: is a {file_kind(mode)}, not a checkpoint file or folder")
    if p.is_file():
        suffix = p.suffix.lower()
        if suffix == ".gguf":
            return Kind.GGUF
        if suffix == ".safetensors":
            return _safetensors_kind(p)
        if suffix in (".bin", ".pt", ".pth", ".ckpt"):
            return Kind.PICKLE
        raise InputError(f"{s}: unsupported file type {suffix or '(no extension)'}; expected a .safetensors, "
                         ".gguf, a Hugging Face model folder or a PEFT adapter folder")
    names = _entries(p, s)
    if "adapter_config.json" in names:
        return Kind.PEFT_ADAPTER
    if "model_index.json" in names:
        return Kind.DIFFUSERS_PIPELINE
    if DIFFUSERS_LORA_FILE in names and not any(n in names for n in MODEL_WEIGHT_FILES):
        return Kind.DIFFUSERS_LORA
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
                     f"(no adapter_config.json) and no .gguf file inside; lora-audit reads {ACCEPTED}")


def _entries(folder: Path, shown: str) -> set[str]:
    """The names in a checkpoint folder; InputError when one is a FIFO, a device or a socket:
    the libraries that load a folder (transformers reads every tokenizer and config file in it)
    would wait forever on a FIFO or read a device without end."""
    names = set()
    for entry in os.scandir(folder):
        names.add(entry.name)
        try:
            mode = entry.stat().st_mode  # through a link: the HF cache's files are links to its blobs
        except OSError:
            continue  # a dangling link: missing, as the loaders will say if they need it
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise InputError(f"{printable(shown)}: holds {printable(entry.name)}, a {file_kind(mode)}; a checkpoint "
                             "folder holds only regular files and folders")
    return names


# The file a diffusers pipeline's save_lora_weights writes, and the weight files of a model folder.
DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"
MODEL_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "diffusion_pytorch_model.safetensors",
                      "diffusion_pytorch_model.safetensors.index.json")
# Key endings of low-rank layouts lora-audit does not read (LyCORIS LoHa, LoKr, (B)OFT, IA3, kohya DoRA).
UNREAD_LAYOUTS = {"hada_w1_a": "LyCORIS LoHa", "lokr_w1": "LyCORIS LoKr", "lokr_w1_a": "LyCORIS LoKr",
                  "oft_blocks": "OFT", "oft_diag": "OFT", "ia3_l": "IA3", "dora_scale": "DoRA (kohya/LyCORIS)"}
ACCEPTED = ("Hugging Face model folders (transformers or diffusers, safetensors, bitsandbytes-quantised too), "
            "diffusers pipeline folders (model_index.json), single .safetensors state dicts (incl. single-file "
            "Stable Diffusion checkpoints), GGUF files, PEFT adapter folders (LoRA, DoRA, MixLoRA, X-LoRA), "
            "kohya/sd-scripts LoRA files (lora_down/lora_up/alpha, LoCon conv) and diffusers LoRA files "
            "(lora_A/lora_B keys)")


def safetensors_keys(p: Path) -> list[str]:
    """The tensor names of a safetensors file (header only); FormatError when it is not one."""
    try:
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as f:
            return list(f.keys())
    except Exception as e:  # noqa: BLE001 - any parse failure is a format error for the user
        raise FormatError(f"{p}: not a readable safetensors file ({e})") from None


def _safetensors_kind(p: Path) -> Kind:
    """Kohya LoRA, diffusers LoRA or a plain state dict, from the key names; FormatError for a file
    of a low-rank layout lora-audit does not read, or with keys of two LoRA layouts at once."""
    keys = safetensors_keys(p)
    kohya = any(k.endswith(("lora_down.weight", "lora_up.weight")) for k in keys)
    peft = any(re.search(r"\.lora_[AB](\.[^.]+)?\.weight$", k) for k in keys)
    unread = sorted({name for k in keys for end, name in UNREAD_LAYOUTS.items() if k.endswith("." + end)
                     or k.endswith("." + end + ".weight")})
    if kohya and peft:
        raise FormatError(f"{p}: ambiguous layout: keys of kohya LoRA (lora_down/lora_up, e.g. "
                          f"{_first(keys, 'lora_down')}) and of PEFT/diffusers LoRA (lora_A/lora_B, e.g. "
                          f"{_first(keys, '.lora_A')}) in one file; lora-audit reads one layout per file")
    if unread and not (kohya or peft):
        raise FormatError(f"{p}: {', '.join(unread)} weights, which lora-audit does not read; it reads {ACCEPTED}. "
                          "Merge the adapter into the model and audit the merged weights.")
    if kohya:
        return Kind.KOHYA_LORA
    return Kind.DIFFUSERS_LORA if peft else Kind.SAFETENSORS_FILE


def _first(keys: list[str], part: str) -> str:
    return printable(next((k for k in keys if part in k), "?"))


def pickle_refused(path, e: BaseException):
    """The FormatError for a pickle that ``torch.load(weights_only=True)`` (directly, or inside
    transformers' ``from_pretrained``) would not load: refused, and nothing in it was run. A pickle
    of objects other than tensors is the shape a malicious file takes; ``e``'s own advice (to retry
    with weights_only=False) is left out of the message on purpose."""
    import pickle

    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    reason = next((ln for ln in lines if ln.startswith(("Trying to load", "Unsupported", "Unsupported global"))),
                  lines[0] if lines and not lines[0].startswith("Weights only load failed") else type(e).__name__)
    if isinstance(e, pickle.UnpicklingError):
        return FormatError(f"{path}: refused: the pickle holds more than tensors, so torch.load(weights_only=True) "
                           f"would not load it ({reason[:200]}); nothing in it was run. A file like this can be "
                           "malicious: convert a trusted copy to safetensors instead")
    return FormatError(f"{path}: not a readable pickle of tensors, truncated or corrupted ({reason[:200]}); nothing "
                       "in it was run")


PICKLE_REFUSAL = ("{path}: holds only pickle weights (pytorch_model.bin / *.bin). Unpickling can run "
                  "arbitrary code, so lora-audit refuses it by default. Convert it once with a trusted "
                  "tool (e.g. `python -c \"from transformers import AutoModelForCausalLM as M; "
                  "M.from_pretrained('{path}').save_pretrained('{path}-st')\"`), or pass "
                  "--allow-pickle to load it with torch.load(weights_only=True).")
