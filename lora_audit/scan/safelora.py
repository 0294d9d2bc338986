"""Safe LoRA's alignment score of an update (Hsu et al. 2024, "Safe LoRA: the Silver Lining of
Reducing Safety Risks when Fine-tuning Large Language Models", arXiv 2405.16833).

With the model before safety training (W_u, ``--unaligned``) and after it (W_a, here BASE), each
matrix has an alignment matrix V = W_a - W_u (d x n). Safe LoRA projects an update dW on V's
column space and calls the layer safety-misaligned when the projection keeps little of it:

    score = cos(C dW, dW) = <C dW, dW>_F / (||C dW||_F ||dW||_F)

Which C. The public Safe LoRA code (the authors' repository and peft's safelora example) uses
C = V V^T / ||V||_F, which is not idempotent and so not a projection; the exact projection on
V's column space, V (V^T V)^+ V^T, is the identity whenever V has full row rank (almost always
for a dense V with n >= d), so its score would be 1 for every update. lora-audit implements the
public code's C. The factor 1 / ||V||_F cancels in the cosine, so the score is that of V V^T.
A layer is projected in Safe LoRA when the score is below its threshold (0.5 by default,
``THRESHOLD``).

Never formed: a d x d matrix. For a LoRA update dW = s B A (B: d x r, A: r x n), with
P = V (V^T B) (d x r) and the r x r Gram matrix G = A A^T:

    <C dW, dW> ~ sum((P^T B) * G),   ||C dW||^2 ~ sum((P^T P) * G),   ||dW||^2 ~ sum((B^T B) * G)

(each up to the same positive factor s^2 / ||V||_F or its square, which cancels). A dense update
is taken in blocks of columns: T = V^T dW[:, J] (n x |J|), U = V T, summing <U, dW[:, J]> and
||U||^2, so memory stays at n x |J|.
"""

from __future__ import annotations

import math

from torch import Tensor

from ..checkpoints.deltas import Delta, LowRank

THRESHOLD = 0.5  # Safe LoRA's default: layers scoring below it are projected
COLUMN_BLOCK = 256


def _cos(inner: float, cc: float, dd: float) -> float | None:
    if cc <= 0 or dd <= 0 or not all(math.isfinite(x) for x in (inner, cc, dd)):
        return None
    return inner / math.sqrt(cc * dd)


def lowrank_alignment_cos(B: Tensor, A: Tensor, V: Tensor) -> float | None:
    """cos(V V^T B A, B A) from the factors (module docstring); None when V or B A is zero."""
    B, A, V = B.double(), A.double(), V.double()
    P = V @ (V.T @ B)  # (d, n) @ ((n, d) @ (d, r)) -> (d, r)
    G = A @ A.T  # (r, r)
    return _cos(float(((P.T @ B) * G).sum()), float(((P.T @ P) * G).sum()), float(((B.T @ B) * G).sum()))


def dense_alignment_cos(dW: Tensor, V: Tensor, block: int = COLUMN_BLOCK) -> float | None:
    """cos(V V^T dW, dW) in blocks of ``block`` columns (module docstring)."""
    dW, V = dW.double(), V.double()
    inner = cc = 0.0
    for j in range(0, dW.shape[1], block):
        D = dW[:, j:j + block]  # (d, b)
        U = V @ (V.T @ D)  # (d, n) @ ((n, d) @ (d, b)) -> (d, b)
        inner += float((U * D).sum())
        cc += float((U * U).sum())
    return _cos(inner, cc, float((dW * dW).sum()))


def alignment_cos(delta: Delta, W0: Tensor, V: Tensor) -> float | None:
    """Safe LoRA's score of one update against the alignment matrix V = W_aligned - W_unaligned."""
    if isinstance(delta, LowRank):
        return lowrank_alignment_cos(delta.B, delta.A, V)
    return dense_alignment_cos(delta.update(W0), V)


def aggregate(scores: list[float]) -> dict[str, float | None]:
    """Per model: the mean and smallest score over the changed matrices, and the share Safe LoRA
    would project (score below ``THRESHOLD``)."""
    if not scores:
        return {"safelora_mean_cos": None, "safelora_min_cos": None, "safelora_below_share": None}
    return {"safelora_mean_cos": sum(scores) / len(scores), "safelora_min_cos": min(scores),
            "safelora_below_share": sum(s < THRESHOLD for s in scores) / len(scores)}
