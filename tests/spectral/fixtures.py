"""Checkpoints for the end-to-end spectral tests, built once per test module in temp folders:
real PEFT adapters made by peft (tests.helpers.make_peft_adapter) and a dense-perturbation
"full fine-tune" saved by transformers."""

from __future__ import annotations

from pathlib import Path

import torch


def make_full_finetune(base_dir: str | Path, out: str | Path, *, seed: int = 7, noise: float = 1e-3,
                       intruder_in: str = "model.layers.1.mlp.down_proj.weight") -> Path:
    """Every linear weight of the base nudged by small dense noise (a 'full fine-tune' that keeps
    its spectrum), plus one strong rank-1 update in ``intruder_in`` that certainly makes an
    intruder (the construction of ``tests.spectral.reference.intruder_case``). Saved with transformers as a model folder."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and "embed" not in name and "lm_head" not in name:
                p.add_(noise * p.abs().mean() * torch.randn(p.shape, generator=g))
        W = dict(model.named_parameters())[intruder_in]
        U0, S0, _ = torch.linalg.svd(W.double(), full_matrices=False)
        signs = torch.randint(0, 2, (U0.shape[1], 1), generator=g).double() * 2 - 1
        u = U0 @ signs / U0.shape[1] ** 0.5  # (m, 1): |cos| = 1/sqrt(p) with every base direction
        v = torch.randn(1, W.shape[1], generator=g, dtype=torch.float64)
        W.add_((5 * S0[0] * u @ (v / v.norm())).float())
    model.save_pretrained(str(out), safe_serialization=True)
    return Path(out)



def randomize_embedding_A(adapter: str | Path, *, seed: int = 8, std: float = 0.5) -> Path:
    """PEFT initialises lora_embedding_A to zeros (and B randomly): an untrained embedding LoRA is
    then an exact no-op. Fill A with random values in the saved file so the adapter changes the
    embedding (peft reads the file back for the reference merge)."""
    from safetensors.torch import load_file, save_file

    f = Path(adapter) / "adapter_model.safetensors"
    tensors = load_file(str(f))
    g = torch.Generator().manual_seed(seed)
    for key, t in tensors.items():
        if key.endswith("lora_embedding_A"):
            tensors[key] = std * torch.randn(t.shape, generator=g, dtype=t.dtype)
    save_file(tensors, str(f), metadata={"format": "pt"})
    return Path(adapter)
