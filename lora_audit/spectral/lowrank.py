"""The low-rank fast path: intruder dimensions of W1 = W0 + s·B·A without a second full SVD.

With the base's thin SVD W0 = U0 diag(S0) V0^T (p = min(m, n)), complete the bases by the parts
of B and A^T outside them, Qb = orth((I - U0 U0^T) B) and Qa = orth((I - V0 V0^T) A^T) (empty
for square matrices; needed for tall m > n and wide m < n ones), so that exactly

    W1 = [U0 Qb] · M · [V0 Qa]^T,   M = blockdiag(diag(S0), 0) + P Q^T,
    P = s·[U0^T B; Qb^T B]  ((p + rb) x r),   Q = [V0^T A^T; Qa^T A^T]  ((p + ra) x r).

[U0 Qb] has orthonormal columns, so the left singular vectors of W1 are y = [U0 Qb] c with c the
left singular vectors of the small "diagonal plus rank r" M, and c_i = <y, u0_i> for i < p:
max_i |c_i| over i < p is the paper's max |cos| against ALL base vectors, read off directly.
Products with M cost O(p·r) per vector; the top k of M come from ``krylov.topk_svd`` started on
the base's top directions and the adapter's column space, with a residual check (float64).

DoRA (W1 = diag(g)(W0 + s·B·A), g the magnitude over row norms) breaks this structure (a row
scaling is not diagonal in the base's singular basis), so it is not handled here; the engine
takes the randomised path on the materialised matrix for it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..checkpoints.deltas import DoRA, LowRank
from .krylov import topk_svd
from .types import BaseSpectrum, TopK

_OVERSAMPLE = 10


def _outside(basis: Tensor, X: Tensor, eps: float) -> Tensor:
    """Orthonormal basis of the part of X's columns outside span(basis) (may have 0 columns).

    ``basis`` is orthonormal only to the precision ``eps`` of the SVD that made it, so parts of X
    below ~eps·||X|| are rounding noise of the projection, not a direction outside the base
    space: they are dropped (including them would add a vector that is NOT orthogonal to the
    basis and break the exact factorisation)."""
    R = X - basis @ (basis.T @ X)  # (m, r)
    R = R - basis @ (basis.T @ R)  # second pass: orthogonal to the basis to working precision
    if R.shape[1] == 0:
        return R
    U, s, _ = torch.linalg.svd(R, full_matrices=False)
    tol = 100 * eps * max(float(X.norm()), 1e-300)
    return U[:, s > tol]


def lowrank_topk(base: BaseSpectrum, delta: LowRank | DoRA, k: int, *, tol: float = 1e-8) -> TopK:
    """Top-k left singular directions of W0 + s·B·A in the base's basis (see module docstring)."""
    if isinstance(delta, DoRA):
        raise NotImplementedError("DoRA's row normalisation is not low-rank in the base basis")
    dev, work = base.U.device, torch.float64
    U0, S0, V0 = base.float64()  # (m, p), (p,), (n, p); converted once per base matrix
    B = delta.B.to(device=dev, dtype=work)  # (m, r)
    A = delta.A.to(device=dev, dtype=work)  # (r, n)
    m, p = U0.shape
    n = V0.shape[0]
    eps = torch.finfo(base.U.dtype).eps
    Qb = _outside(U0, B, eps) if m > p else B.new_zeros(m, 0)  # (m, rb)
    Qa = _outside(V0, A.T, eps) if n > p else A.new_zeros(n, 0)  # (n, ra)
    P = delta.scale * torch.cat([U0.T @ B, Qb.T @ B])  # (p + rb, r)
    Q = torch.cat([V0.T @ A.T, Qa.T @ A.T])  # (p + ra, r)
    rows, cols = p + Qb.shape[1], p + Qa.shape[1]

    def mv(X: Tensor) -> Tensor:  # M X, X (cols, b) -> (rows, b)
        out = P @ (Q.T @ X)  # (rows, r) @ (r, b)
        out[:p] += S0[:, None] * X[:p]
        return out

    def rmv(Y: Tensor) -> Tensor:  # M^T Y, Y (rows, b) -> (cols, b)
        out = Q @ (P.T @ Y)  # (cols, r) @ (r, b)
        out[:p] += S0[:, None] * Y[:p]
        return out

    kk = min(k, p)
    start = torch.zeros(rows, min(rows, kk + _OVERSAMPLE), dtype=work, device=dev)
    start[torch.arange(start.shape[1]), torch.arange(start.shape[1])] = 1.0  # the base's top directions
    X0 = torch.cat([start, P], dim=1)  # ... and the adapter's column space
    res = topk_svd(mv, rmv, X0, kk, tol=tol, max_dim=min(rows, 30 * kk + 2 * P.shape[1] + 100))
    C = res.U  # (rows, kk): coordinates of y_j in [U0 Qb]
    max_cos, argmax = C[:p].abs().max(dim=0)
    out_dtype = base.U.dtype
    return TopK(singular_values=res.S.to(out_dtype), max_cos=max_cos.to(out_dtype), argmax_base=argmax,
                method="lowrank", base_coords=C[:p].to(out_dtype), converged=res.converged, residual=res.residual)


