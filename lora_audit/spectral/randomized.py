"""The dense fast path (full fine-tunes, merged models, DoRA): the top k of W1 without its full
SVD, by block Krylov iteration (``krylov.topk_svd``) with a residual check, started on the base's
top-(k + 10) left singular vectors: a fine-tune moves W0 by little, so that start is nearly the
answer and a few blocks converge. Then c = U0^T y against ALL base vectors (the paper's test).

Not converged within the Krylov budget -> ``converged=False`` and the engine reruns the exact
algorithm; nothing approximate is reported as exact.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .exact import match_against_base
from .krylov import topk_svd
from .types import BaseSpectrum, TopK

_OVERSAMPLE = 10


def randomized_topk(base: BaseSpectrum, W1: Tensor, k: int, *, tol: float | None = None,
                    seed: int = 0) -> TopK:
    """Top-k left singular directions of the dense tuned matrix W1 (m, n), measured against the base."""
    out_dtype = base.U.dtype
    # float64 products: in float32 the residual floor (~1e-6 relative) is too close to the accuracy
    # the cosines need; the products are the whole cost and float64 only doubles it.
    U0 = base.float64()[0]  # converted once per base matrix
    W1 = W1.to(device=U0.device, dtype=torch.float64)
    m, n = W1.shape
    kk = min(k, m, n)
    tol = 1e-9 if tol is None else tol
    g = torch.Generator(device="cpu").manual_seed(seed)
    extra = torch.randn(m, 4, generator=g, dtype=W1.dtype).to(W1.device)  # guards against a start blind to a new direction
    X0 = torch.cat([U0[:, : kk + _OVERSAMPLE], extra], dim=1)  # (m, kk + 14)
    res = topk_svd(lambda X: W1 @ X, lambda Y: W1.T @ Y, X0, kk, tol=tol, max_dim=min(m, 8 * (kk + 14) + 64))
    max_cos, argmax, coords = match_against_base(U0, res.U)
    return TopK(singular_values=res.S.to(out_dtype), max_cos=max_cos.to(out_dtype), argmax_base=argmax,
                method="randomized", base_coords=coords.to(out_dtype), converged=res.converged,
                residual=res.residual)
