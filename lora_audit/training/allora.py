"""ALLoRA (Huang & Balestriero, "ALLoRA: Adaptive Learning Rate Mitigates LoRA Fatal Flaws",
arXiv 2410.09692): LoRA without dropout and without the scaling factor (s = 1), whose
gradients are rescaled per parameter by a coefficient inversely proportional to the
parameters' l2 norm, so that B leaves its zero initialisation quickly and large adapters slow
down (paper, abstract and Sec. 4).

Implemented here, per row theta_i of each LoRA matrix as peft stores it (A: r x n, B: m x r):

    g_i <- g_i / sqrt(||theta_i||_2^2 + 1 / eta^2)

i.e. a coefficient eta while the row is zero (B at initialisation), tending to 1/||theta_i||
as it grows. This exact form of the coefficient has NOT been checked against the paper's Sec. 4:
only the abstract could be read, and it confirms dropout-free, scaling-free training with
per-parameter gradients scaled by a coefficient inversely proportional to the parameters' l2 norm. The coefficient depends only on the
parameters, so scaling per-sample gradients (as the paper words it) equals scaling the batch
gradient. With AdamW the coefficient acts through its change over time (Adam normalises a
constant factor away); that is how the method is used with Adam in practice.
"""

from __future__ import annotations

import torch

DEFAULT_ETA = 1.0


def coefficient(theta: torch.Tensor, eta: float) -> torch.Tensor:
    """Per-row gradient coefficient 1 / sqrt(||theta_i||^2 + 1/eta^2), shape (rows, 1)."""
    return torch.rsqrt(theta.detach().pow(2).sum(dim=1, keepdim=True) + 1.0 / eta ** 2)


def wrap(model, rank: int, target_modules: list[str] | None, seed: int, *, eta: float = DEFAULT_ETA):
    """The peft model with scale 1 (lora_alpha = r), no dropout, and ALLoRA's gradient hooks."""
    from peft import get_peft_model

    from .lora import lora_config

    if not eta > 0:
        raise ValueError("ALLoRA's eta must be > 0")
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, lora_config("lora", rank, float(rank), target_modules))  # alpha/r = 1
    for name, p in peft_model.named_parameters():
        if p.requires_grad and ("lora_A" in name or "lora_B" in name):
            p.register_hook(lambda g, p=p: g * coefficient(p, eta).to(g.dtype))
    return peft_model
