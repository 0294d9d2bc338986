"""LoRA, rsLoRA, DoRA (via peft's LoraConfig) and FFA-LoRA.

- LoRA (Hu et al. 2021, arXiv 2106.09685, Eq. 3): W = W0 + (alpha/r) B A, B zero-initialised.
- rsLoRA (Kalajdzievski 2023, arXiv 2312.03732, Thm 3.2): scale alpha/sqrt(r) instead of alpha/r.
- DoRA (Liu et al. 2024, arXiv 2402.09353, Eq. 5): W = m (W0 + BA) / ||W0 + BA||_c.
- FFA-LoRA (Sun et al. 2024, "Improving LoRA in Privacy-preserving Federated Learning",
  arXiv 2403.12313, Sec. 4): A stays at its random initialisation, only B trains, so the
  server's average of B is the exact average of the clients' updates B_k A.
"""

from __future__ import annotations

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj"]


def check_targets(model, target_modules: list[str] | None) -> None:
    """InputError unless every name in ``target_modules`` is the last name part of some linear
    layer of ``model`` (the names peft matches); the message lists the names there are."""
    if not target_modules:
        return
    import torch

    have = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    missing = [t for t in target_modules if t not in have]
    if missing:
        from ..errors import InputError

        raise InputError(f"--target-modules {','.join(missing)}: no linear layer of the model has that name; "
                         f"the model's linear layers are named {', '.join(have)}")


def lora_config(method: str, rank: int, alpha: float, target_modules: list[str] | None):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=target_modules or "all-linear",
                      use_rslora=method == "rslora", use_dora=method == "dora", task_type="CAUSAL_LM")


def wrap(model, method: str, rank: int, alpha: float, target_modules: list[str] | None, seed: int):
    """The peft model for ``method``; for FFA-LoRA the A matrices are frozen."""
    import torch
    from peft import get_peft_model

    torch.manual_seed(seed)  # A's random init is part of the seeded run
    peft_model = get_peft_model(model, lora_config(method, rank, alpha, target_modules))
    if method == "ffa-lora":
        for name, p in peft_model.named_parameters():
            if "lora_A" in name:
                p.requires_grad_(False)
    return peft_model
