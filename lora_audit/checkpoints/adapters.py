"""The one reader of low-rank adapters: PEFT LoRA folders and kohya/diffusers LoRA files, read,
validated and matched against a base model's parameters.

PEFT (adapter_config.json + adapter_model.safetensors), keys such as
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` (r x in) and
``...lora_B.weight`` (out x r); optionally an adapter name before ``.weight``
(``lora_A.default.weight``). Scale s = lora_alpha / r, or lora_alpha / sqrt(r) with
``use_rslora`` (Kalajdzievski 2023); ``rank_pattern`` / ``alpha_pattern`` override r and alpha
per module with PEFT's matching rule (``pattern_key``: the first key that matches the end of
the module name). Also: DoRA ``lora_magnitude_vector`` (out,);
embedding LoRA ``lora_embedding_A`` (r x vocab), ``lora_embedding_B`` (dim x r) whose delta is
(B A)^T; ``fan_in_fan_out`` (GPT-2 Conv1D, base stored in x out); ``lora_B.bias`` (lora_bias);
``modules_to_save`` (full replacement tensors, saved under the plain module name).

Kohya / diffusers: ``<module>.lora_down.weight`` (A), ``lora_up.weight`` (B), ``.alpha``
(s = alpha / r); 4-D conv factors are flattened to (out x in*kh*kw).

Everything a user can get wrong is checked when the adapter is read, from the config and the
safetensors header alone (no tensor data but kohya's one-number alphas): config field types and
ranges, factor dtypes and dimensions, ranks of A and B and of the config, DoRA magnitude lengths.
``match_adapter`` then checks the adapter against a base's parameter shapes (from a weight file's
header, or a loaded model's ``named_parameters``) with one set of messages for every command.

    af = read_adapter("path/to/adapter")           # AdapterFile
    B, A, magnitude = af.factors(module)           # delta = af.scale(module) * B @ A
    match = match_adapter(af, {name: shape, ...})  # base parameter -> module, or ShapeMismatchError
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import FormatError, InputError, ShapeMismatchError
from ..io import read_user_json
from ..text import printable

if TYPE_CHECKING:
    import torch

# Init methods that rewrite the base weights: the saved adapter is then a delta against a
# MODIFIED base unless it was saved with path_initial_model_for_weight_conversion.
BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga", "eva")
# safetensors dtype names of the floating-point tensors a factor may be stored in.
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")

_PEFT_KEY = re.compile(
    r"^(?P<module>.+?)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
    r"(?:\.(?P<adapter>[^.]+))?(?:\.(?P<param>weight|bias))?$")


# ---- adapter_config.json ----------------------------------------------------------------------
def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _flag(v) -> bool:
    return v is None or isinstance(v, bool)


def _strs(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _pattern(values_ok):
    return lambda v: v is None or (isinstance(v, dict) and all(isinstance(k, str) and values_ok(x)
                                                               for k, x in v.items()))


# field -> (test, what is accepted). Fields not listed are not read by lora-audit.
CONFIG_FIELDS = {
    "peft_type": (lambda v: isinstance(v, str), 'a string (lora-audit reads "LORA")'),
    "r": (lambda v: _int(v) and v > 0, "a positive integer"),
    "lora_alpha": (_finite, "a finite number"),
    "use_rslora": (_flag, "true or false"),
    "use_dora": (_flag, "true or false"),
    "fan_in_fan_out": (_flag, "true or false"),
    "rank_pattern": (_pattern(lambda x: _int(x) and x > 0),
                     "an object mapping module-name patterns to positive integers"),
    "alpha_pattern": (_pattern(_finite), "an object mapping module-name patterns to finite numbers"),
    "target_modules": (lambda v: v is None or isinstance(v, str) or _strs(v), "a string, a list of strings or null"),
    "modules_to_save": (lambda v: v is None or _strs(v), "a list of strings or null"),
    "init_lora_weights": (lambda v: v is None or isinstance(v, (bool, str)), "true, false or an init method's name"),
    "base_model_name_or_path": (lambda v: v is None or isinstance(v, str), "a string or null"),
}


def _shown(v) -> str:
    import json

    s = json.dumps(v, ensure_ascii=False, allow_nan=True)
    return printable(s if len(s) <= 60 else s[:57] + "...")


def validate_adapter_config(config: dict, where: str | os.PathLike) -> dict:
    """Check the fields lora-audit reads (``CONFIG_FIELDS``); FormatError naming the file, the
    field, its value and what is accepted. Returns ``config`` unchanged."""
    for name, (ok, accepted) in CONFIG_FIELDS.items():
        if name in config and not ok(config[name]):
            raise FormatError(f"{where}: field {name!r} is {_shown(config[name])}; it must be {accepted}")
    for name in ("rank_pattern", "alpha_pattern"):
        for key in config.get(name) or {}:
            try:
                re.compile(key)
            except re.error as e:
                raise FormatError(f"{where}: {name} key {printable(key)!r} is not a valid regular expression "
                                  f"({e}); PEFT matches these keys against the end of module names") from None
            if _NESTED_QUANTIFIER.search(key) or len(key) > 1000:
                raise FormatError(f"{where}: {name} key {printable(key)[:80]!r} repeats a group ('(...)*', "
                                  "'(...)+', '(...){n}') or is over 1000 characters: matching such a pattern can "
                                  "take exponential time, so lora-audit does not run it; use plain module names "
                                  "or simple patterns")
    return config


# A quantified group: the ingredient of catastrophic backtracking ("(a+)+$"). PEFT's own patterns
# are module names or simple alternations, which never need one.
_NESTED_QUANTIFIER = re.compile(r"\)[*+{?]")


def pattern_key(keys: list[str], module: str) -> str | None:
    """PEFT's matching rule for rank_pattern / alpha_pattern (``peft.utils.other.get_pattern_key``):
    the first key that matches the end of the module name (a whole dotted suffix), or None. Keys
    were checked by ``validate_adapter_config`` (valid, no quantified groups)."""
    return next((k for k in keys if re.match(rf"(.*\.)?({k})$", module)), None)


def read_adapter_config(folder: str | os.PathLike) -> dict:
    """A PEFT adapter folder's adapter_config.json: a regular UTF-8 file holding a JSON object whose
    fields have the types and ranges PEFT gives them (InputError / FormatError naming the field)."""
    p = Path(folder) / "adapter_config.json"
    return validate_adapter_config(read_user_json(p, "adapter config"), p)


# ---- the adapter file -------------------------------------------------------------------------
@dataclass
class ModuleFactors:
    """Where one adapted module's factors lie in the file (tensor keys; read lazily)."""

    module: str
    A: str | None = None  # key of (r, in), or (r, vocab) for embeddings
    B: str | None = None  # key of (out, r), or (dim, r) for embeddings
    magnitude: str | None = None  # key of DoRA's (out,)
    bias: bool = False
    embedding: bool = False
    alpha: float | None = None  # kohya per-module alpha


@dataclass
class AdapterFile:
    """A read and validated adapter: factored modules, full replacements, its config, warnings.

    ``shapes[module]`` is (rows, cols, r) of the module's delta in the layout ``factors`` returns;
    ``scales[module]`` its scale s (delta = s B A); ``keys`` every tensor key of the file.
    Tensor data is read only by ``tensor`` and ``factors``.
    """

    path: str
    config: dict
    modules: dict[str, ModuleFactors]
    replacements: dict[str, str]  # base param name (module + ".weight") -> tensor key in the file
    keys: list[str]
    warnings: list[str] = field(default_factory=list)
    shapes: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    scales: dict[str, float] = field(default_factory=dict)
    _handle: object = field(default=None, repr=False)  # the safe_open handle

    @property
    def kind(self) -> str:
        return "kohya_lora" if self.config.get("peft_type") == "KOHYA" else "peft_adapter"

    def tensor(self, key: str) -> torch.Tensor:
        """One tensor of the file, as stored."""
        try:
            return self._handle.get_tensor(key)
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise FormatError(f"{self.path}: could not read tensor {printable(key)} ({e})") from None

    def tensor_shape(self, key: str) -> tuple[int, ...]:
        """A tensor's shape, from the header (no data read)."""
        return tuple(self._handle.get_slice(key).get_shape())

    def tensor_dtype(self, key: str) -> str:
        """A tensor's safetensors dtype name ("F32", "BF16", ...), from the header."""
        return self._handle.get_slice(key).get_dtype()

    def factors(self, module: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(B, A, magnitude) with B (rows, r) and A (r, cols) such that delta = B @ A has the
        layout of the stored base tensor for embeddings ((B A)^T is returned as A^T, B^T) and the
        nn.Linear (out, in) layout otherwise (the stream transposes GPT-2 Conv1D bases to match);
        4-D conv factors flattened: A (r, in, kh, kw) -> (r, in*kh*kw), B (out, r, 1, 1) -> (out, r).
        The magnitude is flattened to (rows,)."""
        f = self.modules[module]
        A = self.tensor(f.A)
        B = self.tensor(f.B)
        A = A.reshape(A.shape[0], -1)
        B = B.reshape(B.shape[0], -1)
        mag = self.tensor(f.magnitude).reshape(-1) if f.magnitude is not None else None
        if f.embedding:  # delta = (B A)^T = A^T B^T: rows vocab, cols dim
            return A.T.contiguous(), B.T.contiguous(), mag
        return B, A, mag

    def scale(self, module: str) -> float:
        """s for one module (computed and checked against the weights' rank when read)."""
        return self.scales[module]

    def info(self) -> dict:
        c = self.config
        ranks = sorted({r for (_, _, r) in self.shapes.values()})
        return {"kind": self.kind, "peft_type": c.get("peft_type"), "r": c.get("r"), "ranks": ranks,
                "lora_alpha": c.get("lora_alpha"), "use_rslora": bool(c.get("use_rslora")),
                "use_dora": bool(c.get("use_dora")), "init_lora_weights": c.get("init_lora_weights"),
                "target_modules": c.get("target_modules"), "fan_in_fan_out": bool(c.get("fan_in_fan_out")),
                "rank_pattern": c.get("rank_pattern") or {}, "alpha_pattern": c.get("alpha_pattern") or {},
                "modules_to_save": c.get("modules_to_save"),
                "base_model_name_or_path": c.get("base_model_name_or_path"), "adapted_modules": len(self.modules)}


def _open(path: Path):
    from safetensors import safe_open

    try:
        h = safe_open(str(path), framework="pt")
        return h, list(h.keys())
    except Exception as e:  # noqa: BLE001
        raise FormatError(f"{path}: not a readable safetensors file, truncated or corrupted ({e})") from None


def _strip(key: str) -> str:
    prefix = "base_model.model."
    return key[len(prefix):] if key.startswith(prefix) else key


def read_adapter(path: str | os.PathLike) -> AdapterFile:
    """Read any adapter at a local ``path``: a PEFT folder or a kohya/diffusers .safetensors file."""
    from .detect import Kind, detect

    kind = detect(path)
    if kind == Kind.PEFT_ADAPTER:
        return read_peft_adapter(path)
    if kind == Kind.KOHYA_LORA:
        return read_kohya_lora(path)
    raise InputError(f"{path}: not an adapter (a PEFT folder with adapter_config.json and "
                     "adapter_model.safetensors, or a kohya LoRA .safetensors file); it is a "
                     f"{kind.value.replace('_', ' ')}")


def read_peft_adapter(folder: str | os.PathLike) -> AdapterFile:
    """Read and validate a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors)."""
    from .sources import contained_file

    folder = Path(folder)
    config = read_adapter_config(folder)
    ptype = str(config.get("peft_type", "LORA")).upper()
    if ptype != "LORA":
        raise InputError(f"{folder / 'adapter_config.json'}: peft_type {printable(ptype)} is not supported; "
                         "lora-audit reads LoRA adapters (incl. rsLoRA, DoRA, patterns). Merge it into the model "
                         "and audit the merged folder.")
    st = folder / "adapter_model.safetensors"
    if not st.is_file():
        if (folder / "adapter_model.bin").is_file():
            raise InputError(f"{folder}: the adapter weights are a pickle (adapter_model.bin), which lora-audit does "
                             "not unpickle. Re-save it with save_pretrained(safe_serialization=True).")
        raise InputError(f"{folder}: adapter_config.json but no adapter_model.safetensors")
    handle, keys = _open(contained_file(folder, st.name, "adapter weights"))
    modules: dict[str, ModuleFactors] = {}
    replacements: dict[str, str] = {}
    for key in keys:
        m = _PEFT_KEY.match(_strip(key))
        if m is None:
            name = _strip(key)
            if ".base_layer." not in name:  # base_layer: a copy of the base PEFT saves with embedding adapters
                replacements[name.replace(".modules_to_save.default", "")] = key
            continue
        mod = modules.setdefault(m["module"], ModuleFactors(m["module"]))
        part = m["part"]
        if m["param"] == "bias":
            mod.bias = True
        elif part in ("lora_A", "lora_embedding_A"):
            mod.A = key
        elif part in ("lora_B", "lora_embedding_B"):
            mod.B = key
        else:
            mod.magnitude = key
        mod.embedding = mod.embedding or part.startswith("lora_embedding")
    af = AdapterFile(str(folder), config, modules, replacements, keys, _peft_warnings(config, modules, replacements),
                     _handle=handle)
    _index(af)
    return af


def _peft_warnings(config: dict, modules: dict[str, ModuleFactors], replacements: dict[str, str]) -> list[str]:
    warnings = []
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().split("_niter")[0].split("[")[0] in BASE_REWRITING_INITS:
        warnings.append(f"init_lora_weights={printable(init)!r} rewrites the base weights at initialisation: unless "
                        "this adapter was saved with path_initial_model_for_weight_conversion, it is a delta against "
                        "a MODIFIED base, and the audited W0 + dW is not the model that was trained")
    if any(f.bias for f in modules.values()):
        warnings.append("lora_bias: the adapter also changes biases (not part of the spectral audit)")
    if replacements:
        names = sorted(replacements)
        warnings.append(f"modules_to_save: {len(names)} tensors are full replacements "
                        f"({', '.join(map(printable, names[:4]))}{', ...' if len(names) > 4 else ''})")
    return warnings


def read_kohya_lora(path: str | os.PathLike) -> AdapterFile:
    """Read and validate a kohya/diffusers LoRA file (lora_down / lora_up / alpha per module)."""
    path = Path(path)
    handle, keys = _open(path)
    modules: dict[str, ModuleFactors] = {}
    for key in keys:
        for suffix, part in ((".lora_down.weight", "A"), (".lora_up.weight", "B"), (".alpha", "alpha")):
            if key.endswith(suffix):
                mod = modules.setdefault(key[: -len(suffix)], ModuleFactors(key[: -len(suffix)]))
                if part == "alpha":
                    mod.alpha = _kohya_alpha(path, handle, key)
                else:
                    setattr(mod, part, key)
    if not modules:
        raise FormatError(f"{path}: not a kohya LoRA (no <module>.lora_up.weight / lora_down.weight tensors)")
    af = AdapterFile(str(path), {"peft_type": "KOHYA"}, modules, {}, keys, _handle=handle)
    _index(af)
    return af


def _kohya_alpha(path: Path, handle, key: str) -> float:
    """A module's ``.alpha``: one finite number (the only tensor data read when opening)."""
    sl = handle.get_slice(key)
    shape, dtype = tuple(sl.get_shape()), sl.get_dtype()
    if math.prod(shape) != 1:
        raise FormatError(f"{path}: tensor {printable(key)} has shape {list(shape)}; a kohya alpha must be one number")
    if dtype not in FLOAT_DTYPES and not dtype.startswith(("I", "U")):
        raise FormatError(f"{path}: tensor {printable(key)} is {dtype}; a kohya alpha must be a number")
    value = float(handle.get_tensor(key).double().reshape(-1)[0])
    if not math.isfinite(value):
        raise FormatError(f"{path}: tensor {printable(key)} is {value}; a kohya alpha must be a finite number")
    return value


def _check_factor(af: AdapterFile, module: str, key: str, role: str, dims: tuple[int, ...]) -> tuple[int, ...]:
    """The header shape of one factor, after checking its dtype and number of dimensions."""
    shape, dtype = af.tensor_shape(key), af.tensor_dtype(key)
    where = f"{af.path}: module {printable(module)}: {role} ({printable(key)})"
    if dtype not in FLOAT_DTYPES:
        raise FormatError(f"{where} is stored as {dtype}; factors must be floating point ({', '.join(FLOAT_DTYPES)})")
    if len(shape) not in dims:
        raise FormatError(f"{where} has {len(shape)} dimensions {list(shape)}; expected "
                          + " or ".join(f"{d}" for d in dims))
    if 0 in shape:
        raise FormatError(f"{where} is empty (shape {list(shape)})")
    return shape


def _index(af: AdapterFile) -> None:
    """Validate every module's factors from the header and record af.shapes and af.scales."""
    incomplete = [n for n, f in af.modules.items() if f.A is None or f.B is None]
    if incomplete:
        raise FormatError(f"{af.path}: modules with only one of lora_A / lora_B (lora_down / lora_up): "
                          f"{', '.join(map(printable, incomplete[:5]))}")
    for name, f in af.modules.items():
        dims = (2,) if f.embedding else (2, 4)
        a = _check_factor(af, name, f.A, "lora_A", dims)
        b = _check_factor(af, name, f.B, "lora_B", dims)
        if len(b) == 4 and b[2:] != (1, 1):
            raise FormatError(f"{af.path}: module {printable(name)}: lora_B {list(b)} must be (out, r, 1, 1)")
        if b[1] != a[0]:
            raise FormatError(f"{af.path}: module {printable(name)}: lora_B {list(b)} and lora_A {list(a)} "
                              "ranks differ")
        if f.embedding:  # A (r, vocab), B (dim, r): delta (B A)^T is (vocab, dim)
            af.shapes[name] = (a[1], b[0], a[0])
        else:
            af.shapes[name] = (b[0], math.prod(a[1:]), a[0])
        if f.magnitude is not None:
            m = _check_factor(af, name, f.magnitude, "lora_magnitude_vector", (1, 2, 3, 4))
            rows = af.shapes[name][0]
            if math.prod(m) != rows or sum(d != 1 for d in m) > 1:
                raise FormatError(f"{af.path}: module {printable(name)}: lora_magnitude_vector has shape {list(m)}; "
                                  f"DoRA needs one magnitude per output row ({rows})")
        af.scales[name] = _scale(af, name, a[0])


def _scale(af: AdapterFile, module: str, rank: int) -> float:
    """s for one module: kohya alpha/r, else PEFT's alpha / r or alpha / sqrt(r) (rsLoRA), with
    rank_pattern / alpha_pattern overrides; FormatError when the config's r is not the weights' rank."""
    f = af.modules[module]
    if f.alpha is not None:
        return f.alpha / rank
    cfg = af.config
    r = cfg.get("r", rank)
    alpha = cfg.get("lora_alpha", r)
    rp, ap = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    origin = "r"
    if (key := pattern_key(list(rp), module)) is not None:
        r, origin = rp[key], f"rank_pattern[{key!r}]"
    if (key := pattern_key(list(ap), module)) is not None:
        alpha = ap[key]
    if r != rank:
        raise FormatError(f"{af.path}: module {printable(module)} has rank {rank} in the weights but "
                          f"{printable(origin)} = {r} in adapter_config.json")
    return float(alpha) / (math.sqrt(r) if cfg.get("use_rslora") else r)


# ---- matching an adapter to a base ------------------------------------------------------------
@dataclass
class AdapterMatch:
    """Which base parameter each part of an adapter changes."""

    module_of: dict[str, str]  # base parameter name -> adapter module (factored delta)
    replacement_of: dict[str, str]  # base parameter name -> tensor key of a full replacement


def _oriented(shape: tuple[int, ...], transposed: bool) -> tuple[int, int]:
    if len(shape) == 4:
        shape = (shape[0], shape[1] * shape[2] * shape[3])
    return (shape[1], shape[0]) if transposed else (shape[0], shape[1])


def _match_module(module: str, names: Collection[str], by_last: Mapping[str, list[str]]) -> str | None:
    """The base parameter an adapter module adapts: exact, then with leading name parts dropped
    (adapters made on a wrapped model), then the one base name ending with the module's name."""
    parts = module.split(".")
    for i in range(len(parts)):
        cand = ".".join(parts[i:]) + ".weight"
        if cand in names:
            return cand
    hits = [h for h in by_last.get(parts[-1], []) if h.endswith("." + module + ".weight")]
    return hits[0] if len(hits) == 1 else None


def _more(items: list, shown: int) -> str:
    return f" (and {len(items) - shown} more)" if len(items) > shown else ""


def match_adapter(af: AdapterFile, base_shapes: Mapping[str, tuple[int, ...]], *,
                  transposed: Collection[str] = frozenset(), base: str = "the base model") -> AdapterMatch:
    """Match every module and replacement of ``af`` to a 2-D (or 4-D conv) parameter of the base.

    Args:
        base_shapes: base parameter name -> shape as stored (a weight file's header, or
            ``{n: tuple(p.shape) for n, p in model.named_parameters()}``).
        transposed: base parameters stored (in x out) (GPT-2 Conv1D, see
            ``stream.conv1d_weights``); every other weight must have the delta's (out x in) shape.
        base: how to name the base in messages.

    Raises ShapeMismatchError naming the adapter, the base and the modules when a module has no
    base parameter or a different shape (an adapter made for another base).
    """
    names = {n for n, s in base_shapes.items() if len(s) in (2, 4)}
    by_last: dict[str, list[str]] = {}
    for n in names:
        if n.count(".") >= 1:
            by_last.setdefault(n.split(".")[-2], []).append(n)
    match = AdapterMatch({}, {})
    unmatched, mismatched = [], []
    for module, (rows, cols, r) in af.shapes.items():
        name = _match_module(module, names, by_last)
        if name is None:
            unmatched.append(module)
            continue
        stored = tuple(base_shapes[name])
        want = stored if af.modules[module].embedding else _oriented(stored, name in transposed)
        if (rows, cols) != tuple(want):  # embeddings keep their stored (vocab, dim) layout
            mismatched.append(f"{module}: adapter {rows}x{cols}, base {want[0]}x{want[1]} ({name}, r={r})")
        else:
            match.module_of[name] = module
    for pname, key in af.replacements.items():
        name = pname if pname in names else _match_module(pname.rsplit(".", 1)[0], names, by_last)
        if name is None:
            if pname.endswith(".weight"):
                unmatched.append(pname)
            continue
        shape, stored = af.tensor_shape(key), tuple(base_shapes[name])
        if shape != stored:
            mismatched.append(f"{pname}: replacement {list(shape)}, base {list(stored)} ({name})")
        else:
            match.replacement_of[name] = key
    named = af.config.get("base_model_name_or_path")
    hint = f"; the adapter was made for {printable(named)!r}" if named else "; was it trained on another model?"
    if mismatched:
        raise ShapeMismatchError(f"{af.path}: adapter for another base: shapes differ from {base} on "
                                 f"{len(mismatched)} module(s): {'; '.join(map(printable, mismatched[:5]))}"
                                 f"{_more(mismatched, 5)}{hint}")
    if unmatched:
        raise ShapeMismatchError(f"{af.path}: adapter for another base: {base} does not have {len(unmatched)} "
                                 f"module(s) it changes: {', '.join(map(printable, unmatched[:8]))}"
                                 f"{_more(unmatched, 8)}{hint}")
    return match
