"""The paper's exact intruder-dimension algorithm: two full (thin) SVDs per matrix.

Shuttleworth, Andreas, Torralba, Sharma, "LoRA vs Full Fine-tuning: An Illusion of Equivalence"
(arXiv 2410.21228), Sec. 3 and their ``find_intruder_dimensions.py``:

    W0 = U0 S0 V0^T,   W1 = U1 S1 V1^T                      (thin SVDs, full_matrices=False)
    c_j = max_i |<u1_j, u0_i>|   for the top-k columns u1_j of U1, over ALL columns u0_i of U0
    u1_j is an intruder dimension  <=>  c_j < epsilon

Only left singular vectors are used; every matrix is (out x in), so they live in the layer's
output space. SVDs run in float32 or float64 (never bf16/fp16: torch refuses them, and the
cosines would be noise). This is the ground truth the fast paths (``lowrank``, ``dense``)
are checked against, and what ``lora-audit spectrum --exact`` runs.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from .blas import mm
from .types import BaseSpectrum, TopK

_SVD_DTYPES = (torch.float32, torch.float64)


def _check_float(W: Tensor, what: str) -> Tensor:
    if W.ndim != 2:
        raise ValueError(f"{what}: expected a 2-D matrix, got shape {tuple(W.shape)}")
    if W.dtype not in _SVD_DTYPES:
        W = W.to(torch.float32)
    return W


def base_spectrum(W0: Tensor, *, key: str | None = None) -> BaseSpectrum:
    """The thin SVD W0 = U diag(S) Vh of a base matrix, on W0's device and in its dtype
    (float32 or float64; half precision is upcast to float32).

    U: (m, p), S: (p,), Vh: (p, n), p = min(m, n); singular values descending.
    """
    W0 = _check_float(W0, "base matrix")
    U, S, Vh = torch.linalg.svd(W0, full_matrices=False)  # (m, p), (p,), (p, n)
    return BaseSpectrum(U=U, S=S, Vh=Vh, key=key)


def match_against_base(U0: Tensor, Y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Cosines of the unit columns of ``Y`` (m, k) against all base left singular vectors.

    Returns (max_cos (k,), argmax_base (k,) int64, base_coords (p, k) = U0^T Y, signed).
    """
    coords = mm(U0.T, Y.to(U0.dtype))  # (p, m) @ (m, k) -> (p, k)
    max_cos, argmax = coords.abs().max(dim=0)  # (k,), (k,)
    return max_cos, argmax, coords


def exact_topk(base: BaseSpectrum, W1: Tensor, k: int) -> TopK:
    """The paper's algorithm for one tuned matrix W1 (m, n), given the base's SVD.

    Full thin SVD of W1; its top k' = min(k, m, n) left singular vectors y_j; for each,
    ``max_cos[j] = max_i |<y_j, u0_i>|`` over ALL columns of U0, and the index i of the best
    match. Computed in the base spectrum's dtype and on its device.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    W1 = _check_float(W1, "tuned matrix")
    if tuple(W1.shape) != base.shape:
        raise ValueError(f"tuned matrix shape {tuple(W1.shape)} != base shape {base.shape}")
    W1 = W1.to(device=base.U.device, dtype=base.U.dtype)
    U1, S1, _ = torch.linalg.svd(W1, full_matrices=False)  # (m, p), (p,)
    return topk_from_svd(base, U1, S1, k)


def topk_from_svd(base: BaseSpectrum, U1: Tensor, S1: Tensor, k: int) -> TopK:
    """The paper's test on W1's thin SVD (U1 (m, p), S1 (p,) descending), given the base's SVD:
    the top k' = min(k, p) columns of U1 against ALL columns of U0."""
    kk = min(k, U1.shape[1])
    max_cos, argmax, coords = match_against_base(base.U, U1[:, :kk])
    return TopK(singular_values=S1[:kk], max_cos=max_cos, argmax_base=argmax, method="exact",
                base_coords=coords)


def rank_tolerance(sigma_1: float, shape: tuple[int, int], dtype: torch.dtype) -> float:
    """Singular values of a matrix at or below ``max(m, n) * eps(dtype) * sigma_1`` are numerically 0.

    A backward-stable SVD returns the exact singular values of W + E with ||E||_2 about
    eps * ||W||_2 (times a slowly growing function of the size), and W1 = W0 + dW, formed in the
    audit's dtype, is itself known only to that precision: a singular value below the bound cannot
    be told from 0, and its singular vector is an arbitrary direction of a (near-)null space whose
    cosines with the base mean nothing. The bound is numpy's ``matrix_rank`` default (also
    MATLAB's ``rank``; Press et al., Numerical Recipes, 2nd ed., Sec. 2.6)."""
    return float(max(shape)) * float(torch.finfo(dtype).eps) * float(sigma_1)


def examined(top: TopK, shape: tuple[int, int], dtype: torch.dtype) -> TopK:
    """``top`` without its numerically null directions (``rank_tolerance``): those are never
    examined, so never intruders. ``len(result.singular_values)`` is min(k, m, n, numerical rank),
    0 for an all-zero W1. ``top.singular_values[0]`` must be W1's largest singular value."""
    S = top.singular_values
    if S.numel() == 0 or not bool(torch.isfinite(S[0])):  # an overflow: left to the engine's check
        return top
    n = int((S > rank_tolerance(float(S[0]), shape, dtype)).sum())
    if n == S.numel():
        return top
    coords = None if top.base_coords is None else top.base_coords[:, :n]
    return replace(top, singular_values=S[:n], max_cos=top.max_cos[:n], argmax_base=top.argmax_base[:n],
                   base_coords=coords)
