"""Low-rank adapters as factored deltas: PEFT LoRA folders and kohya/diffusers LoRA files.

PEFT (adapter_config.json + adapter_model.safetensors), keys such as
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` (r x in) and
``...lora_B.weight`` (out x r); optionally an adapter name before ``.weight``
(``lora_A.default.weight``). Scale s = lora_alpha / r, or lora_alpha / sqrt(r) with
``use_rslora`` (Kalajdzievski 2023); ``rank_pattern`` / ``alpha_pattern`` override r and alpha
per module with PEFT's own matching rule (``peft.utils.other.get_pattern_key``: the first key
that matches the end of the module name). Also: DoRA ``lora_magnitude_vector`` (out,);
embedding LoRA ``lora_embedding_A`` (r x vocab), ``lora_embedding_B`` (dim x r) whose delta is
(B A)^T; ``fan_in_fan_out`` (GPT-2 Conv1D, base stored in x out); ``lora_B.bias`` (lora_bias);
``modules_to_save`` (full replacement tensors, saved under the plain module name).

Kohya / diffusers: ``<module>.lora_down.weight`` (A), ``lora_up.weight`` (B), ``.alpha``
(s = alpha / r); 4-D conv factors are flattened to (out x in*kh*kw).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import FormatError, InputError
from .detect import read_adapter_config

# Init methods that rewrite the base weights: the saved adapter is then a delta against a
# MODIFIED base unless it was saved with path_initial_model_for_weight_conversion.
BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga", "eva")

_PEFT_KEY = re.compile(
    r"^(?P<module>.+?)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
    r"(?:\.(?P<adapter>[^.]+))?(?:\.(?P<param>weight|bias))?$")


@dataclass
class ModuleFactors:
    """Where one adapted module's factors lie in the file (tensor keys; read lazily by ``factors``)."""

    module: str
    A: str | None = None  # key of (r, in), or (r, vocab) for embeddings
    B: str | None = None  # key of (out, r), or (dim, r) for embeddings
    magnitude: str | None = None  # key of DoRA's (out,)
    bias: bool = False
    embedding: bool = False
    alpha: float | None = None  # kohya per-module alpha


@dataclass
class AdapterFile:
    """A parsed adapter: factored modules, full replacements, its config, and what to warn about."""

    path: str
    config: dict
    modules: dict[str, ModuleFactors]
    replacements: dict[str, str]  # base param name (module + ".weight") -> tensor key in the file
    warnings: list[str] = field(default_factory=list)
    _tensors: object = None  # the safe_open handle
    shapes: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # module -> (rows, cols, r) of its delta

    def tensor(self, key: str) -> torch.Tensor:
        return self._tensors.get_tensor(key)

    def scale(self, module: str, rank: int) -> float:
        """s for one module: kohya alpha/r, else PEFT's alpha / r or alpha / sqrt(r) (rsLoRA)."""
        f = self.modules[module]
        if f.alpha is not None:
            return float(f.alpha) / rank
        cfg = self.config
        r = cfg.get("r", rank)
        alpha = cfg.get("lora_alpha", r)
        rp, ap = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
        if rp or ap:  # imported only here: peft pulls in transformers (seconds of start-up)
            from peft.utils.other import get_pattern_key
        if rp:
            key = get_pattern_key(list(rp), module)
            r = rp.get(key, r)
        if ap:
            key = get_pattern_key(list(ap), module)
            alpha = ap.get(key, alpha)
        if int(r) != rank:
            raise FormatError(f"{self.path}: module {module} has rank {rank} in the weights but r={r} in "
                              "adapter_config.json (rank_pattern)")
        return float(alpha) / (math.sqrt(r) if cfg.get("use_rslora") else r)

    def info(self) -> dict:
        c = self.config
        ranks = sorted({r for (_, _, r) in self.shapes.values()})
        return {"kind": "kohya_lora" if c.get("peft_type") == "KOHYA" else "peft_adapter",
                "peft_type": c.get("peft_type"), "r": c.get("r"), "ranks": ranks, "lora_alpha": c.get("lora_alpha"),
                "use_rslora": bool(c.get("use_rslora")), "use_dora": bool(c.get("use_dora")),
                "init_lora_weights": c.get("init_lora_weights"), "target_modules": c.get("target_modules"),
                "fan_in_fan_out": bool(c.get("fan_in_fan_out")), "rank_pattern": c.get("rank_pattern") or {},
                "alpha_pattern": c.get("alpha_pattern") or {}, "modules_to_save": c.get("modules_to_save"),
                "base_model_name_or_path": c.get("base_model_name_or_path"), "adapted_modules": len(self.modules)}


def _open(path: Path):
    from safetensors import safe_open

    try:
        h = safe_open(str(path), framework="pt")
        return h, list(h.keys())
    except Exception as e:  # noqa: BLE001
        raise FormatError(f"{path}: not a readable safetensors file, truncated or corrupted ({e})") from None


def _strip(key: str) -> str:
    for prefix in ("base_model.model.",):
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def read_peft_adapter(folder: str | Path, *, allow_pickle: bool = False) -> AdapterFile:
    folder = Path(folder)
    config = read_adapter_config(folder)
    ptype = str(config.get("peft_type", "LORA")).upper()
    if ptype != "LORA":
        raise InputError(f"{folder}: PEFT type {ptype} is not supported; lora-audit reads LoRA adapters "
                         "(incl. rsLoRA, DoRA, patterns). Merge it into the model and audit the merged folder.")
    st = folder / "adapter_model.safetensors"
    if not st.is_file():
        if (folder / "adapter_model.bin").is_file():
            raise InputError(f"{folder}: the adapter weights are a pickle (adapter_model.bin), which lora-audit does "
                             "not unpickle. Re-save it with save_pretrained(safe_serialization=True).")
        raise InputError(f"{folder}: adapter_config.json but no adapter_model.safetensors")
    handle, keys = _open(st)
    modules: dict[str, ModuleFactors] = {}
    replacements: dict[str, str] = {}
    warnings: list[str] = []
    for key in keys:
        m = _PEFT_KEY.match(_strip(key))
        if m is None:
            name = _strip(key)
            if ".base_layer." in name:
                continue  # a copy of the base weight PEFT saves with embedding adapters; not a change
            replacements[name.replace(".modules_to_save.default", "")] = key
            continue
        mod = modules.setdefault(m["module"], ModuleFactors(m["module"]))
        part, param = m["part"], m["param"]
        if param == "bias":
            mod.bias = True
            continue
        if part in ("lora_A", "lora_embedding_A"):
            mod.A = key
        elif part in ("lora_B", "lora_embedding_B"):
            mod.B = key
        else:
            mod.magnitude = key
        mod.embedding = mod.embedding or part.startswith("lora_embedding")
    incomplete = [n for n, f in modules.items() if f.A is None or f.B is None]
    if incomplete:
        raise FormatError(f"{folder}: modules with only one of lora_A / lora_B: {incomplete[:5]}")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().split("_niter")[0].split("[")[0] in BASE_REWRITING_INITS:
        warnings.append(f"init_lora_weights={init!r} rewrites the base weights at initialisation: unless this adapter "
                        "was saved with path_initial_model_for_weight_conversion, it is a delta against a MODIFIED "
                        "base, and the audited W0 + dW is not the model that was trained")
    if any(f.bias for f in modules.values()):
        warnings.append("lora_bias: the adapter also changes biases (not part of the spectral audit)")
    if replacements:
        warnings.append(f"modules_to_save: {len(replacements)} tensors are full replacements "
                        f"({', '.join(sorted(replacements)[:4])}{', ...' if len(replacements) > 4 else ''})")
    af = AdapterFile(str(folder), config, modules, replacements, warnings, handle)
    _shape_index(af)
    return af


def read_kohya_lora(path: str | Path) -> AdapterFile:
    path = Path(path)
    handle, keys = _open(path)
    modules: dict[str, ModuleFactors] = {}
    for key in keys:
        for suffix, part in ((".lora_down.weight", "A"), (".lora_up.weight", "B"), (".alpha", "alpha")):
            if key.endswith(suffix):
                mod = modules.setdefault(key[: -len(suffix)], ModuleFactors(key[: -len(suffix)]))
                if part == "alpha":
                    mod.alpha = float(handle.get_tensor(key).float().item())
                else:
                    setattr(mod, part, key)
    incomplete = [n for n, f in modules.items() if f.A is None or f.B is None]
    if incomplete or not modules:
        raise FormatError(f"{path}: not a complete kohya LoRA (modules missing lora_up/lora_down: {incomplete[:5]})")
    af = AdapterFile(str(path), {"peft_type": "KOHYA"}, modules, {}, [], handle)
    _shape_index(af)
    return af


def _shape_index(af: AdapterFile) -> None:
    """Record factor shapes (from headers only) as af.shapes[module] = (rows, cols, r)."""
    h = af._tensors
    for name, f in af.modules.items():
        a = tuple(h.get_slice(f.A).get_shape())
        b = tuple(h.get_slice(f.B).get_shape())
        if f.embedding:  # A (r, vocab), B (dim, r): delta (B A)^T is (vocab, dim)
            af.shapes[name] = (a[1], b[0], a[0])
        else:
            in_dim = int(torch.tensor(a[1:]).prod()) if len(a) > 1 else 1
            af.shapes[name] = (b[0], in_dim, a[0])
        if (b[1] if len(b) > 1 else None) != a[0]:
            raise FormatError(f"{af.path}: module {name}: lora_B {b} and lora_A {a} ranks differ")


def factors(af: AdapterFile, module: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(B, A, magnitude) with B (rows, r) and A (r, cols) such that delta = B @ A has the
    layout of the stored base tensor for embeddings ((B A)^T is returned as A^T, B^T) and the
    nn.Linear (out, in) layout otherwise (the stream transposes GPT-2 Conv1D bases to match)."""
    f = af.modules[module]
    A = af.tensor(f.A)
    B = af.tensor(f.B)
    if A.dim() > 2:  # conv: (r, in, kh, kw) -> (r, in*kh*kw); (out, r, 1, 1) -> (out, r)
        A = A.reshape(A.shape[0], -1)
    if B.dim() > 2:
        B = B.reshape(B.shape[0], -1)
    mag = af.tensor(f.magnitude) if f.magnitude is not None else None
    if f.embedding:  # delta = (B A)^T = A^T B^T: rows vocab, cols dim
        return A.T.contiguous(), B.T.contiguous(), mag
    return B, A, mag
