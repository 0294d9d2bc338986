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

import os
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Iterable

import torch

from ..errors import FormatError, InputError
from ..io import read_user_json
from ..text import printable
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


def read_model_config(folder: Path) -> dict:
    """A model folder's config.json as a dict ({} when there is none); InputError when it is not a
    regular UTF-8 file holding a JSON object."""
    p = folder / "config.json"
    return read_user_json(p, "model config") if p.exists() else {}


def _plain_name(name: object) -> bool:
    """A relative name that stays inside its folder: no absolute path, drive letter, backslash or '..'."""
    if not isinstance(name, str) or not name or "\\" in name or "\x00" in name:
        return False
    posix = PurePosixPath(name)
    return not posix.is_absolute() and not PureWindowsPath(name).drive and ".." not in posix.parts


def contained_file(folder: Path, name: str, what: str, named_by: Path | None = None) -> Path:
    """``folder / name`` after checking it cannot lead elsewhere.

    ``name`` must be a plain relative name, and the file it resolves to (symlinks followed) must
    lie inside ``folder``, so that a shard index or a symlink cannot silently swap in another
    model's weights. One exception, the Hugging Face cache layout: in ``<repo>/snapshots/<rev>/``
    every file is a symlink into ``<repo>/blobs/``, which is accepted.
    """
    where = named_by or folder
    if not _plain_name(name):
        raise InputError(f"{where}: names {what} {printable(repr(name))}, which is not a plain file name inside "
                         f"{folder} (absolute paths, '..', backslashes and drive letters are refused)")
    path = folder / name
    root, real = folder.resolve(), path.resolve()
    if real.is_relative_to(root):
        return path
    if root.parent.name == "snapshots" and real.is_relative_to(root.parent.parent / "blobs"):
        return path  # Hugging Face cache: snapshots/<rev>/<file> -> ../../blobs/<hash>
    raise InputError(f"{where}: {what} {printable(name)} resolves to {real}, outside the model folder {root}; "
                     "lora-audit reads only weights inside the folder it is given")


def _folder_source(folder: Path) -> SafetensorsSource:
    """The weights of a model folder, found as transformers finds them: model.safetensors, else the
    shards a model.safetensors.index.json names, else every other *.safetensors file."""
    config = read_model_config(folder)
    index = folder / "model.safetensors.index.json"
    if (folder / "model.safetensors").is_file():
        return SafetensorsSource(str(folder), [contained_file(folder, "model.safetensors", "weight file")],
                                 config=config)
    if index.exists():
        weight_map = read_user_json(index, "shard index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise FormatError(f"{index}: field 'weight_map' must be a non-empty object mapping tensor names to "
                              f"shard file names; got {_json_kind(weight_map)}")
        bad = next(((k, v) for k, v in weight_map.items() if not isinstance(v, str)), None)
        if bad is not None:
            raise FormatError(f"{index}: weight_map[{printable(repr(bad[0]))}] is {_json_kind(bad[1])}; "
                              "it must be a shard file name (a string)")
        files = sorted({contained_file(folder, f, "shard", index) for f in weight_map.values()})
        return SafetensorsSource(str(folder), files, order=list(weight_map), config=config)
    files = sorted(contained_file(folder, p.name, "weight file") for p in folder.glob("*.safetensors")
                   if not p.name.startswith("adapter_"))
    if not files:
        raise InputError(f"{folder}: no *.safetensors weights in this folder")
    return SafetensorsSource(str(folder), files, config=config)


def _json_kind(v: object) -> str:
    """How a JSON value is named in messages."""
    return {type(None): "null", bool: "a boolean", int: "a number", float: "a number", str: "a string",
            list: "a list", dict: "an object"}.get(type(v), type(v).__name__)


def gguf_file(path: str | os.PathLike) -> Path:
    """The GGUF file of ``path``: the file itself, or the one .gguf inside a folder."""
    p = Path(path)
    if p.is_file():
        return p
    return contained_file(p, next(x.name for x in sorted(p.iterdir()) if x.name.lower().endswith(".gguf")),
                          "GGUF file")


def load_gguf_model(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32):
    """A plain causal LM (transformers PreTrainedModel) holding a GGUF file's dequantised weights.

    transformers dequantises a GGUF (and maps llama.cpp names to HF names, undoing the Q/K
    permutation of its converter), but marks the model quantised: it then refuses
    ``save_pretrained`` and peft's LoRA-GA finds no layer it supports. So the weights are handed
    to a model built from the same config without the quantisation mark (sharing the tensors, no
    copy when ``dtype`` is float32). Every command that loads a GGUF whole goes through here.
    """
    from transformers import AutoModelForCausalLM

    gguf = gguf_file(path)
    try:
        marked = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - gguf/transformers raise many types for bad files
        raise FormatError(f"{gguf}: could not read this GGUF file ({str(e).splitlines()[0] if str(e) else e})") \
            from None
    config = marked.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain, info = type(marked).from_pretrained(None, config=config, state_dict=marked.state_dict(), dtype=dtype,
                                               output_loading_info=True)
    lost = [k for k in info["missing_keys"] if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if lost:
        raise FormatError(f"{gguf}: the GGUF file lacks weights the model needs, e.g. {', '.join(sorted(lost)[:3])}")
    return plain


def load_gguf_state(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """A GGUF file's dequantised weights as HF-named tensors, and its config (the whole model: GGUF
    files are quantised, so even dequantised a model that fits a GGUF user's machine fits here)."""
    model = load_gguf_model(path)
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
    return StateDictSource(str(path), state, read_model_config(path if path.is_dir() else path.parent))


HUB_PATTERNS = ("*.json", "*.safetensors", "*.gguf", "tokenizer*", "merges.txt", "*.jinja")


def resolve_hub_id(repo_id: str, patterns: Iterable[str] = HUB_PATTERNS) -> Path:
    """Download the configs, safetensors/GGUF weights and tokenizer files of a hub repo (never
    pickles) into the Hugging Face cache; its local snapshot folder. Needs network."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=list(patterns)))
    except Exception as e:  # noqa: BLE001 - offline, missing repo, auth: all user-facing
        raise InputError(f"{repo_id}: not a local path, and it could not be fetched from the Hugging Face hub "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Offline? Download it "
                         "elsewhere and pass the folder.") from None


def local_path(path: str | os.PathLike) -> tuple[Path, Kind]:
    """The local path of a checkpoint and what it is. A hub id is downloaded first (``resolve_hub_id``:
    no pickle is ever fetched) and its kind detected on the local snapshot, so that a hub adapter is
    an adapter and a hub model with only pickle weights is refused like a local one."""
    kind = detect(path)
    if kind != Kind.HUB_ID:
        return Path(str(path)).expanduser(), kind
    local = resolve_hub_id(str(path))
    try:
        return local, detect(local)
    except InputError:
        raise InputError(f"{path}: the hub repository has no safetensors or GGUF weights and no PEFT adapter "
                         f"that lora-audit fetches ({', '.join(HUB_PATTERNS)}; pickle weights never are)") from None


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
