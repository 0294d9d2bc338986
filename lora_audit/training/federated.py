"""Federated aggregation of LoRA client adapters and the aggregation bias.

Plain FedAvg averages A and B separately, so the server's update mean(B_k) mean(A_k) is not the
mean of the clients' updates mean(B_k A_k). The relative gap

    bias = ||mean_k(B_k A_k) - mean_k(B_k) mean_k(A_k)||_F / ||mean_k(B_k A_k)||_F

is what FFA-LoRA (Sun et al. 2024, arXiv 2403.12313, Sec. 4: A frozen and shared, only B
trained and averaged) and Fed-SB (Singhal et al. 2025, arXiv 2502.15436, Sec. 3: B and A shared
and frozen, only the r x r matrix R trained; saved here as B' = B R) remove: with A shared,
mean_k(B_k) A = mean_k(B_k A), exactly. Both "ffa" and "fed-sb" therefore check that every
client's A matrices are identical and average the saved B (for Fed-SB, B R_k).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import FormatError, InputError

AGG_METHODS = ("fedavg", "ffa", "fed-sb")


def read_adapter(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    path = Path(path)
    cfg_p, w_p = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not cfg_p.is_file() or not w_p.is_file():
        raise InputError(f"{path}: not a PEFT adapter folder (needs adapter_config.json and "
                         "adapter_model.safetensors)")
    cfg = json.loads(cfg_p.read_text())
    return cfg, load_file(str(w_p))


def _pairs(weights: dict[str, torch.Tensor], where: str) -> dict[str, tuple[str, str]]:
    """module prefix -> (A key, B key)."""
    out = {}
    for k in weights:
        if ".lora_A." in k:
            kb = k.replace(".lora_A.", ".lora_B.")
            if kb not in weights:
                raise FormatError(f"{where}: {k} has no matching lora_B")
            out[k.split(".lora_A.")[0]] = (k, kb)
    if not out:
        raise FormatError(f"{where}: no lora_A/lora_B pairs")
    return out


def aggregate(adapters: list[str | Path], method: str = "fedavg") -> tuple[dict, dict[str, torch.Tensor], dict]:
    """Average client adapters. Returns (config, aggregated weights, report) where report has
    per-module and total aggregation bias (of plain FedAvg on these clients) and the bias of
    the returned aggregate (0 for ffa / fed-sb)."""
    if method not in AGG_METHODS:
        raise InputError(f"unknown aggregation {method!r}; choose one of {', '.join(AGG_METHODS)}")
    if len(adapters) < 2:
        raise InputError("federated aggregation needs at least two client adapters")
    loaded = [read_adapter(a) for a in adapters]
    cfg0, w0 = loaded[0]
    pairs = _pairs(w0, str(adapters[0]))
    for (cfg, w), a in zip(loaded[1:], adapters[1:]):
        if set(w) != set(w0) or any(w[k].shape != w0[k].shape for k in w0):
            raise InputError(f"{a}: modules or shapes differ from {adapters[0]}; clients must share one architecture")
        for key in ("r", "lora_alpha", "use_rslora", "use_dora"):
            if cfg.get(key) != cfg0.get(key):
                raise InputError(f"{a}: {key}={cfg.get(key)} differs from {adapters[0]} ({cfg0.get(key)})")
    if cfg0.get("use_dora"):
        raise InputError("DoRA adapters are not supported (their magnitude vectors do not average linearly)")
    out = {k: torch.stack([w[k].double() for _, w in loaded]).mean(0) for k in w0}
    modules, num2, den2 = {}, 0.0, 0.0
    for mod, (ka, kb) in pairs.items():
        As = torch.stack([w[ka].double() for _, w in loaded])  # (K, r, n)
        Bs = torch.stack([w[kb].double() for _, w in loaded])  # (K, m, r)
        mean_prod = torch.einsum("kmr,krn->mn", Bs, As) / len(loaded)  # mean_k B_k A_k, (m, n)
        prod_mean = Bs.mean(0) @ As.mean(0)  # (m, r) @ (r, n) -> (m, n)
        num, den = (mean_prod - prod_mean).norm().item(), mean_prod.norm().item()
        modules[mod] = {"bias": num / den if den > 0 else 0.0, "mean_update_norm": den}
        num2 += num ** 2
        den2 += den ** 2
        if method != "fedavg" and not all(torch.equal(w[ka], w0[ka]) for _, w in loaded):
            raise InputError(f"{method}: clients' A differ at {mod}; {method} needs one shared A "
                             "(train with --method ffa-lora or lora-sb from one seed), use --method fedavg")
    total = (num2 ** 0.5) / (den2 ** 0.5) if den2 > 0 else 0.0
    report = {"method": method, "clients": [str(a) for a in adapters], "fedavg_bias_total": total,
              "aggregate_bias_total": total if method == "fedavg" else 0.0, "modules": modules}
    dtype = next(iter(w0.values())).dtype
    return cfg0, {k: v.to(dtype).contiguous() for k, v in out.items()}, report


def write_adapter(cfg: dict, weights: dict[str, torch.Tensor], out: str | Path, extra: dict | None = None, *,
                  overwrite: bool = False) -> Path:
    from safetensors.torch import save_file

    from ..io import atomic_dir, atomic_write_json

    with atomic_dir(out, overwrite=overwrite, what="federated") as tmp:
        save_file(weights, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        atomic_write_json(tmp / "adapter_config.json", cfg)
        if extra is not None:
            atomic_write_json(tmp / "federated.json", extra)
    return Path(out)
