"""Independent references for the spectral tests: peft's own merge and plain float64 formulas.

Nothing here calls lora_audit: the merged tuned weights come from ``PeftModel.merge_and_unload``
(or the saved tuned folder), the intruder counts from ``tests.helpers.reference_intruders``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tests.helpers import reference_intruders

EXCLUDED = ("embed_tokens", "lm_head", "wte", "wpe")


def _state_dict_out_in(model, include_embeddings: bool = False) -> dict[str, torch.Tensor]:
    """Every 2-D weight of a transformers model, as (out x in) float64: GPT-2 Conv1D weights are
    stored (in x out) and are transposed here (transformers.pytorch_utils.Conv1D). Embedding
    tables stay as stored, (vocab x dim)."""
    from transformers.pytorch_utils import Conv1D

    conv1d = {f"{name}.weight" for name, mod in model.named_modules() if isinstance(mod, Conv1D)}
    out = {}
    for name, p in model.state_dict().items():
        if p.ndim != 2 or (not include_embeddings and any(x in name for x in EXCLUDED)):
            continue
        t = p.detach().double()
        out[name] = t.T.contiguous() if name in conv1d else t
    return out


def merged_weights(base_dir: str | Path, tuned: str | Path, include_embeddings: bool = False
                   ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(base weights, tuned weights) by base parameter name, float64, (out x in). An adapter is
    merged by peft's ``merge_and_unload``; a folder is read with transformers."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    base_w = _state_dict_out_in(base, include_embeddings)
    if (Path(tuned) / "adapter_config.json").exists():
        from peft import PeftModel

        fresh = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
        merged = PeftModel.from_pretrained(fresh, str(tuned)).merge_and_unload()
    else:
        merged = AutoModelForCausalLM.from_pretrained(str(tuned), dtype=torch.float32)
    return base_w, _state_dict_out_in(merged, include_embeddings)


def reference_audit(base_dir, tuned, k: int = 10, epsilon: float = 0.5, include_embeddings: bool = False
                    ) -> dict[str, tuple[list[float], int]]:
    """name -> (max_cos, intruder count) for every 2-D weight that differs (embeddings and lm_head
    only when asked)."""
    base_w, tuned_w = merged_weights(base_dir, tuned, include_embeddings)
    out = {}
    for name, W0 in base_w.items():
        W1 = tuned_w[name]
        if torch.equal(W0, W1):
            continue
        out[name] = reference_intruders(W0, W1, k=k, epsilon=epsilon)
    return out


def peft_deltas(base_dir, adapter) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """({name: dW}, {name: W0}) in float64, dW from peft's own ``get_delta_weight`` (its scaling,
    rsLoRA, rank/alpha patterns), for every LoRA layer of a non-DoRA adapter."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32),
                                      str(adapter)).double()
    deltas, bases = {}, {}
    for name, mod in model.named_modules():
        if isinstance(mod, LoraLayer) and "default" in mod.lora_A:
            key = name.removeprefix("base_model.model.") + ".weight"
            deltas[key] = mod.get_delta_weight("default").detach()
            bases[key] = mod.get_base_layer().weight.detach()
    return deltas, bases


def np_metrics(dW: np.ndarray, W0: np.ndarray) -> dict[str, float]:
    """Direct float64 formulas on a materialised dW (numpy, not torch)."""
    s = np.linalg.svd(dW, compute_uv=False)
    p = s / s.sum()
    p = p[p > 0]
    return {
        "delta_norm": float(np.linalg.norm(dW, "fro")),
        "relative_delta_norm": float(np.linalg.norm(dW, "fro") / np.linalg.norm(W0, "fro")),
        "effective_rank": float(np.exp(-(p * np.log(p)).sum())),
        "stable_rank": float(np.linalg.norm(dW, "fro") ** 2 / np.linalg.norm(dW, 2) ** 2),
        "spectral_norm": float(np.linalg.norm(dW, 2)),
    }


def intruder_case(m: int = 48, n: int = 40, *, seed: int = 0, strength: float = 20.0):
    """A base W0 (m, n) and a rank-1 update strength * u v^T that certainly creates an intruder:
    u has equal weight 1/sqrt(p) on every base left singular vector (|cos| = 1/sqrt(p) with each,
    far below 0.5), and its norm dominates W0's top singular value, so W1's top left singular
    vector is close to u. Returns (W0, u (m, 1), v (1, n), strength) in float64."""
    g = torch.Generator().manual_seed(seed)
    W0 = torch.randn(m, n, generator=g, dtype=torch.float64)
    U0, S0, _ = torch.linalg.svd(W0, full_matrices=False)  # (m, p)
    signs = torch.randint(0, 2, (U0.shape[1], 1), generator=g).double() * 2 - 1  # (p, 1)
    u = U0 @ signs / U0.shape[1] ** 0.5  # (m, p) @ (p, 1) -> (m, 1), unit norm
    v = torch.randn(1, n, generator=g, dtype=torch.float64)
    v = v / v.norm()
    return W0, u, v, strength * float(S0[0])


def cos_tolerance(W1: torch.Tensor, k: int = 10, *, floor: float = 1e-4, eps: float = 1.2e-7) -> list[float]:
    """How far a float32 audit's max |cos| of each top-k direction of W1 may fairly lie from the
    float64 reference: max(floor, 10 eps sigma_1 / gap_j), gap_j the distance from sigma_j to its
    nearest other singular value. A singular vector is determined only up to ||E|| / gap by a
    backward-stable SVD with error ||E|| ~ eps sigma_1 (Wedin's sin-theta theorem, Wedin 1972), so
    nearly equal singular values make float32 cosines move by far more than eps."""
    S = torch.linalg.svdvals(W1.double())
    out = []
    for j in range(min(k, S.numel())):
        gaps = [abs(float(S[j] - S[i])) for i in (j - 1, j + 1) if 0 <= i < S.numel()]
        gap = min(gaps) if gaps else float("inf")
        out.append(max(floor, 10 * eps * float(S[0]) / gap) if gap > 0 else 1.0)
    return out
