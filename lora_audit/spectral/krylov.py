"""Top-k singular triplets of a matrix known only through products, by block Krylov iteration
with Rayleigh-Ritz extraction and an explicit residual check.

Why not ``torch.svd_lowrank``: it runs a fixed number of power iterations and says nothing about
whether the k-th vector converged; the intruder test needs the vectors themselves (cosines to
~1e-5), and tells a wrong answer apart from a right one only through the residual. Here:

    K_q = span{X0, (M M^T) X0, ..., (M M^T)^q X0}      (block Krylov space, orthonormal basis Q)
    (Q^T M)(Q^T M)^T = W~ diag(s^2) W~^T                 (Rayleigh-Ritz, via a d x d Gram matrix)
    y_j = Q w~_j,  v_j = M^T y_j / s_j,  residual_j = ||M v_j - s_j y_j||   (0 for true triplets)

and the space grows until max_j<=k residual_j <= tol * s_1. A good start block (the base's top
directions, the adapter's column space) makes a few blocks enough. If the space reaches
``max_dim`` the caller falls back to a dense SVD (``converged=False``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

MatVec = Callable[[Tensor], Tensor]


@dataclass
class KrylovResult:
    U: Tensor  # (m, k) left singular vectors
    S: Tensor  # (k,)
    converged: bool
    residual: float  # max_j<=k ||M v_j - s_j u_j|| / s_1
    dim: int  # size of the Krylov space used


def _orth_against(X: Tensor, Q: Tensor | None, drop_tol: float) -> Tensor:
    """Orthonormalise the columns of X against Q and among themselves (two passes of block
    Gram-Schmidt, then a rank-revealing QR); columns that vanish are dropped."""
    for _ in range(2):
        if Q is not None and Q.shape[1]:
            X = X - Q @ (Q.T @ X)  # (m, d) @ (d, b) -> (m, b)
    if X.shape[1] == 0:
        return X
    U, s, _ = torch.linalg.svd(X, full_matrices=False)
    keep = s > drop_tol * max(float(s[0]), 1e-300)
    X = U[:, keep]
    if Q is not None and Q.shape[1] and X.shape[1]:
        X = X - Q @ (Q.T @ X)
        X, _ = torch.linalg.qr(X)
    return X


def topk_svd(mv: MatVec, rmv: MatVec, X0: Tensor, k: int, *, tol: float = 1e-8, max_dim: int | None = None,
             block: int | None = None) -> KrylovResult:
    """Top-k left singular vectors/values of an (m x n) operator M.

    Args:
        mv: X (n, b) -> M X (m, b).     rmv: Y (m, b) -> M^T Y (n, b).
        X0: (m, b0) start block in the left space (need not be orthonormal).
        tol: residual tolerance relative to the largest singular value.
        max_dim: stop growing the space at this dimension (default min(m, 40 k + 200)).
    """
    m = X0.shape[0]
    dtype = X0.dtype
    eps = torch.finfo(dtype).eps
    max_dim = min(m, max_dim or (40 * k + 200))
    Q = _orth_against(X0, None, drop_tol=100 * eps)
    Z = rmv(Q)  # (n, d): M^T Q, kept so Rayleigh-Ritz never recomputes old products
    G = Z.T @ Z  # (d, d) = Q^T M M^T Q, grown block by block
    last = Q
    block = block or max(Q.shape[1], k + 4)
    while True:
        # Rayleigh-Ritz on Q^T M = Z^T through its Gram matrix: Z^T Z = W diag(s^2) W^T. Squaring
        # costs accuracy only for singular values far below s_1, and the residual below checks
        # the top k exactly.
        evals, W = torch.linalg.eigh(G)  # ascending
        top = torch.flip(torch.arange(max(0, evals.shape[0] - k), evals.shape[0], device=G.device), [0])
        s = evals[top].clamp_min(0).sqrt()
        kk = int((s > 0).sum())
        s, Wk = s[:kk], W[:, top[:kk]]  # (kk,), (d, kk)
        Y = Q @ Wk  # (m, d) @ (d, kk) -> (m, kk)
        V = (Z @ Wk) / s  # (n, kk): right vectors v_j = M^T y_j / s_j
        R = mv(V) - Y * s  # (m, kk): M v_j - s_j y_j
        scale = max(float(s[0]), 1e-300) if kk else 1.0
        residual = float(R.norm(dim=0).max()) / scale if kk else float("inf")
        if (residual <= tol and kk == k) or Q.shape[1] >= max_dim:
            return KrylovResult(U=Y, S=s, converged=residual <= tol and kk == k, residual=residual, dim=Q.shape[1])
        # grow: the next Krylov block (M M^T) last, plus the current residual directions
        Wn = torch.cat([mv(Z[:, -last.shape[1]:]), R], dim=1)[:, : block + kk]
        new = _orth_against(Wn, Q, drop_tol=100 * eps)
        if new.shape[1] == 0:  # the space is invariant: Rayleigh-Ritz is exact already
            return KrylovResult(U=Y, S=s, converged=kk == k, residual=residual, dim=Q.shape[1])
        new = new[:, : max_dim - Q.shape[1]]
        Zn = rmv(new)  # (n, b)
        G = torch.cat([torch.cat([G, Z.T @ Zn], dim=1), torch.cat([Zn.T @ Z, Zn.T @ Zn], dim=1)], dim=0)
        Q = torch.cat([Q, new], dim=1)
        Z = torch.cat([Z, Zn], dim=1)
        last = new
