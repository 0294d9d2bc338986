"""Intruder-dimension mitigation (Shuttleworth et al., "LoRA vs Full Fine-tuning: An Illusion of
Equivalence", arXiv 2410.21228, Sec. 6 / Fig. 8).

For every LoRA module with base W0 and delta dW = s B A (s = alpha/r or alpha/sqrt(r)):

    W1 = W0 + dW = U1 S1 V1^T                       (thin SVD of the tuned matrix)
    I  = { j < k : max_i |<u1_j, u0_i>| < epsilon }  (intruders, found with spectral.exact)
    W' = W1 + (lambda - 1) sum_{j in I} u1_j s1_j v1_j^T
    dW' = W' - W0, refactored to rank r by truncated SVD: B' = U_r S_r / s, A' = V_r^T

lambda = 1 leaves the model unchanged, lambda = 0 removes the intruders. Because dW' can have
rank up to r + |I|, the truncation is an approximation, reported as ``truncation_rel_error``.
Intruders are counted before and after on the tuned matrices W1 and W0 + dW'.

(peft 0.21 has ``peft.tuners.lora.intruders.reduce_intruder_dimension``; it adds a second
adapter instead of writing a rank-r LoRA, so the new adapter is built here; the intruder test
is the spectral engine's exact one.)
"""

from __future__ import annotations

import torch

from ..errors import InputError
from .exact import base_spectrum, exact_topk


def mitigate_matrix(W0: torch.Tensor, dW: torch.Tensor, *, lam: float, k: int, epsilon: float, rank: int):
    """Returns (new delta of rank <= rank (m, n), record). Computes in float64."""
    W0 = W0.double()
    W1 = W0 + dW.double()
    base = base_spectrum(W0)
    top = exact_topk(base, W1, k)
    intr = (top.max_cos < epsilon).nonzero().flatten()
    U1, S1, Vh1 = torch.linalg.svd(W1, full_matrices=False)  # (m, p), (p,), (p, n)
    Wn = W1 + (lam - 1.0) * (U1[:, intr] * S1[intr]) @ Vh1[intr]  # (m, |I|) @ (|I|, n) -> (m, n)
    d = Wn - W0
    U, S, Vh = torch.linalg.svd(d, full_matrices=False)
    d_r = (U[:, :rank] * S[:rank]) @ Vh[:rank]  # (m, r) @ (r, n) -> (m, n)
    after = exact_topk(base, W0 + d_r, k)
    dn = d.norm().item()
    rec = {"intruders_before": int(intr.numel()), "intruders_after": int((after.max_cos < epsilon).sum()),
           "truncation_rel_error": (d - d_r).norm().item() / dn if dn > 0 else 0.0}
    return (U[:, :rank], S[:rank], Vh[:rank]), rec


def mitigate_adapter(base: str, adapter: str, out: str, *, lam: float = 0.75, k: int = 10,
                     epsilon: float = 0.5, device: str = "cpu") -> dict:
    """Load ``adapter`` on ``base``, mitigate every LoRA module, write a new PEFT adapter to ``out``."""
    from peft.tuners.lora import LoraLayer

    from ..checkpoints import load_model
    from ..io import atomic_dir, atomic_write_json
    from ..progress import progress
    from ..results import provenance

    if not 0.0 <= lam <= 1.0:
        raise InputError(f"--lambda must be in [0, 1], got {lam}")
    loaded = load_model(adapter, base=base, device=device)
    model = loaded.model
    cfg = model.peft_config["default"]
    if getattr(cfg, "use_dora", False):
        raise InputError(f"{adapter}: DoRA adapters are not supported by mitigation (only plain LoRA)")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer) and "default" in m.lora_A]
    modules, tot_b, tot_a = {}, 0, 0
    with torch.no_grad():
        for name, m in progress(layers, desc="mitigate", unit="matrix"):
            A, B = m.lora_A["default"].weight, m.lora_B["default"].weight  # (r, n), (m, r)
            s = m.scaling["default"]
            W0 = m.get_base_layer().weight
            if W0.ndim != 2 or W0.shape != (B.shape[0], A.shape[1]):
                raise InputError(f"{name}: only linear LoRA modules are supported (got base shape {tuple(W0.shape)})")
            (U, S, Vh), rec = mitigate_matrix(W0, s * (B.double() @ A.double()), lam=lam, k=k, epsilon=epsilon,
                                              rank=A.shape[0])
            r = S.numel()
            newB = torch.zeros_like(B)
            newA = torch.zeros_like(A)
            newB[:, :r] = (U * (S / s)).to(B.dtype)
            newA[:r] = Vh.to(A.dtype)
            B.copy_(newB)
            A.copy_(newA)
            modules[name] = rec
            tot_b += rec["intruders_before"]
            tot_a += rec["intruders_after"]
    result = provenance("lora-audit/mitigate", 1, base=str(base), adapter=str(adapter), lam=lam, k=k, epsilon=epsilon)
    result.update(intruders_before=tot_b, intruders_after=tot_a, modules=modules)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        atomic_write_json(tmp / "mitigate.json", result)
    return result
