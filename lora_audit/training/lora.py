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


def linear_shapes(model) -> dict[str, tuple[int, int]]:
    """{module: (out, in)} of a loaded model's linear layers, the output head left out (peft's
    "all-linear" leaves it out too)."""
    import torch

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {n: (m.out_features, m.in_features) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and m is not head}


def header_linear_shapes(base: str) -> dict[str, tuple[int, int]] | None:
    """``linear_shapes`` read from a local model folder's weight headers (nothing loaded), or None
    for a base that must be loaded to know them (GGUF, hub ids)."""
    from pathlib import Path

    from ..checkpoints.detect import Kind, detect
    from ..checkpoints.layout import is_embedding, is_head
    from ..checkpoints.sources import open_weights

    if not Path(str(base)).expanduser().exists() or detect(base) != Kind.HF_FOLDER:
        return None
    src = open_weights(base)
    return {n[: -len(".weight")]: tuple(src.shape(n)) for n in src.names()
            if n.endswith(".weight") and len(src.shape(n)) == 2 and not is_embedding(n) and not is_head(n)}


def check_rank(shapes: dict[str, tuple[int, int]], rank: int, target_modules: list[str] | None, *,
               method: str, factor: int = 1) -> None:
    """InputError, naming the value, when ``factor`` x ``rank`` (LoRA-GA initialises from 2r singular
    directions) exceeds the smaller side of a matrix the adapter would train (``target_modules``,
    default every linear layer but the head): a rank-r update of an m x n matrix has rank at most
    min(m, n), so the rest is parameters and disk for nothing."""
    targeted = {n: s for n, s in shapes.items()
                if not target_modules or n.rsplit(".", 1)[-1] in target_modules}
    if not targeted:
        return
    name, (rows, cols) = min(targeted.items(), key=lambda kv: min(kv[1]))
    if factor * rank > min(rows, cols):
        from ..errors import InputError

        need = f"{factor} x --rank = {factor * rank}" if factor > 1 else f"--rank {rank}"
        raise InputError(f"--rank {rank}: {method} needs {need} <= the smaller side of every matrix it trains, but "
                         f"{name} is {rows}x{cols} (at most --rank {min(rows, cols) // factor}); a higher rank adds "
                         "parameters that cannot change the update")


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
