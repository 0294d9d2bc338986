"""The low-rank fast path: intruder dimensions of W1 = W0 + s·B·A without a second full SVD.

With the base's thin SVD W0 = U0 diag(S0) V0^T (p = min(m, n)), complete the bases by the parts
of B and A^T outside them, Qb = orth((I - U0 U0^T) B) and Qa = orth((I - V0 V0^T) A^T) (empty
for square matrices; needed for tall m > n and wide m < n ones), so that exactly

    W1 = [U0 Qb] · M · [V0 Qa]^T,   M = blockdiag(diag(S0), 0) + P Q^T,
    P = s·[U0^T B; Qb^T B]  ((p + rb) x r),   Q = [V0^T A^T; Qa^T A^T]  ((p + ra) x r).

[U0 Qb] has orthonormal columns, so the left singular vectors of W1 are y = [U0 Qb] c with c the
left singular vectors of the small "diagonal plus rank r" M, and c_i = <y, u0_i> for i < p:
max_i |c_i| over i < p is the paper's max |cos| against ALL base vectors, read off directly.
Products with M cost O(p·r) per vector. The projections U0^T B and V0^T A^T run in the audit's
dtype (float32 by default: their rounding, ~1e-7, is far below the float32 base SVD's own error;
measured against the float64 reference on SmolLM2 and synthetic bases, the cosines agree with
float64 projections to 1e-6), everything after them in float64.

The top k of M: ``krylov.topk_svd`` in Davidson mode, since M M^T = D^2 + (rank 2r) is nearly
diagonal: started on the base's top k + 10 directions and the span of L = [D Q, P], grown by the
residuals R and the diagonally preconditioned residuals (s^2 - D^2)^{-1} s R, and accepted on the
residual check (max_j ||M v_j - s_j y_j|| <= 1e-8 s_1).

A certificate that none of the top k was missed: with H = M M^T = D^2 + L C L^T,
C = [[0, I], [I, Q^T Q]], Haynsworth's inertia additivity on [[D^2 - x, L], [L^T, -C^-1]] counts
the eigenvalues of H above any x that is not some D_i^2,

    #{lambda(H) > x} = #{D_i^2 > x} + #{positive eigenvalues of -C^-1 - L^T (D^2 - x)^-1 L} - r,

in O(p r^2). Ritz values are lower bounds (theta_j <= lambda_j), so the count at x just below
theta_k is k exactly when the k Ritz pairs found are the top k; otherwise the result is reported
as not converged and the engine falls back to the exact SVD.

DoRA (W1 = diag(g)(W0 + s·B·A), g the magnitude over row norms) breaks this structure (a row
scaling is not diagonal in the base's singular basis), so it is not handled here; the engine
takes the block Krylov path (``dense``) on the materialised matrix for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..checkpoints.deltas import DoRA, LowRank
from .blas import mm
from .krylov import shifted_diagonal, topk_svd
from .types import BaseSpectrum, TopK

_OVERSAMPLE = 10


def _split(basis: Tensor, X: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(basis^T X, orthonormal basis of the part of X's columns outside span(basis)).

    The projection is refined by a second Gram-Schmidt pass when the first one cancelled much of
    X (Kahan's "twice is enough"). ``basis`` is orthonormal only to the precision ``eps`` of the
    SVD that made it, so parts of X below ~eps·||X|| are rounding noise of the projection, not a
    direction outside the base space: they are dropped (including them would add a vector that is
    NOT orthogonal to the basis and break the exact factorisation)."""
    C = mm(basis.T, X)  # (p, r)
    if basis.shape[0] == basis.shape[1]:
        return C, X.new_zeros(X.shape[0], 0, dtype=torch.float64)
    R = X - mm(basis, C)  # (m, r)
    if float(R.norm()) < 0.5 * float(X.norm()):
        C2 = mm(basis.T, R)
        R = R - mm(basis, C2)
        C = C + C2
    U, s, _ = torch.linalg.svd(R.to(torch.float64), full_matrices=False)
    tol = 100 * eps * max(float(X.norm()), 1e-300)
    return C, U[:, s > tol]


@dataclass
class Projection:
    """A LoRA update's factors in the base's basis (``project``): U0^T B (p, r), the orthonormal
    part of B outside span(U0) (m, rb), V0^T A^T (p, r) and that of A^T outside span(V0) (n, ra).
    The one pass over U0 and V0 of the fast path, so the engine can run it in the reader thread
    while the main thread searches the previous matrix."""

    PB: Tensor
    Qb: Tensor
    QA: Tensor
    Qa: Tensor


def project(base: BaseSpectrum, delta: LowRank) -> Projection:
    """``Projection`` of ``delta`` onto ``base`` (in the base's dtype and on its device)."""
    U0, Vh0 = base.U, base.Vh
    B = delta.B.to(device=U0.device, dtype=U0.dtype)  # (m, r)
    A = delta.A.to(device=U0.device, dtype=U0.dtype)  # (r, n)
    eps = torch.finfo(U0.dtype).eps
    PB, Qb = _split(U0, B, eps)  # U0^T B (p, r), (m, rb)
    QA, Qa = _split(Vh0.T, A.T, eps)  # V0^T A^T (p, r), (n, ra)
    return Projection(PB=PB, Qb=Qb, QA=QA, Qa=Qa)


def lowrank_topk(base: BaseSpectrum, delta: LowRank | DoRA, k: int, *, tol: float = 1e-8,
                 projection: Projection | None = None) -> TopK:
    """Top-k left singular directions of W0 + s·B·A in the base's basis (see module docstring).
    ``projection``: ``project(base, delta)`` when it was computed already."""
    if isinstance(delta, DoRA):
        raise NotImplementedError("DoRA's row normalisation is not low-rank in the base basis")
    dev, work = base.U.device, torch.float64
    S0 = base.S  # (p,) in the audit's dtype
    p = base.U.shape[1]
    pr = projection if projection is not None else project(base, delta)
    PB, Qb, QA, Qa = pr.PB, pr.Qb, pr.QA, pr.Qa
    B = delta.B.to(device=dev, dtype=base.U.dtype).to(work)  # (m, r), rounded as the projections saw it
    A = delta.A.to(device=dev, dtype=base.U.dtype).to(work)  # (r, n)
    P = delta.scale * torch.cat([PB.to(work), Qb.T @ B])  # (p + rb, r)
    Q = torch.cat([QA.to(work), Qa.T @ A.T])  # (p + ra, r)
    S0 = S0.to(work)
    rows = p + Qb.shape[1]  # M is (rows x p + Qa.shape[1])

    def mv(X: Tensor) -> Tensor:  # M X, X (cols, b) -> (rows, b)
        out = mm(P, mm(Q.T, X))  # (rows, r) @ (r, b)
        out[:p] += S0[:, None] * X[:p]
        return out

    def rmv(Y: Tensor) -> Tensor:  # M^T Y, Y (rows, b) -> (cols, b)
        out = mm(Q, mm(P.T, Y))  # (cols, r) @ (r, b)
        out[:p] += S0[:, None] * Y[:p]
        return out

    D2 = torch.zeros(rows, dtype=work, device=dev)
    D2[:p] = S0 * S0  # diagonal part of M M^T
    E = torch.zeros(rows, Q.shape[1], dtype=work, device=dev)
    E[:p] = S0[:, None] * Q[:p]  # D Q: M M^T = D^2 + E P^T + P E^T + P (Q^T Q) P^T

    def precondition(R: Tensor, s: Tensor) -> Tensor:  # Davidson: (s^2 - D^2)^{-1} s R
        return R * s[None, :] / shifted_diagonal(D2, s)

    kk = min(k, p)
    start = torch.zeros(rows, min(rows, kk + _OVERSAMPLE), dtype=work, device=dev)
    start[torch.arange(start.shape[1]), torch.arange(start.shape[1])] = 1.0  # the base's top directions
    X0 = torch.cat([start, P, E], dim=1)  # ... and the span of L = [D Q, P]
    res = topk_svd(mv, rmv, X0, kk, tol=tol, max_dim=min(rows, 30 * kk + 4 * P.shape[1] + 100),
                   precondition=precondition, krylov=False)  # Davidson: certified by count_above below
    converged, notes = res.converged, None
    if converged:
        x = float(res.S[-1]) ** 2 * (1 - 1e-6)
        try:
            above: int | str = count_above(x, D2, E, P, Q.T @ Q)
        except (ValueError, RuntimeError) as e:  # x on a pole, or a non-finite Schur complement
            above = f"not computable ({e})"
        if above != kk:
            converged = False
            notes = f"inertia check failed: {above} eigenvalues of M M^T above the k-th Ritz value, expected {kk}"
    C = res.U  # (rows, kk): coordinates of y_j in [U0 Qb]
    max_cos, argmax = C[:p].abs().max(dim=0)
    out_dtype = base.U.dtype
    return TopK(singular_values=res.S.to(out_dtype), max_cos=max_cos.to(out_dtype), argmax_base=argmax,
                method="lowrank", base_coords=C[:p].to(out_dtype), converged=converged, residual=res.residual,
                note=notes)


def count_above(x: float, D2: Tensor, E: Tensor, P: Tensor, G: Tensor) -> int:
    """How many eigenvalues of H = diag(D2) + E P^T + P E^T + P G P^T exceed x (x not in D2).

    H = diag(D2) + L C L^T with L = [E, P], C = [[0, I], [I, G]], C^-1 = [[-G, I], [I, 0]] of
    inertia (r, r, 0); the Schur complements of [[diag(D2) - x, L], [L^T, -C^-1]] give
    n+(H - x) = n+(D2 - x) + n+(-C^-1 - L^T (D2 - x)^-1 L) - r (Haynsworth)."""
    r = P.shape[1]
    L = torch.cat([E, P], dim=1)  # (rows, 2r)
    eye, zero = torch.eye(r, dtype=G.dtype, device=G.device), torch.zeros(r, r, dtype=G.dtype, device=G.device)
    Cinv = torch.cat([torch.cat([-G, eye], dim=1), torch.cat([eye, zero], dim=1)], dim=0)
    S = -Cinv - L.T @ (L / (D2 - x)[:, None])
    S = (S + S.T) / 2
    if not bool(torch.isfinite(S).all()):
        raise ValueError("x is (numerically) one of the D^2")
    return int((D2 > x).sum()) + int((torch.linalg.eigvalsh(S) > 0).sum()) - r
