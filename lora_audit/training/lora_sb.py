"""LoRA-SB (Ponkshe, Singhal, Gorbunov, Tumanov, Horvath, Vepakomma, "Initialization using
update approximation is a silver bullet for extremely efficient low-rank fine-tuning",
arXiv 2411.19557; code github.com/RaghavSinghal10/lora-sb).

Architecture (LoRA-XS, Sec. 3): W = W0 + B R A with B (m, r) and A (r, n) frozen and only the
r x r matrix R trained.
Initialisation: the first full fine-tuning update is approximated from the gradient averaged
over a few batches, dW_1 = -eta * sign(mean gradient) (the authors' ``estimate_and_process_grads``
in utils/gradient_utils.py: Adam's first step), and its truncated SVD dW_1 ~ U_r S_r V_r^T gives
B = U_r, R = diag(S_r), A = V_r^T, so the model starts at W0 + (best rank-r approximation of
the first update). The authors' code takes the same factors from a randomised SVD
(``torch.svd_lowrank``, q = r); a full SVD is used here, which gives the exact top r.

Saved as plain LoRA (scale 1: lora_alpha = r) with B' = B R and A, which peft loads directly.
"""

from __future__ import annotations

import torch
from torch import nn


class LoraSBLinear(nn.Module):
    """y = base(x) + B R A x with B, A buffers (frozen) and R the only trainable tensor."""

    def __init__(self, base: nn.Linear, B: torch.Tensor, R: torch.Tensor, A: torch.Tensor):
        super().__init__()
        self.base = base
        self.register_buffer("B", B)  # (m, r)
        self.register_buffer("A", A)  # (r, n)
        self.R = nn.Parameter(R)  # (r, r)
        for p in base.parameters():
            p.requires_grad_(False)

    def forward(self, x):
        # (..., n) @ (n, r) @ (r, r) @ (r, m) -> (..., m)
        return self.base(x) + ((x @ self.A.T) @ self.R.T) @ self.B.T


def _targets(model, target_modules):
    from .lora import DEFAULT_TARGETS

    names = target_modules or DEFAULT_TARGETS
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in names]


def wrap(model, batches, *, rank: int, lr: float, target_modules=None, grad_batches: int = 4):
    """Estimate the first update, initialise B, R, A per target Linear and swap the modules in.
    Returns (model, list of wrapped module names)."""
    targets = _targets(model, target_modules)
    if not targets:
        raise ValueError("no target modules found for LoRA-SB")
    dev = next(model.parameters()).device
    for p in model.parameters():
        p.requires_grad_(False)
    for _, m in targets:
        m.weight.requires_grad_(True)
    model.zero_grad(set_to_none=True)
    for _ in range(grad_batches):
        batch = {k: v.to(dev) for k, v in next(batches).items()}
        (model(**batch).loss / grad_batches).backward()
    names = []
    with torch.no_grad():
        for name, m in targets:
            dW = -lr * torch.sign(m.weight.grad.float())  # (m, n): approximate first Adam update
            m.weight.grad = None
            m.weight.requires_grad_(False)
            U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
            r = min(rank, S.numel())
            wrapped = LoraSBLinear(m, U[:, :r].contiguous().to(m.weight.dtype), torch.diag(S[:r]).to(m.weight.dtype),
                                   Vh[:r].contiguous().to(m.weight.dtype))
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, wrapped)
            names.append(name)
    return model, names


def to_plain_lora(model, names: list[str], base_model, rank: int):
    """A peft LoRA model on ``base_model`` with lora_B = B R, lora_A = A, scale 1."""
    from peft import LoraConfig, get_peft_model

    suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})
    cfg = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=suffixes, task_type="CAUSAL_LM")
    plain = get_peft_model(base_model, cfg)
    with torch.no_grad():
        for n in names:
            sb = model.get_submodule(n)
            m = plain.base_model.model.get_submodule(n)
            r = sb.R.shape[0]
            m.lora_B["default"].weight.zero_()
            m.lora_A["default"].weight.zero_()
            m.lora_B["default"].weight[:, :r] = sb.B @ sb.R  # (m, r) @ (r, r) -> (m, r)
            m.lora_A["default"].weight[:r] = sb.A
    return plain
