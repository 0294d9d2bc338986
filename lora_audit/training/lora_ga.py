"""LoRA-GA: Low-Rank Adaptation with Gradient Approximation (Wang, Yu, Li, arXiv 2407.05000).

Initialisation (Sec. 3.2, Eq. 9-10): with the full-weight gradient G = dL/dW0 averaged over a few
batches and its SVD G = U S V^T, A_init = V[:, :r]^T, B_init = U[:, r:2r] (peft's "ArB2r"
direction), both scaled ("stable" scaling, gamma), and W0 is replaced by W0 - s B_init A_init so
the starting model equals the base. The first adapter step then follows the best rank-2r
approximation of the full gradient. The gradient estimate and initialisation are peft's
implementation (``peft.tuners.lora.loraga``, 0.21).

Saving (the authors' conversion, also peft's PiSSA/OLoRA "weight conversion"): the trained model
is (W0 - s B_i A_i) + s B_f A_f = W0 + s [B_f, -B_i] [A_f; A_i], i.e. a plain rank-2r LoRA
against the ORIGINAL base, saved with scale s kept by setting lora_alpha accordingly.
"""

from __future__ import annotations

import math

import torch


def wrap(model, batches, *, method_cfg, grad_batches: int = 4, seed: int = 0):
    """Estimate gradients on ``grad_batches`` batches, then build the LoRA-GA peft model.

    Mutates its arguments: ``method_cfg`` gets ``init_lora_weights="lora_ga"`` and a
    ``lora_ga_config``; ``model`` is wrapped in place by peft and its base weights are rewritten
    (W0 - s B_init A_init). Returns (peft_model, init) where init maps module name ->
    (A_init, B_init) clones."""
    from peft import get_peft_model
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.config import LoraGAConfig
    from peft.tuners.lora.loraga import preprocess_loraga

    cfg = method_cfg
    cfg.init_lora_weights = "lora_ga"
    cfg.lora_ga_config = LoraGAConfig()
    dev = next(model.parameters()).device

    def train_step():
        for _ in range(grad_batches):
            batch = {k: v.to(dev) for k, v in next(batches).items()}
            (model(**batch).loss / grad_batches).backward()

    torch.manual_seed(seed)
    preprocess_loraga(model, cfg, train_step)
    model.zero_grad(set_to_none=True)
    peft_model = get_peft_model(model, cfg)
    init = {n: (m.lora_A["default"].weight.detach().clone(), m.lora_B["default"].weight.detach().clone())
            for n, m in peft_model.named_modules() if isinstance(m, LoraLayer) and "default" in m.lora_A}
    return peft_model, init


def to_plain_lora(peft_model, init: dict, base_model):
    """A plain rank-2r peft LoRA model on ``base_model`` (the ORIGINAL base weights) whose
    merged weights equal the trained LoRA-GA model's."""
    import copy

    from peft import get_peft_model
    from peft.tuners.lora import LoraLayer

    cfg = copy.deepcopy(peft_model.peft_config["default"])
    r = cfg.r
    cfg.r = 2 * r
    cfg.lora_alpha = cfg.lora_alpha * (math.sqrt(2) if cfg.use_rslora else 2)  # same scale s at rank 2r
    cfg.init_lora_weights = True
    cfg.lora_ga_config = None
    cfg.rank_pattern, cfg.alpha_pattern = {}, {}
    plain = get_peft_model(base_model, cfg)
    trained = dict(peft_model.named_modules())
    with torch.no_grad():
        for n, m in plain.named_modules():
            if not (isinstance(m, LoraLayer) and "default" in m.lora_A):
                continue
            t = trained[n]
            A_i, B_i = init[n]
            m.lora_A["default"].weight.copy_(torch.cat([t.lora_A["default"].weight, A_i], 0))  # (2r, n)
            m.lora_B["default"].weight.copy_(torch.cat([t.lora_B["default"].weight, -B_i], 1))  # (m, 2r)
    return plain
