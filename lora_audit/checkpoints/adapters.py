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

PEFT LoRA on parameters (``target_parameters``, peft's ParamWrapper; MoE expert stacks): keys
``<module>.lora_A.weight`` (r*E x in) and ``lora_B.weight`` (out x r*E), one wrapper per targeted
parameter of the module, nested through ``.base_layer``; expert e's factors are
A.reshape(E, r, in)[e] and B.reshape(out, r, E)[:, :, e] (peft's ``ParamWrapper.get_delta_weight``).

Kohya / sd-scripts files: ``<name>.lora_down.weight`` (A), ``lora_up.weight`` (B), ``<name>.alpha``
(s = alpha / r, alpha = r when absent); ``<name>`` is ``lora_unet_`` / ``lora_te_`` / ``lora_te1_``
/ ``lora_te2_`` followed by the module path with dots replaced by underscores (sd-scripts
networks/lora.py), resolved against the base's own module names (``KohyaIndex``), or a dotted
module path. LoCon conv LoRA: A is a conv kernel (r, in, kh, kw), B (out, r, 1, 1), and
dW = B A reshaped to (out, in, kh, kw), analysed as (out x in*kh*kw).

Diffusers LoRA files (``save_lora_weights``: pytorch_lora_weights.safetensors): PEFT keys prefixed
with the pipeline component (``unet.``, ``transformer.``, ``text_encoder.``); r and lora_alpha per
component from the file's ``lora_adapter_metadata`` (a JSON object in the safetensors header),
else alpha = r (diffusers' default) or a ``<module>.alpha`` tensor.

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
from typing import TYPE_CHECKING, Any

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
    "target_parameters": (lambda v: v is None or _strs(v), "a list of strings or null"),
    "modules_to_save": (lambda v: v is None or _strs(v), "a list of strings or null"),
    "exclude_modules": (lambda v: v is None or isinstance(v, str) or _strs(v), "a string, a list of strings or null"),
    "layers_to_transform": (lambda v: v is None or _int(v) or (isinstance(v, list) and all(_int(x) for x in v)),
                            "an integer, a list of integers or null"),
    "layers_pattern": (lambda v: v is None or isinstance(v, str) or _strs(v), "a string, a list of strings or null"),
    "init_lora_weights": (lambda v: v is None or isinstance(v, (bool, str)), "true, false or an init method's name"),
    "base_model_name_or_path": (lambda v: v is None or isinstance(v, str), "a string or null"),
}


def _shown(v) -> str:
    import json

    s = json.dumps(v, ensure_ascii=False, allow_nan=True)
    return printable(s if len(s) <= 60 else s[:57] + "...")


def validate_adapter_config(config: dict, where: str | os.PathLike) -> dict:
    """Check the fields lora-audit reads (``CONFIG_FIELDS``); FormatError naming the file, the
    field, its value and what is accepted, and for every field PEFT reads as a regular expression
    (``REGEX_FIELDS``) one that compiles and cannot backtrack without end. Returns ``config``."""
    for name, (ok, accepted) in CONFIG_FIELDS.items():
        if name in config and not ok(config[name]):
            raise FormatError(f"{where}: field {name!r} is {_shown(config[name])}; it must be {accepted}")
    for name in REGEX_FIELDS:
        value = config.get(name)
        patterns = list(value) if isinstance(value, (dict, list)) else [value] if isinstance(value, str) else []
        if name in ("target_modules", "exclude_modules") and isinstance(value, list):
            continue  # list entries are compared as names, not run as patterns
        for key in patterns:
            _check_pattern(key, f"{where}: {name} {'key' if isinstance(value, dict) else 'pattern'}")
    return config


# The fields PEFT runs as regular expressions: rank_pattern / alpha_pattern keys (matched against the
# end of a module name), target_modules and exclude_modules when a string (the whole name),
# modules_to_save entries and layers_pattern (inside PEFT's own patterns).
REGEX_FIELDS = ("rank_pattern", "alpha_pattern", "target_modules", "exclude_modules", "modules_to_save",
                "layers_pattern")
# A quantified group: the ingredient of catastrophic backtracking ("(a+)+$"). PEFT's own patterns
# are module names or simple alternations, which never need one.
_NESTED_QUANTIFIER = re.compile(r"\)[*+{?]")
MAX_PATTERN_CHARS = 1000
# One match of a config's pattern against one module name. Patterns of real adapters take
# microseconds; several unbounded quantifiers in a row (".*a.*a.*a.*b") still backtrack polynomially
# in the name's length, which no syntactic check rules out, so matching runs under this limit.
PATTERN_SECONDS = 1.0


def _check_pattern(pattern: str, what: str) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        raise FormatError(f"{what} {printable(pattern)[:80]!r} is not a valid regular expression ({e}); PEFT "
                          "matches it against module names") from None
    if _NESTED_QUANTIFIER.search(pattern) or len(pattern) > MAX_PATTERN_CHARS:
        raise FormatError(f"{what} {printable(pattern)[:80]!r} repeats a group ('(...)*', '(...)+', '(...){{n}}') or "
                          f"is over {MAX_PATTERN_CHARS} characters: matching such a pattern can take exponential "
                          "time, so lora-audit does not run it; use plain module names or simple patterns")


def peft_match(pattern: str, name: str, *, full: bool = False, where: str = "adapter_config.json",
               shown: str | None = None):
    """``re.match`` (``full``: ``re.fullmatch``) of a config's pattern, as PEFT runs it, under a time
    limit (``PATTERN_SECONDS``, through the ``regex`` module, which follows ``re``'s syntax):
    FormatError naming the pattern (``shown``: the config's own, when PEFT wraps it) and the module
    name when it takes longer."""
    import regex

    try:
        return (regex.fullmatch if full else regex.match)(pattern, name, timeout=PATTERN_SECONDS)
    except TimeoutError:
        pattern = shown or pattern
        raise FormatError(f"{where}: the pattern {printable(pattern)[:80]!r} takes over {PATTERN_SECONDS:g} s to "
                          f"match the module name {printable(name)[:80]!r} (catastrophic backtracking); lora-audit "
                          "does not run it: use plain module names or simple patterns") from None
    except regex.error as e:
        raise FormatError(f"{where}: the pattern {printable(pattern)[:80]!r} is not a regular expression lora-audit "
                          f"can run ({e})") from None


def pattern_key(keys: list[str], module: str, where: str = "adapter_config.json") -> str | None:
    """PEFT's matching rule for rank_pattern / alpha_pattern (``peft.utils.other.get_pattern_key``):
    the first key that matches the end of the module name (a whole dotted suffix), or None. Keys
    were checked by ``validate_adapter_config`` (valid, no quantified groups)."""
    return next((k for k in keys if peft_match(rf"(.*\.)?({k})$", module, where=where, shown=k)), None)


# ---- which modules PEFT loads ------------------------------------------------------------------
# peft.utils.constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING (peft 0.21; the tests
# compare it with the installed peft): the target_modules PEFT uses when a LoRA config has none,
# by the base's model_type (LoraModel._prepare_adapter_config). Mirrored, not imported: importing
# peft takes seconds.
PEFT_DEFAULT_TARGETS: dict[str, list[str] | str] = {
    "t5": ["q", "v"], "mt5": ["q", "v"], "bart": ["q_proj", "v_proj"], "gpt2": ["c_attn"],
    "bloom": ["query_key_value"], "blip-2": ["q", "v", "q_proj", "v_proj"], "opt": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"], "gpt_neox": ["query_key_value"], "gpt_neo": ["q_proj", "v_proj"],
    "bert": ["query", "value"], "roberta": ["query", "value"], "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"], "deberta-v2": ["query_proj", "value_proj"], "deberta": ["in_proj"],
    "layoutlm": ["query", "value"], "llama": ["q_proj", "v_proj"], "llama4": ["q_proj", "v_proj"],
    "chatglm": ["query_key_value"], "gpt_bigcode": ["c_attn"], "mpt": ["Wqkv"],
    "RefinedWebModel": ["query_key_value"], "RefinedWeb": ["query_key_value"], "falcon": ["query_key_value"],
    "btlm": ["c_proj", "c_attn"], "codegen": ["qkv_proj"], "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"], "stablelm": ["q_proj", "v_proj"], "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "gemma": ["q_proj", "v_proj"], "gemma2": ["q_proj", "v_proj"], "gemma3_text": ["q_proj", "v_proj"],
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)", "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"], "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "rwkv": ["key", "value", "receptance", "output"], "rwkv7": ["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"],
}


def _selects(spec: str | list[str], key: str, where: str = "adapter_config.json") -> bool:
    """PEFT's name rule: a string is a regular expression matching the whole name; a list entry
    matches the name or its last components."""
    if isinstance(spec, str):
        return peft_match(spec, key, full=True, where=where) is not None
    return key in spec or any(key.endswith(f".{t}") for t in spec)


def _layer_selected(config: dict, key: str, where: str = "adapter_config.json") -> bool:
    """``layers_to_transform`` / ``layers_pattern``: the first numbered name component is the layer."""
    layers, pattern = config.get("layers_to_transform"), config.get("layers_pattern")
    if layers is None or layers == []:
        return True
    patterns = [pattern] if isinstance(pattern, str) else list(pattern or [])
    found = (next((m for p in patterns if (m := peft_match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key, where=where,
                                                           shown=p))), None)
             if patterns else re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key))
    if found is None:
        return False
    return int(found["idx"]) == layers if isinstance(layers, int) else int(found["idx"]) in layers


def _targeted(config: dict, key: str, where: str = "adapter_config.json") -> bool:
    """Whether PEFT creates a LoRA layer for module ``key`` from this config (the rule of
    peft.tuners.tuners_utils.check_target_module_exists, plus target_parameters)."""
    if config.get("exclude_modules") and _selects(config["exclude_modules"], key, where):
        return False
    if any(peft_match(rf"(^|.*\.){m}($|\..*)", key, where=where, shown=m) for m in config.get("modules_to_save") or []):
        return False
    params = config.get("target_parameters") or []
    if any(_selects([p], f"{key}.{p.rsplit('.', 1)[-1]}") for p in params):
        return True
    targets = config.get("target_modules")
    if targets is None:
        return False
    if isinstance(targets, str) or key in targets:
        return _selects(targets, key, where)
    return _selects(targets, key, where) and _layer_selected(config, key, where)


def peft_targets(config: dict, model_type: str | None) -> list[str] | str | None:
    """The target_modules PEFT applies: the config's, else PEFT's default for ``model_type``
    (``PEFT_DEFAULT_TARGETS``); None when the config has none and there is no default (PEFT then
    loads only target_parameters, and refuses an adapter that has neither)."""
    targets = config.get("target_modules")
    return targets if targets is not None else PEFT_DEFAULT_TARGETS.get(model_type) if model_type else None


def _loaded_name(f: ModuleFactors) -> str:
    """The module name PEFT matches targets against (a ParamWrapper's, without the nesting's
    ".base_layer")."""
    return f.module[: len(f.module) - len(".base_layer") * f.depth] if f.experts else f.module


def ignored_modules(af: AdapterFile, model_type: str | None) -> dict[str, str]:
    """{module: why} for the modules with weights that PEFT (or diffusers, through PEFT) creates no
    LoRA layer for when it loads the adapter onto a base of ``model_type``: it ignores their
    weights, so the merged model does not have them. Only for configs PEFT builds a LoraConfig
    from; "all-linear" needs the model's layer types and is taken to select every module."""
    out = {}
    for name, f in af.modules.items():
        cfg, local = _config_of(af, _loaded_name(f))
        if not _peft_config(af, cfg):
            continue
        targets = peft_targets(cfg, model_type)
        if isinstance(targets, str) and targets.lower() == "all-linear":
            continue
        if targets is None and not cfg.get("target_parameters"):
            continue  # PEFT refuses the adapter (no target_modules, no default): nothing to compare with
        rule = {**cfg, "target_modules": targets}
        if not _targeted(rule, local, _config_file(af)):
            how = ("target_modules" if cfg.get("target_modules") is not None else
                   f"PEFT's default target_modules for {printable(str(model_type))} ({_shown(targets)}), the "
                   "config having none," if targets is not None else "the config (no target_modules)")
            out[name] = f"{how} does not select it: PEFT creates no LoRA layer there and ignores these weights"
    return out


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
    dora: bool = False  # merged as DoRA (the config's use_dora); no magnitude key: ||W0||_row, as PEFT starts it
    bias: bool = False
    embedding: bool = False
    alpha: float | None = None  # kohya per-module alpha
    experts: int = 0  # a ParamWrapper over a stack of this many experts (0: an ordinary module)
    depth: int = 0  # ParamWrapper nesting: how many ".base_layer" end the module name


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
    _handle: Any = field(default=None, repr=False)  # the safe_open handle (safetensors ships no types for it)
    format: str = "peft_lora"  # "peft_lora" | "kohya_lora" | "diffusers_lora" (stated in the JSON)
    component_configs: dict[str, dict] = field(default_factory=dict)  # diffusers: "unet" -> its LoRA config
    rank_mismatches: list[str] = field(default_factory=list)  # "<module> has rank 4 in the tensors but r = 8"
    metadata_config: bool = False  # diffusers: the file's own LoraConfig is in lora_adapter_metadata

    @property
    def kind(self) -> str:
        return {"peft_lora": "peft_adapter"}.get(self.format, self.format)

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

    def factors(self, module: str, expert: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(B, A, magnitude) with B (rows, r) and A (r, cols) such that delta = B @ A has the
        layout of the stored base tensor for embeddings ((B A)^T is returned as A^T, B^T) and the
        nn.Linear (out, in) layout otherwise (the stream transposes GPT-2 Conv1D bases to match);
        conv factors flattened: A (r, in, k...) -> (r, in*prod(k)), B (out, r, 1...) -> (out, r).
        The magnitude is flattened to (rows,). ``expert`` picks one expert of a ParamWrapper."""
        f = self.modules[module]
        A = self.tensor(f.A)  # type: ignore[arg-type]
        B = self.tensor(f.B)  # type: ignore[arg-type]
        A = A.reshape(A.shape[0], -1)
        B = B.reshape(B.shape[0], -1)
        if f.experts:
            e = 0 if expert is None else expert
            A = A.reshape(f.experts, -1, A.shape[-1])[e]  # (E*r, in) -> (E, r, in) -> (r, in)
            B = B.reshape(B.shape[0], -1, f.experts)[:, :, e]  # (out, r*E) -> (out, r, E) -> (out, r)
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
        out = {"kind": self.kind, "format": self.format, "peft_type": c.get("peft_type"), "r": c.get("r"),
               "ranks": ranks,
               "lora_alpha": c.get("lora_alpha"), "use_rslora": bool(c.get("use_rslora")),
               "use_dora": bool(c.get("use_dora")), "init_lora_weights": c.get("init_lora_weights"),
               "target_modules": c.get("target_modules"), "fan_in_fan_out": bool(c.get("fan_in_fan_out")),
               "rank_pattern": c.get("rank_pattern") or {}, "alpha_pattern": c.get("alpha_pattern") or {},
               "modules_to_save": c.get("modules_to_save"),
               "base_model_name_or_path": c.get("base_model_name_or_path"), "adapted_modules": len(self.modules)}
        if c.get("target_parameters"):
            out["target_parameters"] = c["target_parameters"]
        if self.component_configs:
            out["components"] = {k: {f: v.get(f) for f in ("r", "lora_alpha", "use_rslora")}
                                 for k, v in self.component_configs.items()}
        return out


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
    """Read any single adapter at a local ``path``: a PEFT folder, a kohya/sd-scripts .safetensors file
    or a diffusers LoRA file (or a folder holding pytorch_lora_weights.safetensors). Adapter sets
    (MixLoRA, X-LoRA: several LoRA experts and a router) are read by ``adapter_sets.read_adapter_set``."""
    from .detect import Kind, detect

    kind = detect(path)
    if kind == Kind.PEFT_ADAPTER:
        return read_peft_adapter(path)
    if kind == Kind.KOHYA_LORA:
        return read_kohya_lora(path)
    if kind == Kind.DIFFUSERS_LORA:
        return read_diffusers_lora(path)
    raise InputError(f"{path}: not an adapter (a PEFT folder with adapter_config.json and "
                     "adapter_model.safetensors, a kohya LoRA .safetensors file or a diffusers LoRA file); it is a "
                     f"{kind.value.replace('_', ' ')}")


def _peft_modules(keys: list[str], strip) -> tuple[dict[str, ModuleFactors], dict[str, str]]:
    """(modules, replacements) from PEFT-style keys; ``strip`` maps a key to its module path."""
    modules: dict[str, ModuleFactors] = {}
    replacements: dict[str, str] = {}
    for key in keys:
        m = _PEFT_KEY.match(strip(key))
        if m is None:
            name = strip(key)
            if ".base_layer." not in name and not name.endswith(".alpha"):  # base_layer: a copy PEFT saves
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
    return modules, replacements


def read_peft_adapter(folder: str | os.PathLike) -> AdapterFile:
    """Read and validate a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors)."""
    from .sources import contained_file

    folder = Path(folder)
    config = read_adapter_config(folder)
    ptype = str(config.get("peft_type", "LORA")).upper()
    if ptype in ADAPTER_SET_TYPES:
        raise InputError(f"{folder / 'adapter_config.json'}: peft_type {ptype} is a set of LoRA experts with a "
                         "router; read it with adapter_sets.read_adapter_set (lora-audit spectrum does)")
    if ptype != "LORA":
        raise InputError(f"{folder / 'adapter_config.json'}: peft_type {printable(ptype)} is not supported; "
                         "lora-audit reads LoRA adapters (incl. rsLoRA, DoRA, patterns) and the LoRA expert sets "
                         f"{', '.join(ADAPTER_SET_TYPES)}. Merge it into the model and audit the merged folder.")
    st = folder / "adapter_model.safetensors"
    if not st.is_file():
        if (folder / "adapter_model.bin").is_file():
            raise InputError(f"{folder}: the adapter weights are a pickle (adapter_model.bin), which lora-audit does "
                             "not unpickle. Re-save it with save_pretrained(safe_serialization=True).")
        raise InputError(f"{folder}: adapter_config.json but no adapter_model.safetensors")
    handle, keys = _open(contained_file(folder, st.name, "adapter weights"))
    modules, replacements = _peft_modules(keys, _strip)
    _mark_param_wrappers(modules, config)
    af = AdapterFile(str(folder), config, modules, replacements, keys, _peft_warnings(config, modules, replacements),
                     _handle=handle)
    _index(af)
    return af


# peft_type values of adapter sets (several LoRA experts and a router), read by adapter_sets.
ADAPTER_SET_TYPES = ("MIXLORA", "XLORA")


def _mark_param_wrappers(modules: dict[str, ModuleFactors], config: dict) -> None:
    """Flag the modules that are peft ParamWrappers (``target_parameters``): their name, without the
    ".base_layer" that nesting adds, ends with a targeted parameter's module path."""
    targets = [t.rsplit(".", 1)[0] for t in config.get("target_parameters") or [] if "." in t]
    for name, f in modules.items():
        bare = name
        while bare.endswith(".base_layer"):
            bare, f.depth = bare[: -len(".base_layer")], f.depth + 1
        if any(bare == t or bare.endswith("." + t) for t in targets):
            f.experts = -1  # resolved to the number of experts in _index, from the rank
        else:
            f.depth = 0


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


KOHYA_PARTS = ((".lora_down.weight", "A"), (".lora_up.weight", "B"), (".alpha", "alpha"))


def read_kohya_lora(path: str | os.PathLike) -> AdapterFile:
    """Read and validate a kohya/sd-scripts LoRA file (lora_down / lora_up / alpha per module, LoCon
    conv kernels included); FormatError naming keys of any other kind (LoHa, LoKr, DoRA scales, ...)."""
    from .detect import UNREAD_LAYOUTS

    path = Path(path)
    handle, keys = _open(path)
    modules: dict[str, ModuleFactors] = {}
    other = []
    for key in keys:
        for suffix, part in KOHYA_PARTS:
            if key.endswith(suffix):
                mod = modules.setdefault(key[: -len(suffix)], ModuleFactors(key[: -len(suffix)]))
                if part == "alpha":
                    mod.alpha = _kohya_alpha(path, handle, key)
                else:
                    setattr(mod, part, key)
                break
        else:
            other.append(key)
    if not modules:
        raise FormatError(f"{path}: not a kohya LoRA (no <module>.lora_up.weight / lora_down.weight tensors)")
    if other:
        kinds = sorted({name for k in other for end, name in UNREAD_LAYOUTS.items() if f".{end}" in k})
        raise FormatError(f"{path}: {len(other)} tensors are not kohya LoRA factors (lora_down.weight, "
                          f"lora_up.weight, alpha), e.g. {', '.join(map(printable, other[:3]))}"
                          + (f" ({', '.join(kinds)})" if kinds else "") + "; lora-audit reads plain LoRA and LoCon")
    af = AdapterFile(str(path), {"peft_type": "KOHYA"}, modules, {}, keys, _handle=handle, format="kohya_lora")
    _index(af)
    return af


def read_diffusers_lora(path: str | os.PathLike) -> AdapterFile:
    """Read a diffusers LoRA file (PEFT keys prefixed by pipeline component, no adapter_config.json):
    r / lora_alpha per component from the header's ``lora_adapter_metadata``, else ``<module>.alpha``
    tensors, else alpha = r (scale 1, diffusers' default; stated as a warning)."""
    from .detect import DIFFUSERS_LORA_FILE
    from .sources import contained_file

    path = Path(path)
    if path.is_dir():
        path = contained_file(path, DIFFUSERS_LORA_FILE, "LoRA weights")
    handle, keys = _open(path)
    modules, replacements = _peft_modules(keys, _strip)
    for key in keys:
        if key.endswith(".alpha") and key[: -len(".alpha")] in modules:
            modules[key[: -len(".alpha")]].alpha = _kohya_alpha(path, handle, key)
    own, components = _diffusers_metadata(path, handle)
    af = AdapterFile(str(path), {"peft_type": "LORA", **own}, modules, replacements, keys, _handle=handle,
                     format="diffusers_lora", component_configs=components, metadata_config=bool(own))
    if not own and not components and not any(f.alpha is not None for f in modules.values()):
        af.warnings.append("no lora_adapter_metadata and no alpha tensors: scale 1 (alpha = r), diffusers' default")
    _index(af)
    return af


def _diffusers_metadata(path: Path, handle) -> tuple[dict, dict[str, dict]]:
    """(the file's own LoRA config, {component: its LoRA config}) from the header's
    ``lora_adapter_metadata``: a model's ``save_lora_adapter`` writes its LoraConfig as it is ("r",
    "lora_alpha", ...), a pipeline's ``save_lora_weights`` each component's under "<component>.<field>"."""
    from ..io import parse_json

    raw = (handle.metadata() or {}).get("lora_adapter_metadata")
    if raw is None:
        return {}, {}
    flat = parse_json(raw, f"{path} (header field lora_adapter_metadata)")
    if not isinstance(flat, dict):
        raise FormatError(f"{path}: header field lora_adapter_metadata must be a JSON object")
    own: dict = {}
    out: dict[str, dict] = {}
    for key, value in flat.items():
        comp, _, fld = key.partition(".")
        if fld:
            out.setdefault(comp, {})[fld] = value
        else:
            own[key] = value
    validate_adapter_config(own, f"{path} (lora_adapter_metadata)")
    for comp, cfg in out.items():
        validate_adapter_config(cfg, f"{path} (lora_adapter_metadata, {printable(comp)})")
    return own, out


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
                          + (" or ".join(f"{d}" for d in dims) if len(dims) < 3 else f"{dims[0]} to {dims[-1]}"))
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
        where = f"{af.path}: module {printable(name)}"
        dims = (2,) if f.embedding or f.experts else (2, 3, 4, 5)  # 3 to 5: conv kernels (Conv1d/2d/3d)
        a = _check_factor(af, name, f.A, "lora_A", dims)  # type: ignore[arg-type]
        b = _check_factor(af, name, f.B, "lora_B", dims)  # type: ignore[arg-type]
        if len(a) != len(b) or any(d != 1 for d in b[2:]):
            raise FormatError(f"{where}: lora_B {list(b)} does not fit lora_A {list(a)}: a conv LoRA has lora_A "
                              "(r, in, k...) and lora_B (out, r, 1...), a linear one two 2-D factors")
        rank = a[0]
        if f.experts:
            r = _config_rank(af, name, a[0])
            if a[0] % r or b[1] != a[0]:
                raise FormatError(f"{where}: a LoRA on a parameter of E experts has lora_A (r*E, in) and lora_B "
                                  f"(out, r*E); got {list(a)} and {list(b)} with r = {r}")
            f.experts, rank = a[0] // r, r
        elif b[1] != a[0]:
            raise FormatError(f"{where}: lora_B {list(b)} and lora_A {list(a)} ranks differ")
        if f.embedding:  # A (r, vocab), B (dim, r): delta (B A)^T is (vocab, dim)
            af.shapes[name] = (a[1], b[0], a[0])
        else:
            af.shapes[name] = (b[0], math.prod(a[1:]), rank)
        if f.magnitude is not None:
            m = _check_factor(af, name, f.magnitude, "lora_magnitude_vector", (1, 2, 3, 4))
            rows = af.shapes[name][0]
            if math.prod(m) != rows or sum(d != 1 for d in m) > 1:
                raise FormatError(f"{where}: lora_magnitude_vector has shape {list(m)}; "
                                  f"DoRA needs one magnitude per output row ({rows})")
        af.scales[name] = _scale(af, name, rank)
    _dora_as_loaded(af)


def _dora_as_loaded(af: AdapterFile) -> None:
    """Which modules are merged as DoRA, as the loader merges them: PEFT (and diffusers with a
    LoraConfig in the metadata) follow the config's ``use_dora``, ignoring magnitude tensors without
    it, and start the magnitude of a DoRA module without one at ||W0 + s B0 A0||_row, which is
    ||W0||_row when B starts at zero (``DoraLinearLayer.update_layer``); diffusers without a config
    uses DoRA when the file has magnitudes. Each departure from the file is stated in the warnings."""
    ignored, from_base = [], []
    for name, f in af.modules.items():
        cfg, _ = _config_of(af, name)
        if af.format == "kohya_lora":
            f.dora = False
        elif af.format == "diffusers_lora" and "use_dora" not in cfg:
            f.dora = f.magnitude is not None
        else:
            f.dora = bool(cfg.get("use_dora"))
        if f.magnitude is not None and not f.dora:
            ignored.append(name)
            f.magnitude = None
        elif f.dora and f.magnitude is None:
            from_base.append(name)
    if ignored:
        af.warnings.append(f"{len(ignored)} module(s) have DoRA magnitude vectors but the config does not set "
                           f"use_dora, so PEFT ignores them and merges plain LoRA (audited so): "
                           f"{', '.join(map(printable, ignored[:4]))}{_more(ignored, 4)}")
    if from_base:
        random_init = af.config.get("init_lora_weights") is False
        af.warnings.append(f"use_dora is set but {len(from_base)} module(s) have no lora_magnitude_vector: PEFT then "
                           "starts the magnitude from the base weight's row norms ||W0||_row and merges DoRA with it "
                           "(audited so; this is not the plain LoRA update B A)"
                           + (". With init_lora_weights false PEFT's magnitude also depends on the random "
                              "initial factors, so PEFT's result is not reproducible" if random_init else "")
                           + f": {', '.join(map(printable, from_base[:4]))}{_more(from_base, 4)}")


def _config_file(af: AdapterFile) -> str:
    """Where an adapter's config is, for messages."""
    return str(Path(af.path) / "adapter_config.json") if af.format == "peft_lora" else af.path


def _config_of(af: AdapterFile, module: str) -> tuple[dict, str]:
    """(the LoRA config that governs ``module``, the module name its patterns are matched against):
    a diffusers file's per-component config, else the adapter's."""
    comp, _, rest = module.partition(".")
    if comp in af.component_configs and rest:
        return af.component_configs[comp], rest
    return af.config, module


# LoraConfig's defaults (peft.tuners.lora.config.LoraConfig): what PEFT uses for a field the config
# leaves out, in adapter_config.json and in diffusers' lora_adapter_metadata alike.
PEFT_DEFAULT_R = 8
PEFT_DEFAULT_ALPHA = 8


def _pattern_rank(cfg: dict, module: str, default: int, where: str) -> tuple[int, str]:
    rp = cfg.get("rank_pattern") or {}
    if (key := pattern_key(list(rp), module, where)) is not None:
        return rp[key], f"rank_pattern[{key!r}]"
    if "r" not in cfg:
        return default, "r (absent: PEFT's default)"
    return cfg["r"], "r"


def _peft_config(af: AdapterFile, cfg: dict) -> bool:
    """Whether ``cfg`` becomes a peft LoraConfig when the adapter is loaded (LoraConfig's defaults
    apply to what it leaves out): a PEFT folder's config, or diffusers' lora_adapter_metadata."""
    if af.format == "diffusers_lora":
        return cfg is not af.config or af.metadata_config
    return af.format == "peft_lora"


def _config_rank(af: AdapterFile, module: str, default: int) -> int:
    cfg, name = _config_of(af, module)
    return _pattern_rank(cfg, name, PEFT_DEFAULT_R if _peft_config(af, cfg) else default, _config_file(af))[0]


def _scale(af: AdapterFile, module: str, rank: int) -> float:
    """s for one module: kohya alpha/r, else PEFT's alpha / r or alpha / sqrt(r) (rsLoRA), with
    rank_pattern / alpha_pattern overrides and LoraConfig's defaults for absent fields. A config r
    that is not the weights' rank (PEFT cannot load such an adapter) is recorded in
    ``af.rank_mismatches`` (structural finding LA023) and the weights' rank is used."""
    f = af.modules[module]
    if f.alpha is not None:
        return f.alpha / rank
    cfg, name = _config_of(af, module)
    peft = _peft_config(af, cfg)
    r, origin = _pattern_rank(cfg, name, PEFT_DEFAULT_R if peft else rank, _config_file(af))
    alpha = cfg.get("lora_alpha", PEFT_DEFAULT_ALPHA if peft else r)
    ap = cfg.get("alpha_pattern") or {}
    if (key := pattern_key(list(ap), name, _config_file(af))) is not None:
        alpha = ap[key]
    if r != rank:
        af.rank_mismatches.append(f"{printable(module)} has rank {rank} in the tensors but {printable(origin)} = {r}")
        r = rank
    return float(alpha) / (math.sqrt(r) if cfg.get("use_rslora") else r)


# ---- matching an adapter to a base ------------------------------------------------------------
@dataclass
class AdapterMatch:
    """Which base matrix each part of an adapter changes (names as ``layout.plan_matrices`` gives them)."""

    module_of: dict[str, str]  # matrix name -> adapter module (factored delta)
    replacement_of: dict[str, str]  # base parameter name -> tensor key of a full replacement
    expert_of: dict[str, int] = field(default_factory=dict)  # matrix -> expert of a ParamWrapper module
    flipped: set[str] = field(default_factory=set)  # matrices whose B A is the transpose of the analysed matrix
    new_modules: list[str] = field(default_factory=list)  # modules_to_save tensors the base lacks (new heads)
    skipped: dict[str, str] = field(default_factory=dict)  # adapter module -> why it is not audited


# kohya prefix -> (pipeline component, where that component's modules live in a base: a diffusers
# pipeline folder, a single-file SD / SDXL checkpoint, or the component's own folder).
KOHYA_ROOTS = (("lora_unet_", "unet", ("unet.", "transformer.", "model.diffusion_model.", "")),
               ("lora_te1_", "text_encoder", ("text_encoder.", "conditioner.embedders.0.transformer.", "")),
               ("lora_te2_", "text_encoder_2", ("text_encoder_2.", "conditioner.embedders.1.model.")),
               ("lora_te3_", "text_encoder_3", ("text_encoder_3.",)),
               ("lora_te_", "text_encoder", ("text_encoder.", "cond_stage_model.transformer.", "")))


class KohyaIndex:
    """Resolves kohya module names (a prefix, then the module path with "." replaced by "_") against
    a base's parameter names. The replacement cannot be undone by string surgery (``down_blocks_0``
    is ``down_blocks.0``), so every base module path is underscored and looked up; a name two base
    modules share is an error."""

    def __init__(self, names: Collection[str]):
        self.names = [n for n in names if n.endswith(".weight")]
        self._maps: dict[str, tuple[dict[str, str], set[str]]] = {}

    @staticmethod
    def prefix(module: str) -> tuple[str, str, tuple[str, ...]] | None:
        return next((entry for entry in KOHYA_ROOTS if module.startswith(entry[0])), None)

    def _map(self, root: str) -> tuple[dict[str, str], set[str]]:
        if root not in self._maps:
            found, dup = {}, set()
            for n in self.names:
                if n.startswith(root):
                    key = n[len(root): -len(".weight")].replace(".", "_")
                    if key in found:
                        dup.add(key)
                    found[key] = n
            self._maps[root] = (found, dup)
        return self._maps[root]

    def resolve(self, module: str, where: str) -> str | None:
        """The base parameter of a kohya module: its underscored path under one of the prefix's roots,
        else the one base module whose underscored path ends the kohya name (a base saved without
        a wrapper level the trainer's model had: ``text_model.`` of CLIPTextModel in transformers 5)."""
        entry = self.prefix(module)
        if entry is None:
            return None
        rest = module[len(entry[0]):]
        for root in entry[2]:
            found, dup = self._map(root)
            if rest in dup:
                same = [n for n in self.names if n.startswith(root) and n[len(root): -7].replace(".", "_") == rest]
                raise FormatError(f"{where}: kohya module {printable(module)} names two base modules "
                                  f"({', '.join(map(printable, same[:2]))}); the layout is ambiguous")
            if rest in found:
                return found[rest]
        for root in entry[2]:
            found, _ = self._map(root)
            ends = [k for k in found if rest.endswith("_" + k)]
            if ends:
                longest = max(ends, key=len)
                if sum(len(k) == len(longest) for k in ends) == 1:
                    return found[longest]
        return None


def _match_module(module: str, names: Collection[str], by_last: Mapping[str, list[str]],
                  leaf: str = "weight") -> str | None:
    """The base parameter ``<module>.<leaf>`` an adapter module adapts (or a modules_to_save tensor
    replaces): exact, then with leading name parts dropped (adapters made on a wrapped model), then
    the one base name ending with it. The leaf is kept: a saved bias is never matched to a weight."""
    parts = module.split(".")
    for i in range(len(parts)):
        cand = ".".join(parts[i:]) + "." + leaf
        if cand in names:
            return cand
    hits = [h for h in by_last.get(parts[-1], []) if h.endswith(f".{module}.{leaf}")]
    return hits[0] if len(hits) == 1 else None


def _more(items: list, shown: int) -> str:
    return f" (and {len(items) - shown} more)" if len(items) > shown else ""


def _wrapped_params(af: AdapterFile, module: str, shapes: Mapping[str, tuple[int, ...]],
                    children: Mapping[str, list[str]]) -> list[tuple[str, bool]]:
    """The base parameters a ParamWrapper module may adapt, each with whether the stored delta is
    B A (peft's swapped (experts, out, in) layout) rather than (B A)^T, by shape; several fits (equal
    shapes) are narrowed by nesting: peft wraps in ``target_parameters`` order, innermost first."""
    f = af.modules[module]
    rows, cols, _ = af.shapes[module]
    bare = module[: len(module) - len(".base_layer") * f.depth]
    parts = bare.split(".")
    owner = next((".".join(parts[i:]) for i in range(len(parts)) if ".".join(parts[i:]) in children), None)
    leaves = [t.rsplit(".", 1)[-1] for t in af.config.get("target_parameters") or []]
    fits = []
    for p in children.get(owner, []):  # type: ignore[arg-type]
        s = tuple(shapes[p])
        if p.rsplit(".", 1)[-1] not in leaves:
            continue
        if len(s) == 3 and s[0] == f.experts and (rows, cols) in (s[1:], s[:0:-1]):
            fits.append((p, (rows, cols) == s[1:]))
        elif len(s) == 2 and f.experts == 1 and (rows, cols) == s:
            fits.append((p, True))
    if len(fits) > 1:
        wrappers = sum(1 for m, g in af.modules.items() if g.experts and m.startswith(bare) and
                       m[len(bare):].replace(".base_layer", "") == "")
        order = sorted(fits, key=lambda x: leaves.index(x[0].rsplit(".", 1)[-1]))
        pick = wrappers - 1 - f.depth
        fits = [order[pick]] if 0 <= pick < len(order) else fits
    return fits


def match_adapter(af: AdapterFile, base_shapes: Mapping[str, tuple[int, ...]], *,
                  transposed: Collection[str] | None = None, base: str = "the base model",
                  config: Mapping | None = None) -> AdapterMatch:
    """Match every module and replacement of ``af`` to a matrix of the base (``layout.plan_matrices``:
    2-D weights, conv kernels, experts of fused stacks).

    Args:
        base_shapes: base parameter name -> shape as stored (a weight file's header, or
            ``{n: tuple(p.shape) for n, p in model.named_parameters()}``).
        transposed: base parameters stored (in x out) (GPT-2 Conv1D, see
            ``layout.conv1d_weights``; default: from ``config``'s model type); every other weight
            must have the delta's (out x in) shape.
        base: how to name the base in messages.
        config: the base's config (model type, hidden size for fused expert stacks).

    Raises ShapeMismatchError naming the adapter, the base and the modules when a module has no
    base parameter or a different shape (an adapter made for another base; one trained on a pruned
    base is named as such). Kohya modules of a pipeline component the base does not hold (text
    encoder modules against a UNet folder), and modules whose weights PEFT ignores when it loads
    the adapter (``ignored_modules``: target_modules, or PEFT's default for the base's model type,
    does not select them) are reported in ``skipped``, not refused.
    """
    from .layout import plan_matrices

    plan, plan_skipped = plan_matrices(base_shapes, config or {}, include_embeddings=True, transposed=transposed)
    names = {m.param for m in plan.values() if m.expert is None} | set(plan_skipped)
    names = {n for n in names if n in base_shapes}
    by_last: dict[str, list[str]] = {}
    children: dict[str, list[str]] = {}
    for n in base_shapes:
        if n.count(".") >= 1:
            by_last.setdefault(n.split(".")[-2], []).append(n)
            children.setdefault(n.rsplit(".", 1)[0], []).append(n)
    kohya = KohyaIndex(names) if af.format == "kohya_lora" else None
    match = AdapterMatch({}, {})
    unmatched: list[str] = []
    mismatched: list[str] = []
    ignored = ignored_modules(af, (config or {}).get("model_type"))
    for module, (rows, cols, r) in af.shapes.items():
        f = af.modules[module]
        if module in ignored:
            match.skipped[module] = ignored[module]
            continue
        if f.experts:
            _match_experts(af, module, base_shapes, children, plan, plan_skipped, match, mismatched)
            continue
        name = (kohya.resolve(module, af.path) if kohya and KohyaIndex.prefix(module) else None) or \
            _match_module(module, names, by_last)
        if name is None:
            unmatched.append(module)
        elif name not in plan:
            match.skipped[module] = plan_skipped.get(name, "not a matrix")
        else:
            want = tuple(base_shapes[name]) if f.embedding else plan[name].shape
            if (rows, cols) != tuple(want[:2]):  # embeddings keep their stored (vocab, dim) layout
                mismatched.append(f"{module}: adapter {rows}x{cols}, base {want[0]}x{want[1]} ({name}, r={r})"
                                  + _pruned_hint(rows, cols, want))
            else:
                match.module_of[name] = module
    _match_replacements(af, base_shapes, by_last, match, unmatched, mismatched)
    if match.module_of and unmatched:
        unmatched = _new_modules(unmatched, base_shapes, match)
    if kohya is not None:
        unmatched = _kohya_missing_components(unmatched, af, match)
    named = af.config.get("base_model_name_or_path")
    hint = f"; the adapter was made for {printable(named)!r}" if named else "; was it trained on another model?"
    if mismatched:
        raise ShapeMismatchError(f"{af.path}: adapter for another base: shapes differ from {base} on "
                                 f"{len(mismatched)} module(s): {'; '.join(map(printable, mismatched[:5]))}"
                                 f"{_more(mismatched, 5)}{hint}")
    if unmatched:
        raise ShapeMismatchError(f"{af.path}: adapter for another base: {base} does not have {len(unmatched)} "
                                 f"module(s) it changes: {', '.join(map(printable, unmatched[:8]))}"
                                 f"{_more(unmatched, 8)}{hint}{_layout_hint(unmatched, names)}")
    return match


def _pruned_hint(rows: int, cols: int, want: tuple[int, ...]) -> str:
    """Say so when the adapter is smaller than the base on one side: trained on a pruned base."""
    if (rows <= want[0] and cols <= want[1]) and (rows, cols) != tuple(want[:2]):
        return (" [smaller than the base: an adapter trained on a structurally pruned base (LoRAPrune, LoRAM)? "
                "Recover it to the full shape with the pruning indices, or audit it against the pruned base]")
    return ""


def _match_experts(af, module, base_shapes, children, plan, plan_skipped, match: AdapterMatch,
                   mismatched: list[str]) -> None:
    """A ParamWrapper module: one matrix per expert of the stack it adapts."""
    rows, cols, r = af.shapes[module]
    fits = _wrapped_params(af, module, base_shapes, children)
    if len(fits) != 1:
        what = "no" if not fits else f"{len(fits)}"
        mismatched.append(f"{module}: LoRA on a parameter of {af.modules[module].experts} experts, {rows}x{cols} "
                          f"per expert (r={r}), fits {what} base parameter(s) of its module")
        return
    param, stored_is_ba = fits[0]
    experts = af.modules[module].experts
    keys = [f"{param}[{e}]" for e in range(experts)] if len(base_shapes[param]) == 3 else [param]
    if keys[0] not in plan:
        match.skipped[module] = plan_skipped.get(param, "not a matrix")
        return
    for e, key in enumerate(keys):
        match.module_of[key] = module
        match.expert_of[key] = e
        if stored_is_ba == plan[key].transposed:
            match.flipped.add(key)


def _match_replacements(af, base_shapes, by_last, match: AdapterMatch, unmatched, mismatched) -> None:
    """modules_to_save tensors: full replacements of base weights, or new weights (heads) the base
    lacks, which are reported and not audited."""
    saved = [m for m in af.config.get("modules_to_save") or []]
    for pname, key in af.replacements.items():
        module, _, leaf = pname.rpartition(".")
        name = pname if pname in base_shapes else _match_module(module, base_shapes, by_last, leaf) if module else None
        if name is None:
            if any(pname == s or pname.startswith(s + ".") or f".{s}." in f".{pname}" for s in saved):
                match.new_modules.append(pname)
            elif pname.endswith(".weight"):
                unmatched.append(pname)
            continue
        shape, stored = af.tensor_shape(key), tuple(base_shapes[name])
        if shape != stored:
            mismatched.append(f"{pname}: replacement {list(shape)}, base {list(stored)} ({name})")
        else:
            match.replacement_of[name] = key


_INDEX = re.compile(r"\.\d+(?=\.|$)")


def _new_modules(unmatched: list[str], base_shapes: Mapping[str, tuple[int, ...]], match: AdapterMatch) -> list[str]:
    """LoRA modules inside a module the base has no counterpart of, at any layer (a task model's
    pooler or head: ``bert.pooler.dense`` on a masked-LM base) are new weights: reported in
    ``new_modules``, not refused. Modules under a path the base has (``model.layers.N.self_attn``
    for a layer N it lacks) stay unmatched: that adapter is for another base."""
    known: set[str] = set()
    for n in base_shapes:
        parts = _INDEX.sub(".*", n).split(".")[:-1]
        known.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    still = []
    for m in unmatched:
        parent = _INDEX.sub(".*", m).rsplit(".", 1)[0] if "." in m else ""
        if parent and parent not in known and not any(parent.endswith("." + k) or k.endswith("." + parent)
                                                      for k in known if "." in k):
            match.new_modules.append(m)
        else:
            still.append(m)
    return still


def _kohya_missing_components(unmatched: list[str], af: AdapterFile, match: AdapterMatch) -> list[str]:
    """Kohya modules of a component none of whose modules the base holds are skipped with the reason;
    the rest stay unmatched (refused)."""
    resolved = {KohyaIndex.prefix(m)[1] for m in match.module_of.values() if KohyaIndex.prefix(m)}  # type: ignore[index]
    still = []
    for m in unmatched:
        entry = KohyaIndex.prefix(m)
        if entry is not None and entry[1] not in resolved and match.module_of:
            match.skipped[m] = (f"the base holds no {entry[1]} (kohya prefix {entry[0]}); pass the pipeline folder "
                                "or single-file checkpoint that has it to audit these modules")
        else:
            still.append(m)
    return still


def _layout_hint(unmatched: list[str], names: Collection[str]) -> str:
    """A hint when kohya names follow diffusers' UNet layout but the base is an original-layout
    single-file checkpoint (or the other way round)."""
    rests = [m[len("lora_unet_"):] for m in unmatched if m.startswith("lora_unet_")]
    ldm = any(n.startswith("model.diffusion_model.") for n in names)
    if rests and ldm and any(r.startswith(("down_blocks", "up_blocks", "mid_block")) for r in rests):
        return ("; the adapter names diffusers UNet modules (down_blocks_...) but the base is a single-file checkpoint "
                "in the original SD layout (input_blocks...): audit it against a diffusers folder of the same model")
    if rests and not ldm and any(r.startswith(("input_blocks", "output_blocks", "middle_block")) for r in rests):
        return ("; the adapter names original-SD UNet modules (input_blocks_..., as sd-scripts does for SDXL) but "
                "the base uses diffusers names: audit it against the single-file checkpoint")
    return ""
