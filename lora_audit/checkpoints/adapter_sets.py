"""Adapter sets: several LoRA experts and a router (mixture-of-LoRA-experts methods), read as one
adapter per expert, and the similarity of experts' updates to each other.

A routed mixture has no single weight update (the router mixes experts per token), so the audit
reports each expert's update on its own (per-expert intruders) and how alike the experts' updates
are (``update_similarity``). Layouts read:

MixLoRA (Li et al. 2024, TUDB-Labs/MixLoRA): adapter_config.json with peft_type "MIXLORA",
``num_experts``, ``top_k``, ``routing_strategy``, r / lora_alpha (``expert_lora`` may override them
for the experts), ``target_modules``; weights (safetensors; the pickle adapter_model.bin is refused)::

    mixlora.layers.{i}.self_attn.{proj}.lora_A.weight / lora_B.weight     shared attention LoRA
    mixlora.layers.{i}.experts.{e}.{proj}.lora_A.weight / lora_B.weight   expert e on mlp.{proj}
    mixlora.layers.{i}.gate.weight                                        router (experts x hidden)

  read as members "shared" (the attention LoRA, model.layers.{i}.self_attn.{proj}) and "expert{e}"
  (its LoRA on the dense MLP, model.layers.{i}.mlp.{proj}).

X-LoRA (Buehler & Buehler 2024; peft ``XLoraConfig``): adapter_config.json with peft_type "XLORA"
and ``adapters`` (expert name -> adapter); each expert is a PEFT LoRA folder inside the set's
folder, named by the expert's name, its position ("0", "1", ... as peft saves them) or the relative
path given; the classifier (router) weights ``*xlora_classifier*`` in adapter_model.safetensors.
Members are named after the experts.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import FormatError, InputError
from ..text import printable
from .adapters import (ADAPTER_SET_TYPES, AdapterFile, ModuleFactors, _index, _open, read_adapter_config,
                       read_peft_adapter, validate_adapter_config)

_MIXLORA_KEY = re.compile(r"^mixlora\.layers\.(?P<layer>\d+)\.(?:(?P<attn>self_attn)\.(?P<aproj>[^.]+)|"
                          r"experts\.(?P<expert>\d+)\.(?P<eproj>[^.]+)|(?P<gate>gate))\."
                          r"(?:(?P<part>lora_A|lora_B)\.)?weight$")


@dataclass
class AdapterSet:
    """An adapter set: one AdapterFile per member (``members[label]``), and what was found about the
    router (stated in the JSON, not audited: a router is a new weight, not an update of the base)."""

    path: str
    format: str  # "mixlora" | "xlora"
    members: dict[str, AdapterFile]
    router: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)


def is_adapter_set(path: str | os.PathLike) -> bool:
    """True for a PEFT-style folder whose adapter_config.json has peft_type MIXLORA or XLORA."""
    p = Path(path)
    if not (p / "adapter_config.json").is_file():
        return False
    return str(read_adapter_config(p).get("peft_type", "")).upper() in ADAPTER_SET_TYPES


def read_adapter_set(path: str | os.PathLike) -> AdapterSet:
    """Read a MixLoRA or X-LoRA folder (see the module docstring); InputError / FormatError naming
    the file and what is accepted."""
    folder = Path(path)
    config = read_adapter_config(folder)
    ptype = str(config.get("peft_type", "")).upper()
    if ptype == "MIXLORA":
        return _read_mixlora(folder, config)
    if ptype == "XLORA":
        return _read_xlora(folder, config)
    raise InputError(f"{folder / 'adapter_config.json'}: peft_type {printable(ptype)} is not an adapter set "
                     "(MIXLORA or XLORA)")


def _read_mixlora(folder: Path, config: dict) -> AdapterSet:
    from .sources import contained_file

    where = folder / "adapter_config.json"
    n = config.get("num_experts")
    if not (isinstance(n, int) and not isinstance(n, bool) and n > 0):
        raise FormatError(f"{where}: field 'num_experts' is {printable(repr(n))}; it must be a positive integer")
    if config.get("use_dora"):
        raise InputError(f"{where}: MixLoRA with use_dora is not read (the magnitude vectors are not saved)")
    st = folder / "adapter_model.safetensors"
    if not st.is_file():
        raise InputError(f"{folder}: no adapter_model.safetensors (a MixLoRA adapter_model.bin is a pickle, which "
                         "lora-audit does not unpickle: re-save the weights with safetensors.torch.save_file)")
    handle, keys = _open(contained_file(folder, st.name, "adapter weights"))
    shared: dict[str, ModuleFactors] = {}
    experts: dict[int, dict[str, ModuleFactors]] = {}
    gates = []
    for key in keys:
        m = _MIXLORA_KEY.match(key)
        if m is None:
            raise FormatError(f"{st}: tensor {printable(key)} is not a MixLoRA key (mixlora.layers.<i>.self_attn."
                              "<proj>.lora_A/B.weight, mixlora.layers.<i>.experts.<e>.<proj>.lora_A/B.weight, "
                              "mixlora.layers.<i>.gate.weight)")
        if m["gate"]:
            gates.append(key)
            continue
        if m["attn"]:
            module, into = f"model.layers.{m['layer']}.self_attn.{m['aproj']}", shared
        else:
            e = int(m["expert"])
            if e >= n:
                raise FormatError(f"{st}: tensor {printable(key)} is expert {e}, but num_experts is {n}")
            module, into = f"model.layers.{m['layer']}.mlp.{m['eproj']}", experts.setdefault(e, {})
        f = into.setdefault(module, ModuleFactors(module))
        setattr(f, "A" if m["part"] == "lora_A" else "B", key)
    expert_lora = config.get("expert_lora") or {}
    if not isinstance(expert_lora, dict):
        raise FormatError(f"{where}: field 'expert_lora' must be a JSON object of LoRA settings for the experts")
    expert_cfg = validate_adapter_config({**config, **expert_lora}, where)
    members: dict[str, AdapterFile] = {}
    if shared:
        members["shared"] = _member(folder, config, shared, keys, handle)
    for e in sorted(experts):
        members[f"expert{e}"] = _member(folder, expert_cfg, experts[e], keys, handle)
    router = {"tensors": len(gates), "shape": list(handle.get_slice(gates[0]).get_shape()) if gates else None,
              "num_experts": n, "top_k": config.get("top_k"), "routing_strategy": config.get("routing_strategy")}
    return AdapterSet(str(folder), "mixlora", members, router, config)


def _member(folder: Path, config: dict, modules: dict[str, ModuleFactors], keys, handle) -> AdapterFile:
    cfg = {k: config[k] for k in ("r", "lora_alpha", "use_rslora", "base_model_name_or_path") if k in config}
    af = AdapterFile(str(folder), {"peft_type": "LORA", **cfg}, modules, {}, keys, _handle=handle, format="mixlora")
    _index(af)
    return af


def _read_xlora(folder: Path, config: dict) -> AdapterSet:
    from .sources import _plain_name, contained_file

    where = folder / "adapter_config.json"
    adapters = config.get("adapters")
    if not isinstance(adapters, dict) or not adapters or not all(isinstance(v, str) for v in adapters.values()):
        raise FormatError(f"{where}: field 'adapters' must be a non-empty object mapping expert names to adapters")
    members: dict[str, AdapterFile] = {}
    for i, (name, loc) in enumerate(adapters.items()):
        tried = [str(name), str(i), loc]
        found = next((t for t in tried if _plain_name(t) and (folder / t / "adapter_config.json").is_file()), None)
        if found is None:
            raise InputError(f"{where}: expert {printable(name)!r}: no PEFT LoRA folder inside {folder} named "
                             f"{', '.join(map(printable, dict.fromkeys(tried)))}; lora-audit reads the experts of "
                             "an X-LoRA set from inside its folder")
        members[str(name)] = read_peft_adapter(contained_file(folder, found, "X-LoRA expert"))
    router = {"classifier_tensors": 0}
    st = folder / "adapter_model.safetensors"
    if st.is_file():
        _, keys = _open(contained_file(folder, st.name, "adapter weights"))
        router["classifier_tensors"] = sum("xlora_classifier" in k for k in keys)
    router.update({k: config.get(k) for k in ("xlora_depth", "top_k_lora", "layerwise_scalings")})  # type: ignore[misc]
    return AdapterSet(str(folder), "xlora", members, router, config)


# ---- similarity of experts' updates --------------------------------------------------------------
def update_similarity(factors: list[tuple[torch.Tensor, torch.Tensor, float]]
                      ) -> dict[str, list[list[float | None]]]:
    """How alike several low-rank updates dW_i = s_i B_i A_i of the same matrix are, computed from
    the factors (no dW is formed):

        update_cos[i][j]        <dW_i, dW_j>_F / (||dW_i||_F ||dW_j||_F), where
                                <dW_i, dW_j>_F = s_i s_j sum((B_i^T B_j) * (A_i A_j^T))
        output_overlap[i][j]    ||Q_i^T Q_j||_F^2 / min(r_i, r_j) for orthonormal bases Q of the
                                column spaces of B_i and B_j: 1 when one output subspace holds the
                                other, 0 when they are orthogonal (mean squared cosine of the
                                principal angles)

    An update whose factors hold NaN/inf (that matrix is left out of the audit and reported as
    non-finite) or whose products overflow has null (None) in its row and column: JSON has no NaN.
    """
    k = len(factors)
    gram = torch.zeros(k, k, dtype=torch.float64)
    qs = []
    for i, (Bi, Ai, si) in enumerate(factors):
        Bi, Ai = Bi.double(), Ai.double()
        qs.append(torch.linalg.qr(Bi).Q)  # (out, r_i)
        for j in range(i, k):
            Bj, Aj, sj = factors[j][0].double(), factors[j][1].double(), factors[j][2]
            # (r_i, out) @ (out, r_j) * ((r_i, in) @ (in, r_j)) -> a scalar
            gram[i, j] = gram[j, i] = si * sj * ((Bi.T @ Bj) * (Ai @ Aj.T)).sum()
    norms = gram.diagonal().clamp(min=0).sqrt()
    cos = gram / (norms[:, None] * norms[None, :]).clamp(min=1e-300)
    overlap = [[float((qs[i].T @ qs[j]).pow(2).sum() / min(qs[i].shape[1], qs[j].shape[1])) for j in range(k)]
               for i in range(k)]
    bad = {i for i, (B, A, s) in enumerate(factors) if not (bool(torch.isfinite(B).all()) and
                                                             bool(torch.isfinite(A).all()) and math.isfinite(s))}

    def shown(i: int, j: int, x: float) -> float | None:
        return round(x, 6) if i not in bad and j not in bad and math.isfinite(x) else None

    return {"update_cos": [[shown(i, j, float(x)) for j, x in enumerate(row)] for i, row in enumerate(cos.tolist())],
            "output_overlap": [[shown(i, j, x) for j, x in enumerate(row)] for i, row in enumerate(overlap)]}
