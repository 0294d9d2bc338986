"""Weight sources: read one named tensor at a time from whatever holds a model's weights.

    SafetensorsSource   HF folder (model.safetensors, or shards + model.safetensors.index.json;
                        diffusers' diffusion_pytorch_model.safetensors likewise), or a bare
                        .safetensors file: memory-mapped with ``safe_open``, one tensor at a time,
                        in the index's order; headers are checked when opened, so a truncated or
                        corrupted file is reported before any work starts.
    PipelineSource      a diffusers pipeline folder (model_index.json): every component folder that
                        holds weights (unet, transformer, text_encoder, ...), its parameter names
                        prefixed with the component ("unet.down_blocks.0...."), as diffusers' own
                        LoRA files name them.
    LogicalSource       weights stored in several pieces, read as one float tensor under the name
                        the model uses: bitsandbytes 4-bit / 8-bit and block-scaled FP8 weights
                        (dequantised, with their error bounds, ``quantized``), and the
                        ``weight_orig`` x ``weight_mask`` pairs of torch.nn.utils.prune (pruned bases).
    StateDictSource     weights that had to be loaded whole: GGUF (dequantised by transformers,
                        which also maps llama.cpp names to HF names and undoes the Q/K
                        permutation of its converter) and, only with ``allow_pickle``,
                        pytorch_model.bin read with ``torch.load(weights_only=True)``.

``open_weights(path)`` picks one; hub ids are downloaded first (safetensors and configs only)
when the machine is online.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path, PurePosixPath, PureWindowsPath

import torch

from ..errors import FormatError, InputError
from ..io import file_kind, read_user_json, user_path
from ..text import printable
from .detect import PICKLE_REFUSAL, Kind, detect, pickle_refused


class WeightSource:
    """A read-only map from parameter name to tensor, read lazily."""

    path: str
    config: dict  # the model's config.json (empty when there is none)
    format: str = "safetensors"  # the layout, as stated in the summary and the JSON

    def names(self) -> list[str]:
        raise NotImplementedError

    def dequantization(self, name: str) -> dict | None:
        """The quantisation error record of a dequantised weight (after ``get``), else None."""
        return None

    def note(self, name: str) -> str | None:
        """How a weight was derived from stored pieces (masks), for the matrix's notes."""
        return None

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def get(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def origin(self, name: str) -> tuple[Path, list[int], str] | None:
        """(file, the file's identity when it was opened, the tensor's name in it) when ``get(name)``
        is that file's stored tensor as it is, memory-mapped from a file whose identity (device,
        inode, size, mtime_ns, ctime_ns: ``lora_audit.cache.file_identity``) did not change while it
        was opened; else None. Lets the spectrum cache find a matrix's content key without reading
        it again while the file is unchanged (``spectral.cache.SpectrumCache.lookup``)."""
        return None

    def stored_dtype(self, name: str) -> str | None:
        """The safetensors dtype name a tensor is stored in ("F8_E4M3", "U8", ...), when known
        without reading it."""
        return None

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
        from ..cache import file_identity

        self._handles = {}
        self._where: dict[str, Path] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._identity: dict[Path, list[int] | None] = {}
        for f in files:
            if not f.is_file():
                raise FormatError(f"{path}: shard {f.name} named in the index is missing")
            try:
                before = file_identity(f)
                h = safe_open(str(f), framework="pt")
                after = file_identity(f)  # the same: the file mapped is the file stat'ed
                self._identity[f] = before if before == after else None
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

    def stored_dtype(self, name: str) -> str | None:
        return self._handles[self._where[name]].get_slice(name).get_dtype()

    def origin(self, name: str) -> tuple[Path, list[int], str] | None:
        f = self._where[name]
        identity = self._identity.get(f)
        return (f, identity, name) if identity is not None else None

    def get(self, name: str) -> torch.Tensor:
        try:
            return self._handles[self._where[name]].get_tensor(name)
        except Exception as e:  # noqa: BLE001
            raise FormatError(f"{self._where[name]}: could not read tensor {name} ({e})") from None


class StateDictSource(WeightSource):
    """Weights already in memory (GGUF, pickle); ``get`` hands out one tensor at a time."""

    def __init__(self, path: str, state: dict[str, torch.Tensor], config: dict | None = None, fmt: str = "state dict"):
        self.path, self.config, self.format = path, config or {}, fmt
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
    try:
        mode = path.stat().st_mode
    except OSError:
        mode = None  # absent: the caller says what is missing
    if mode is not None and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):  # opening a FIFO would wait forever
        raise InputError(f"{where}: {what} {printable(name)} is a {file_kind(mode)}, not a file lora-audit can read")
    root, real = folder.resolve(), path.resolve()
    if real.is_relative_to(root):
        return path
    if root.parent.name == "snapshots" and real.is_relative_to(root.parent.parent / "blobs"):
        return path  # Hugging Face cache: snapshots/<rev>/<file> -> ../../blobs/<hash>
    raise InputError(f"{where}: {what} {printable(name)} resolves to {real}, outside the model folder {root}; "
                     "lora-audit reads only weights inside the folder it is given")


INDEX_FILES = ("model.safetensors.index.json", "diffusion_pytorch_model.safetensors.index.json")
SINGLE_FILES = ("model.safetensors", "diffusion_pytorch_model.safetensors")


def _folder_source(folder: Path) -> SafetensorsSource:
    """The weights of a model folder, found as transformers (and diffusers) find them:
    model.safetensors, else the shards a model.safetensors.index.json names, else every other
    *.safetensors file."""
    config = read_model_config(folder)
    single = next((n for n in SINGLE_FILES if (folder / n).is_file()), None)
    index = next((folder / n for n in INDEX_FILES if (folder / n).exists()), None)
    if single is not None:
        src = SafetensorsSource(str(folder), [contained_file(folder, single, "weight file")], config=config)
    elif index is not None:
        weight_map = read_user_json(index, "shard index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise FormatError(f"{index}: field 'weight_map' must be a non-empty object mapping tensor names to "
                              f"shard file names; got {_json_kind(weight_map)}")
        bad = next(((k, v) for k, v in weight_map.items() if not isinstance(v, str)), None)
        if bad is not None:
            raise FormatError(f"{index}: weight_map[{printable(repr(bad[0]))}] is {_json_kind(bad[1])}; "
                              "it must be a shard file name (a string)")
        files = sorted({contained_file(folder, f, "shard", index) for f in weight_map.values()})
        src = SafetensorsSource(str(folder), files, order=list(weight_map), config=config)
    else:
        files = sorted(contained_file(folder, p.name, "weight file") for p in folder.glob("*.safetensors")
                       if not p.name.startswith("adapter_"))
        if not files:
            raise InputError(f"{folder}: no *.safetensors weights in this folder")
        src = SafetensorsSource(str(folder), files, config=config)
    src.format = folder_format(config)
    return src


def folder_format(config: dict) -> str:
    """"transformers folder (RobertaForMaskedLM)", "diffusers folder (UNet2DConditionModel)", ..."""
    if isinstance(config.get("_class_name"), str):
        return f"diffusers folder ({printable(config['_class_name'])})"
    arch = config.get("architectures")
    if isinstance(arch, list) and arch and isinstance(arch[0], str):
        return f"transformers folder ({printable(arch[0])})"
    return "model folder" + (f" ({printable(config['model_type'])})" if isinstance(config.get("model_type"), str)
                             else "")


class PipelineSource(WeightSource):
    """A diffusers pipeline folder: each component with weights, its names prefixed "<component>."."""

    format = "diffusers pipeline"

    def __init__(self, folder: Path):
        index = read_user_json(folder / "model_index.json", "pipeline index")
        self.path, self.config = str(folder), {"model_index": index, "components": {}}
        self.parts: dict[str, WeightSource] = {}
        for comp in sorted(k for k, v in index.items() if isinstance(v, list) and not k.startswith("_")):
            sub = folder / comp
            if not _plain_name(comp) or not sub.is_dir() or not any(sub.glob("*.safetensors")):
                continue  # schedulers, tokenizers, feature extractors: no weights
            contained_file(folder, comp, "component folder")
            self.parts[comp] = logical(_folder_source(sub))
            self.config["components"][comp] = self.parts[comp].config
        if not self.parts:
            raise InputError(f"{folder}: model_index.json names no component folder with *.safetensors weights")
        self.format = "diffusers pipeline (" + ", ".join(f"{c}: {p.format}" for c, p in self.parts.items()) + ")"
        self._where = {f"{c}.{n}": (c, n) for c, p in self.parts.items() for n in p.names()}

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        comp, n = self._where[name]
        return self.parts[comp].shape(n)

    def get(self, name: str) -> torch.Tensor:
        comp, n = self._where[name]
        return self.parts[comp].get(n)

    def origin(self, name: str) -> tuple[Path, list[int], str] | None:
        comp, n = self._where[name]
        return self.parts[comp].origin(n)

    def dequantization(self, name: str) -> dict | None:
        comp, n = self._where[name]
        return self.parts[comp].dequantization(n)

    def note(self, name: str) -> str | None:
        comp, n = self._where[name]
        return self.parts[comp].note(n)


class LogicalSource(WeightSource):
    """Weights kept as several stored tensors, read as one float tensor under the model's name.

    ``pieces[name] = (reader, stored keys)``; the stored keys are hidden from ``names``. Used for
    bitsandbytes / FP8 quantised weights (``quantized``) and torch.nn.utils.prune masks
    (W = weight_orig * weight_mask)."""

    def __init__(self, inner: WeightSource, pieces: dict, shapes: dict[str, tuple[int, ...]], fmt: str):
        self.path, self.config, self.inner, self.format = inner.path, inner.config, inner, fmt
        self._pieces, self._shapes = pieces, shapes
        hidden = {k for _, keys in pieces.values() for k in keys}
        self._names = [n for n in inner.names() if n not in hidden or n in pieces]
        self._names += [n for n in pieces if n not in set(self._names)]
        self._records: dict[str, dict] = {}

    def names(self) -> list[str]:
        return self._names

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes.get(name) or self.inner.shape(name)

    def origin(self, name: str) -> tuple[Path, list[int], str] | None:
        return None if name in self._pieces else self.inner.origin(name)  # a piece is derived, not stored

    def get(self, name: str) -> torch.Tensor:
        if name not in self._pieces:
            return self.inner.get(name)
        reader, _ = self._pieces[name]
        W, record = reader()
        if record is not None:
            self._records[name] = record
        return W

    def dequantization(self, name: str) -> dict | None:
        return self._records.get(name)

    def note(self, name: str) -> str | None:
        if name in self._pieces and self._pieces[name][1][-1].endswith("weight_mask"):
            return "pruned base: weight_orig x weight_mask (torch.nn.utils.prune)"
        return None


def logical(src: WeightSource) -> WeightSource:
    """``src`` itself, or a LogicalSource when its weights are quantised or masked."""
    from . import quantized as q

    method = q.quant_method(src.config)
    names = set(src.names())
    pieces: dict = {}
    shapes: dict[str, tuple[int, ...]] = {}
    if method is not None:
        _quantized_pieces(src, method, names, pieces, shapes)
    _check_quantised_leftovers(src, method, names, pieces)
    for n in names:
        if n.endswith(".weight_orig") and n[: -len("_orig")] + "_mask" in names:
            w = n[: -len("_orig")]
            pieces[w] = ((lambda a=n, m=w + "_mask": (src.get(a).float() * src.get(m).float(), None)), (n, w + "_mask"))
            shapes[w] = tuple(src.shape(n))
    if not pieces:
        return src
    fmt = src.format + (f", quantised: {method}" if method else "") + (
        ", pruning masks" if any(k[-1].endswith("weight_mask") for _, k in pieces.values()) else "")
    return LogicalSource(src, pieces, shapes, fmt)


def _quantized_pieces(src: WeightSource, method: str, names: set[str], pieces: dict, shapes: dict) -> None:
    """Fill ``pieces``/``shapes`` with the dequantising readers of a quantised folder (FormatError for a
    quant_method lora-audit cannot dequantise)."""
    from . import quantized as q

    where = f"{src.path}"
    if method == "bitsandbytes":
        for n in names:
            qs_keys = [n + "." + q.BNB_QS_PREFIX + t for t in ("nf4", "fp4") if n + "." + q.BNB_QS_PREFIX + t in names]
            if qs_keys:
                state = q.parse_bnb_state(src.get(qs_keys[0]), f"{where}: tensor {printable(qs_keys[0])}")
                aux = {a: n + "." + a for a in q.BNB_4BIT_AUX if n + "." + a in names}
                pieces[n] = ((lambda n=n, st=state, aux=aux: q.dequantize_bnb_4bit(
                    src.get(n), st, {a: src.get(k) for a, k in aux.items()}, f"{where}: {printable(n)}")),
                    (*aux.values(), qs_keys[0], n))
                shapes[n] = state.shape
            elif n.endswith(".weight") and n[: -len(".weight")] + ".SCB" in names:
                scb, fmt_key = n[: -len(".weight")] + ".SCB", n + "_format"
                if fmt_key in names and _int8_format(src.get(fmt_key), f"{where}: {printable(fmt_key)}") != 0:
                    raise FormatError(f"{where}: {printable(fmt_key)} is not 0 (row-major int8); lora-audit reads "
                                      "int8 weights as transformers saves them")
                pieces[n] = ((lambda n=n, scb=scb: q.dequantize_bnb_int8(src.get(n), src.get(scb),
                                                                         f"{where}: {printable(n)}")),
                             (scb, *([fmt_key] if fmt_key in names else []), n))
        return
    if method == "fp8":
        block = (src.config.get("quantization_config") or {}).get("weight_block_size")
        if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
            raise FormatError(f"{where}/config.json: quantization_config.weight_block_size is "
                              f"{printable(repr(block))}; lora-audit reads FP8 with block scales [rows, cols]")
        for n in names:
            if n.endswith(".weight") and n + "_scale_inv" in names:
                pieces[n] = ((lambda n=n: q.dequantize_fp8_blocks(src.get(n), src.get(n + "_scale_inv"),
                                                                  tuple(block), f"{where}: {printable(n)}")),
                             (n + "_scale_inv", n))
        return
    raise FormatError(f"{where}/config.json: quantization_config.quant_method {printable(repr(method))} is not a "
                      "layout lora-audit dequantises; it reads bitsandbytes (4-bit nf4/fp4, 8-bit), fp8 with block "
                      "scales and GGUF. Dequantise the model first (transformers: model.dequantize(), then "
                      "save_pretrained) and audit that folder.")


# Stored dtypes of quantisation codes: a weight in one of them is raw codes, not values.
CODE_DTYPES = ("I8", "U8", "F8_E4M3", "F8_E5M2")
# Tensors that only make sense with a quantization_config (FP8 block scales, LLM.int8 row scales,
# bitsandbytes 4-bit states).
QUANT_TENSOR_ENDINGS = ("weight_scale_inv", ".SCB", ".quant_state.bitsandbytes__nf4", ".quant_state.bitsandbytes__fp4")


def _check_quantised_leftovers(src: WeightSource, method: str | None, names: set[str], pieces: dict) -> None:
    """FormatError instead of auditing raw codes: in a quantised folder, a weight stored as codes
    (``CODE_DTYPES``) that no dequantising reader claimed (an FP8 weight without its
    weight_scale_inv, a packed 4-bit weight without its quant state, an int8 weight without SCB);
    in a folder without quantization_config, quantisation tensors that nothing would apply."""
    if method is None:
        stray = sorted(n for n in names if n.endswith(QUANT_TENSOR_ENDINGS))
        if stray:
            raise FormatError(f"{src.path}: holds quantisation tensors ({', '.join(map(printable, stray[:3]))}"
                              f"{', ...' if len(stray) > 3 else ''}) but config.json has no quantization_config, so "
                              "the weights they scale cannot be dequantised; restore the config's "
                              "quantization_config (quant_method, and weight_block_size for fp8)")
        return
    hidden = {k for _, keys in pieces.values() for k in keys}
    raw = sorted(n for n in names if n.endswith(".weight") and n not in pieces and n not in hidden
                 and len(src.shape(n)) >= 2 and src.stored_dtype(n) in CODE_DTYPES)
    if raw:
        needs = {"fp8": "weight_scale_inv", "bitsandbytes": "quant_state (4-bit) or SCB (int8)"}.get(method, "scales")
        raise FormatError(f"{src.path}: {len(raw)} weight(s) stored as quantisation codes "
                          f"({src.stored_dtype(raw[0])}) have no {needs}: "
                          f"{', '.join(map(printable, raw[:3]))}{', ...' if len(raw) > 3 else ''}; without it "
                          f"the codes cannot be dequantised (quant_method {printable(method)}), and auditing them "
                          "unscaled would be wrong")


def _int8_format(t: torch.Tensor, where: str) -> int:
    """The single stored value of an int8 ``weight_format`` tensor; FormatError unless it is one finite number."""
    if t.numel() != 1 or not bool(torch.isfinite(t.double()).all()):
        raise FormatError(f"{where}: must hold one finite number (0: row-major int8), got {t.numel()} value(s) "
                          f"{list(t.shape)}")
    return int(t.reshape(-1)[0])


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

    from ..progress import quiet_gguf_bars

    gguf = gguf_file(path)
    try:
        with quiet_gguf_bars():
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
            try:
                obj = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                obj = torch.load(str(f), map_location="cpu", weights_only=True)  # the legacy (pre-zip) format
        except Exception as e:  # noqa: BLE001 - refused (UnpicklingError) or unreadable
            raise pickle_refused(f, e) from None
        if not isinstance(obj, dict):
            raise FormatError(f"{f}: expected a state dict, got {type(obj).__name__}")
        state.update(obj)
    return StateDictSource(str(path), state, read_model_config(path if path.is_dir() else path.parent),
                           fmt="pickle (torch.load weights_only=True)")


HUB_PATTERNS = ("*.json", "*.safetensors", "*.gguf", "tokenizer*", "merges.txt", "*.jinja")


def resolve_hub_id(repo_id: str, patterns: Iterable[str] = HUB_PATTERNS) -> Path:
    """The local snapshot of a hub reference (``ORG/NAME`` or ``ORG/NAME@REV``): its configs,
    safetensors/GGUF weights and tokenizer files (never pickles), downloaded into the Hugging Face
    cache unless offline, resolved once per run (``hub.resolve``: the same commit for every stage)."""
    from .hub import resolve

    return resolve(repo_id, patterns).path


def local_path(path: str | os.PathLike) -> tuple[Path, Kind]:
    """The local path of a checkpoint and what it is. A hub id is downloaded first (``resolve_hub_id``:
    no pickle is ever fetched) and its kind detected on the local snapshot, so that a hub adapter is
    an adapter and a hub model with only pickle weights is refused like a local one."""
    kind = detect(path)
    if kind != Kind.HUB_ID:
        return user_path(str(path)), kind
    local = resolve_hub_id(str(path))
    try:
        return local, detect(local)
    except InputError:
        raise InputError(f"{path}: the hub repository has no safetensors or GGUF weights and no PEFT adapter "
                         f"that lora-audit fetches ({', '.join(HUB_PATTERNS)}; pickle weights never are)") from None


# Key prefixes of the single-file checkpoints of the original Stable Diffusion code (LDM / SGM).
SINGLE_FILE_ROOTS = {"model.diffusion_model.": "unet", "cond_stage_model.transformer.": "text_encoder",
                     "conditioner.embedders.0.transformer.": "text_encoder",
                     "conditioner.embedders.1.model.": "text_encoder_2", "first_stage_model.": "vae"}


def single_file_format(names: list[str]) -> str:
    """"single-file Stable Diffusion checkpoint (...)" when the keys carry the original SD prefixes."""
    found = sorted({comp for n in names for root, comp in SINGLE_FILE_ROOTS.items() if n.startswith(root)})
    return f"single-file Stable Diffusion checkpoint ({', '.join(found)})" if found else "safetensors file"


def open_weights(path: str | os.PathLike, *, allow_pickle: bool = False) -> WeightSource:
    """A full set of model weights (not an adapter)."""
    p, kind = local_path(path)
    if kind == Kind.HF_FOLDER:
        return logical(_folder_source(p))
    if kind == Kind.DIFFUSERS_PIPELINE:
        return PipelineSource(p)
    if kind == Kind.SAFETENSORS_FILE:
        src = SafetensorsSource(str(p), [p])
        src.format = single_file_format(src.names())
        return logical(src)
    if kind == Kind.GGUF:
        state, config = load_gguf_state(str(p))
        return StateDictSource(str(p), state, config, fmt="gguf (dequantised by transformers)")
    if kind == Kind.PICKLE:
        if not allow_pickle:
            raise InputError(PICKLE_REFUSAL.format(path=path))
        return _pickle_source(p)
    raise InputError(f"{path}: is a {kind.value.replace('_', ' ')}, not a full model; pass it as TUNED, "
                     "with the model it was trained on as BASE")
