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

import math
from pathlib import Path

import torch

from ..checkpoints.adapters import AdapterFile, read_peft_adapter
from ..checkpoints.detect import Kind, detect
from ..errors import FormatError, InputError
from ..text import printable

AGG_METHODS = ("fedavg", "ffa", "fed-sb")
# Config fields every client must share: they decide each module's scale, and DoRA.
SHARED_FIELDS = ("r", "lora_alpha", "use_rslora", "use_dora", "rank_pattern", "alpha_pattern")


def read_client(path: str | Path) -> AdapterFile:
    """One client's PEFT LoRA adapter, through the one adapter reader (config and factors validated)."""
    if detect(path) != Kind.PEFT_ADAPTER:
        raise InputError(f"{path}: not a PEFT adapter folder (needs adapter_config.json and "
                         "adapter_model.safetensors)")
    af = read_peft_adapter(path)
    if not af.modules:
        raise FormatError(f"{path}: no lora_A/lora_B pairs in adapter_model.safetensors")
    if af.config.get("use_dora") or any(f.magnitude for f in af.modules.values()):
        raise InputError(f"{path}: DoRA adapters are not supported (their magnitude vectors do not average linearly)")
    return af


def _check_same(clients: list[AdapterFile]) -> None:
    first = clients[0]
    for af in clients[1:]:
        if set(af.keys) != set(first.keys) or any(af.tensor_shape(k) != first.tensor_shape(k) for k in first.keys):
            raise InputError(f"{af.path}: modules or shapes differ from {first.path}; clients must share one "
                             "architecture")
        for key in SHARED_FIELDS:
            if af.config.get(key) != first.config.get(key):
                raise InputError(f"{af.path}: {key}={af.config.get(key)} differs from {first.path} "
                                 f"({first.config.get(key)})")


def aggregate(adapters: list[str | Path], method: str = "fedavg", *, out: str | Path | None = None):
    """Average client adapters. Returns (config, aggregated weights, report): the report (a
    ``results.training.FederatedResult``; ``out``, where the aggregate goes, in its settings) has
    per-module and total aggregation bias (of plain FedAvg on these clients) and the bias of
    the returned aggregate (0 for ffa / fed-sb)."""
    from ..results.training import FederatedModule, FederatedResult

    if method not in AGG_METHODS:
        raise InputError(f"unknown aggregation {method!r}; choose one of {', '.join(AGG_METHODS)}")
    if len(adapters) < 2:
        raise InputError("federated aggregation needs at least two client adapters")
    clients = [read_client(a) for a in adapters]
    _check_same(clients)
    first = clients[0]
    averaged = {}
    for k in first.keys:  # every tensor of the file, averaged in float64 and stored in its own dtype
        ts = [af.tensor(k) for af in clients]
        for af, t in zip(clients, ts, strict=True):
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise FormatError(f"{af.path}: tensor {printable(k)} holds NaN/inf values; averaging it would make "
                                  "the server's adapter non-finite. Leave this client out (`lora-audit spectrum` "
                                  "lists its non-finite matrices)")
        averaged[k] = torch.stack([t.double() for t in ts]).mean(0).to(ts[0].dtype).contiguous()
    modules, num2, den2 = {}, 0.0, 0.0
    for mod in first.modules:
        pairs = [af.factors(mod) for af in clients]  # (B_k, A_k, None)
        Bs = torch.stack([B.double() for B, _, _ in pairs])  # (K, m, r)
        As = torch.stack([A.double() for _, A, _ in pairs])  # (K, r, n)
        mean_prod = torch.einsum("kmr,krn->mn", Bs, As) / len(clients)  # mean_k B_k A_k, (m, n)
        prod_mean = Bs.mean(0) @ As.mean(0)  # (m, r) @ (r, n) -> (m, n)
        num, den = (mean_prod - prod_mean).norm().item(), mean_prod.norm().item()
        if not (math.isfinite(num) and math.isfinite(den)):
            raise FormatError(f"{printable(mod)}: the clients' updates B A overflow float64 (factors of about 1e150 "
                              "or more); no client adapter can hold such an update")
        modules[mod] = FederatedModule(bias=num / den if den > 0 else 0.0, mean_update_norm=den)
        num2 += num ** 2
        den2 += den ** 2
        if method != "fedavg" and not all(torch.equal(A, As[0]) for A in As):
            raise InputError(f"{method}: clients' A differ at {mod}; {method} needs one shared A "
                             "(train with --method ffa-lora or lora-sb from one seed), use --method fedavg")
    total = (num2 ** 0.5) / (den2 ** 0.5) if den2 > 0 else 0.0
    report = FederatedResult(method=method, clients=[str(a) for a in adapters], fedavg_bias_total=total,
                             aggregate_bias_total=total if method == "fedavg" else 0.0, modules=modules,
                             settings={"method": method, "out": None if out is None else str(out)})
    return first.config, averaged, report


def write_adapter(cfg: dict, weights: dict[str, torch.Tensor], out: str | Path, extra=None, *,
                  overwrite: bool = False) -> Path:
    """The aggregate as a PEFT adapter folder, with ``extra`` (the ``FederatedResult``) as federated.json."""
    from safetensors.torch import save_file

    from ..io import atomic_dir, atomic_write_json

    with atomic_dir(out, overwrite=overwrite, what="federated") as tmp:
        save_file(weights, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        atomic_write_json(tmp / "adapter_config.json", cfg)
        if extra is not None:
            extra.write_json(tmp / "federated.json")
    return Path(out)
