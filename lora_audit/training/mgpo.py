"""LoRA-MGPO (LoRA-GGPO v2; Chang et al., arXiv 2502.14538; authors' code llm172/LoRA-MGPO),
the momentum-guided weight perturbation, as the authors' code computes it. Per LoRA layer, once per
step:

    v   = s (m_B A + B m_A)                                  m_* = AdamW's exp_avg
    e   = -rho * v / (||v||_F + 1e-12) * min(1 / (g_bar + 1e-12), 10)
    g_bar <- beta g_bar + (1 - beta) ||s (grad_B A + B grad_A)||_F   (EMA; scale 1 before it exists)

e is added to the frozen base weight for the forward/backward pass and removed before the
optimiser step (here by restoring a saved copy, so the base weights are bit-for-bit unchanged).
Before the first optimiser step there is no momentum, so v = 0 and there is no perturbation.
"""

from __future__ import annotations

import torch


def lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer) and "default" in m.lora_A]


def perturbation(A, B, m_A, m_B, s: float, rho: float, g_bar: float | None) -> torch.Tensor:
    """e (m, n) for one layer; A (r, n), B (m, r), m_* the Adam first moments of A and B."""
    v = s * (m_B @ A + B @ m_A)  # (m, r) @ (r, n) -> (m, n)
    scale = 1.0 if g_bar is None else min(1.0 / (g_bar + 1e-12), 10.0)
    return -rho * v / (v.norm() + 1e-12) * scale


class MGPO:
    """Call ``apply()`` before the forward pass and ``restore()`` after backward, before opt.step()."""

    def __init__(self, model, optimizer, *, rho: float = 0.05, beta: float = 0.9):
        self.layers = lora_layers(model)
        self.opt, self.rho, self.beta = optimizer, rho, beta
        self.g_bar: dict[int, float] = {}
        self.saved: list[tuple[torch.Tensor, torch.Tensor]] = []

    @torch.no_grad()
    def apply(self) -> None:
        for i, m in enumerate(self.layers):
            A, B = m.lora_A["default"].weight, m.lora_B["default"].weight
            sa, sb = self.opt.state.get(A, {}), self.opt.state.get(B, {})
            if "exp_avg" not in sa or "exp_avg" not in sb:
                continue
            W = m.get_base_layer().weight
            e = perturbation(A, B, sa["exp_avg"], sb["exp_avg"], m.scaling["default"], self.rho, self.g_bar.get(i))
            self.saved.append((W, W.detach().clone()))
            W.add_(e.to(W.dtype))

    @torch.no_grad()
    def restore(self) -> None:
        for W, copy in self.saved:
            W.copy_(copy)
        self.saved.clear()
        for i, m in enumerate(self.layers):
            A, B = m.lora_A["default"].weight, m.lora_B["default"].weight
            if A.grad is None or B.grad is None:
                continue
            g = (m.scaling["default"] * (B.grad @ A + B @ A.grad)).norm().item()  # (m, r) @ (r, n)
            old = self.g_bar.get(i)
            self.g_bar[i] = g if old is None else self.beta * old + (1 - self.beta) * g
