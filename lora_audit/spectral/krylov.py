"""Top-k singular triplets of a matrix known only through products, by a growing subspace with
Rayleigh-Ritz extraction and an explicit residual check.

Why not ``torch.svd_lowrank``: it runs a fixed number of power iterations and says nothing about
whether the k-th vector converged; the intruder test needs the vectors themselves (cosines to
~1e-5), and tells a wrong answer apart from a right one only through the residual. Here, with Q
an orthonormal basis of the current space (left side):

    (Q^T M)(Q^T M)^T = W~ diag(s^2) W~^T                 (Rayleigh-Ritz, via a d x d Gram matrix)
    y_j = Q w~_j,  v_j = M^T y_j / s_j,  residual_j = ||M v_j - s_j y_j||   (0 for true triplets)

and the space grows until max_j<=k residual_j <= tol * s_1. How it grows:

- block Krylov (default): by (M M^T) times the newest block, plus the residuals R. A good start
  block (the base's top directions) makes a few blocks enough.
- with ``precondition``: also by the preconditioned residuals precondition(R, s), e.g.
  (s_j^2 - D^2)^{-1} s_j R_j for a matrix whose M M^T is nearly the diagonal D^2 (Davidson's
  correction). Converges in 2-4 steps where plain block Krylov needs 4-6.
- ``krylov=False`` with a preconditioner: Davidson's method proper, by R and the corrections
  only: steps of ~2k vectors instead of ~3k + k. Faster, but it only ever looks near the current
  Ritz vectors: with a poor preconditioner it can converge to k true singular triplets that are
  not the TOP k (small residuals and all). Use it only with a check that counts the singular
  values above the k-th found (the LoRA path has one: ``lowrank.count_above``).

The residual check says the pairs are singular triplets; the start block and the Krylov block
make it (very) likely that they are the top ones. If the space reaches ``max_dim``
the caller falls back to a dense SVD (``converged=False``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .blas import mm

MatVec = Callable[[Tensor], Tensor]


@dataclass
class KrylovResult:
    U: Tensor  # (m, k) left singular vectors
    S: Tensor  # (k,)
    converged: bool
    residual: float  # max_j<=k ||M v_j - s_j u_j|| / s_1
    dim: int  # size of the Krylov space used


def _orth_against(X: Tensor, Q: Tensor | None, drop_tol: float) -> Tensor:
    """Orthonormalise the columns of X against Q and among themselves; columns that are (nearly)
    dependent are dropped.

    Two passes of block classical Gram-Schmidt against Q ("twice is enough": the result is
    orthogonal to Q to working precision relative to its own norm), then the columns are scaled to
    unit norm and reduced to an orthonormal basis of their span through the eigen-decomposition of
    their small Gram matrix, keeping directions whose singular value is above ``drop_tol`` (the
    rest are dependent on the others or on Q); a final QR cleans the last bits of orthogonality."""
    before = X.norm(dim=0)
    for _ in range(2):
        if Q is not None and Q.shape[1]:
            X = X - mm(Q, mm(Q.T, X))  # (m, d) @ (d, b) -> (m, b)
    norms = X.norm(dim=0)
    new = norms > drop_tol * before  # columns (nearly) inside span(Q) carry nothing new
    X = X / norms if bool(new.all()) else X[:, new] / norms[new]  # (boolean indexing copies: only when needed)
    if X.shape[1] == 0:
        return X
    evals, V = torch.linalg.eigh(mm(X.T, X))  # (b, b), ascending; singular values^2 of X
    keep = int((evals <= (drop_tol ** 2) * max(float(evals[-1]), 1e-300)).sum())  # the first `keep` are dropped
    X = mm(X, V[:, keep:] / evals[keep:].sqrt())  # orthonormal to ~eps / drop_tol
    # A Cholesky QR pass cleans the last bits: X^T X = I + O(eps / drop_tol) is well conditioned,
    # so X L^-T is orthonormal to working precision (Cholesky QR's error grows with cond(X)^2 = 1
    # here). Two small products and a triangular solve: a quarter of a Householder QR of X (1 ms
    # for 2048 x 52 in float64 on one thread here), with no column-major result to copy.
    L, info = torch.linalg.cholesky_ex(mm(X.T, X))  # (b, b)
    if int(info):  # not positive definite: only with NaN/Inf in X; QR carries them to the residual check
        return torch.linalg.qr(X)[0].contiguous()
    return torch.linalg.solve_triangular(L, X.T, upper=False).T.contiguous()  # X L^-T


def shifted_diagonal(D2: Tensor, s: Tensor) -> Tensor:
    """theta_j - D2_i for theta_j = s_j^2, (len(D2), len(s)), with entries closer to 0 than
    1e-10 theta_j moved out to that distance (same sign): the denominators of Davidson's diagonal
    correction (theta_j - D^2)^{-1} r_j, kept finite where a Ritz value meets a diagonal entry."""
    theta = (s * s)[None, :]
    den = theta - D2[:, None]
    tiny = 1e-10 * theta
    return torch.where(den.abs() < tiny, torch.where(den < 0, -tiny, tiny), den)


def topk_svd(mv: MatVec, rmv: MatVec, X0: Tensor, k: int, *, tol: float = 1e-8, max_dim: int | None = None,
             block: int | None = None, precondition: Callable[[Tensor, Tensor], Tensor] | None = None,
             krylov: bool = True) -> KrylovResult:
    """Top-k left singular vectors/values of an (m x n) operator M.

    Args:
        mv: X (n, b) -> M X (m, b).     rmv: Y (m, b) -> M^T Y (n, b).
        X0: (m, b0) start block in the left space (need not be orthonormal).
        tol: residual tolerance relative to the largest singular value.
        max_dim: stop growing the space at this dimension (default min(m, 40 k + 200)).
        precondition: (R (m, kk), s (kk,)) -> correction directions (m, b), added to each
            expansion (module docstring).
        krylov: grow by the Krylov block too; False (with a preconditioner) is Davidson's method,
            which needs an outside check that no top singular value was missed.
    """
    m = X0.shape[0]
    dtype = X0.dtype
    drop = 100 * torch.finfo(dtype).eps ** 0.5  # the Gram matrix in _orth_against squares: half the digits
    max_dim = min(m, max_dim or (40 * k + 200))
    Q = _orth_against(X0, None, drop_tol=drop)
    Z = rmv(Q)  # (n, d): M^T Q, kept so Rayleigh-Ritz never recomputes old products
    G = mm(Z.T, Z)  # (d, d) = Q^T M M^T Q, grown block by block
    last = Q
    block = block or max(Q.shape[1], k + 4)
    while True:
        # Rayleigh-Ritz on Q^T M = Z^T through its Gram matrix: Z^T Z = W diag(s^2) W^T. Squaring
        # costs accuracy only for singular values far below s_1, and the residual below checks
        # the top k exactly.
        evals, W = torch.linalg.eigh(G)  # ascending
        first = max(0, evals.shape[0] - k)
        s = evals[first:].flip(0).clamp_min(0).sqrt()  # the top k, descending
        kk = int((s > 0).sum())
        s, Wk = s[:kk], W[:, first:].flip(1)[:, :kk]  # (kk,), (d, kk)
        Y = mm(Q, Wk)  # (m, d) @ (d, kk) -> (m, kk)
        V = mm(Z, Wk) / s  # (n, kk): right vectors v_j = M^T y_j / s_j
        R = mv(V) - Y * s  # (m, kk): M v_j - s_j y_j
        scale = max(float(s[0]), 1e-300) if kk else 1.0
        residual = float(R.norm(dim=0).max()) / scale if kk else float("inf")
        if (residual <= tol and kk == k) or Q.shape[1] >= max_dim:
            return KrylovResult(U=Y, S=s, converged=residual <= tol and kk == k, residual=residual, dim=Q.shape[1])
        # grow: the next Krylov block (M M^T) last, the residuals, their preconditioned corrections
        parts = [mv(Z[:, -last.shape[1]:])[:, :block]] if krylov or precondition is None else []
        parts.append(R)
        if precondition is not None:
            parts.append(precondition(R, s))
        Wn = torch.cat(parts, dim=1)
        new = _orth_against(Wn, Q, drop_tol=drop)
        if new.shape[1] == 0:  # the space is invariant: Rayleigh-Ritz is exact already
            return KrylovResult(U=Y, S=s, converged=kk == k, residual=residual, dim=Q.shape[1])
        new = new[:, : max_dim - Q.shape[1]]
        Zn = rmv(new)  # (n, b)
        ZZn = mm(Z.T, Zn)  # (d, b)
        G = torch.cat([torch.cat([G, ZZn], dim=1), torch.cat([ZZn.T, mm(Zn.T, Zn)], dim=1)], dim=0)
        Q = torch.cat([Q, new], dim=1)
        Z = torch.cat([Z, Zn], dim=1)
        last = new
