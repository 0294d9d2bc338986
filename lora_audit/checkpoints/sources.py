"""Weight sources: read one named tensor at a time from whatever holds a model's weights.

    SafetensorsSource   HF folder (model.safetensors, or shards + model.safetensors.index.json),
                        or a bare .safetensors file: memory-mapped with ``safe_open``, one tensor
                        at a time, in the index's order; headers are checked when opened, so a
                        truncated or corrupted file is reported before any work starts.
    StateDictSource     weights that had to be loaded whole: GGUF (dequantised by transformers,
                        which also maps llama.cpp names to HF names and undoes the Q/K
                        permutation of its converter) and, only with ``allow_pickle``,
                        pytorch_model.bin read with ``torch.load(weights_only=True)``.

``open_weights(path)`` picks one; hub ids are downloaded first (safetensors and configs only)
when the machine is online.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

import torch

from ..errors import FormatError, InputError
from .detect import PICKLE_REFUSAL, Kind, detect


class WeightSource:
    """A read-only map from parameter name to tensor, read lazily."""

    path: str
    config: dict  # the model's config.json (empty when there is none)

    def names(self) -> list[str]:
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def get(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def __contains__(self, name: str) -> bool:
        return name in self._name_set

    @property
    def _name_set(self) -> set[str]:
        cached = getattr(self, "_names_cache", None)
        if cached is None:
            cached = set(self.names())
            self._names_cache = cached
        return cached

    @property
    def model_type(self) -> str | None:
        return self.config.get("model_type")


class SafetensorsSource(WeightSource):
    """One or several safetensors files, memory-mapped; nothing is read until ``get``."""

    def __init__(self, path: str, files: list[Path], order: list[str] | None = None, config: dict | None = None):
        from safetensors import safe_open

        self.path, self.config = path, config or {}
        self._handles = {}
        self._where: dict[str, Path] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for f in files:
            if not f.is_file():
                raise FormatError(f"{path}: shard {f.name} named in the index is missing")
            try:
                h = safe_open(str(f), framework="pt")
                keys = list(h.keys())
                shapes = {k: tuple(h.get_slice(k).get_shape()) for k in keys}
            except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
                raise FormatError(f"{f}: not a readable safetensors file, truncated or corrupted ({e})") from None
            self._handles[f] = h
            for k in keys:
                self._where[k] = f
            self._shapes.update(shapes)
        if order is not None:
            missing = [n for n in order if n not in self._where]
            if missing:
                raise FormatError(f"{path}: the index names tensors absent from their shards, e.g. {missing[:3]}")
            self._order = list(order)
        else:
            self._order = list(self._where)

    def names(self) -> list[str]:
        return self._order

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def get(self, name: str) -> torch.Tensor:
        try:
            return self._handles[self._where[name]].get_tensor(name)
        except Exception as e:  # noqa: BLE001
            raise FormatError(f"{self._where[name]}: could not read tensor {name} ({e})") from None


class StateDictSource(WeightSource):
    """Weights already in memory (GGUF, pickle); ``get`` hands out one tensor at a time."""

    def __init__(self, path: str, state: dict[str, torch.Tensor], config: dict | None = None):
        self.path, self.config = path, config or {}
        self._state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}

    def names(self) -> list[str]:
        return list(self._state)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._state[name].shape)

    def get(self, name: str) -> torch.Tensor:
        return self._state[name]


def _read_json(p: Path) -> dict:
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{p}: unreadable JSON ({e})") from None


def _folder_source(folder: Path) -> SafetensorsSource:
    config = _read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise FormatError(f"{index}: no 'weight_map' in the index")
        files = sorted({folder / f for f in weight_map.values()})
        return SafetensorsSource(str(folder), files, order=list(weight_map), config=config)
    if (folder / "model.safetensors").is_file():
        return SafetensorsSource(str(folder), [folder / "model.safetensors"], config=config)
    files = sorted(p for p in folder.glob("*.safetensors") if not p.name.startswith("adapter_"))
    if not files:
        raise InputError(f"{folder}: no *.safetensors weights in this folder")
    return SafetensorsSource(str(folder), files, config=config)


def load_gguf_state(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Dequantise a GGUF file into HF-named float32 tensors (the whole model: GGUF files are
    quantised, so even dequantised a model that fits a GGUF user's machine fits here)."""
    from transformers import AutoModelForCausalLM

    p = Path(path)
    gguf = p if p.is_file() else next(x for x in p.iterdir() if x.name.lower().endswith(".gguf"))
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - gguf/transformers raise many types for bad files
        raise FormatError(f"{path}: could not read this GGUF file ({str(e).splitlines()[0] if str(e) else e})") \
            from None
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # the tied copy: the embedding already stands for it
    return state, model.config.to_dict()


def _pickle_source(path: Path) -> StateDictSource:
    files = [path] if path.is_file() else sorted(x for x in path.iterdir() if x.suffix in (".bin", ".pt", ".pth"))
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            obj = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # noqa: BLE001
            raise FormatError(f"{f}: torch.load(weights_only=True) refused or failed ({e})") from None
        if not isinstance(obj, dict):
            raise FormatError(f"{f}: expected a state dict, got {type(obj).__name__}")
        state.update(obj)
    folder = path if path.is_dir() else path.parent
    config = _read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    return StateDictSource(str(path), state, config)


def resolve_hub_id(repo_id: str, patterns: Iterable[str] = ("*.json", "*.safetensors", "*.gguf", "tokenizer*")
                   ) -> Path:
    """Download the safetensors/config files of a hub repo (never pickles); needs network."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=list(patterns)))
    except Exception as e:  # noqa: BLE001 - offline, missing repo, auth: all user-facing
        raise InputError(f"{repo_id}: not a local path, and it could not be fetched from the Hugging Face hub "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Offline? Download it "
                         "elsewhere and pass the folder.") from None


def local_path(path: str | os.PathLike) -> tuple[Path, Kind]:
    """The local path of a checkpoint (hub ids downloaded) and what it is."""
    kind = detect(path)
    if kind == Kind.HUB_ID:
        local = resolve_hub_id(str(path))
        return local, detect(local)
    return Path(str(path)).expanduser(), kind


def open_weights(path: str | os.PathLike, *, allow_pickle: bool = False) -> WeightSource:
    """A full set of model weights (not an adapter)."""
    p, kind = local_path(path)
    if kind == Kind.HF_FOLDER:
        return _folder_source(p)
    if kind == Kind.SAFETENSORS_FILE:
        return SafetensorsSource(str(p), [p])
    if kind == Kind.GGUF:
        state, config = load_gguf_state(str(p))
        return StateDictSource(str(p), state, config)
    if kind == Kind.PICKLE:
        if not allow_pickle:
            raise InputError(PICKLE_REFUSAL.format(path=path))
        return _pickle_source(p)
    raise InputError(f"{path}: is a {kind.value.replace('_', ' ')}, not a full model; pass it as TUNED, "
                     "with the model it was trained on as BASE")
