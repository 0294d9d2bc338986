"""Records passed between the spectral engine, its exact path and its fast paths.

Orientation: every matrix is (out x in) = (m x n); left singular vectors live in R^m.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class BaseSpectrum:
    """The thin SVD of a base matrix W0 = U diag(S) Vh, p = min(m, n), singular values descending.

    Computed once per base matrix (and cached on disk, keyed by ``key``) and reused for every
    tuned model audited against that base.
    """

    U: Tensor  # (m, p)
    S: Tensor  # (p,)
    Vh: Tensor  # (p, n)
    key: str | None = None  # content hash of W0 (cache key), when known

    def __post_init__(self):
        # One memory layout whether the spectrum comes from the SVD (LAPACK's column-major views)
        # or from the cache (row-major): BLAS kernels differ by layout in their last bits, and a
        # cached audit must give the same numbers as an uncached one.
        self.U, self.S, self.Vh = self.U.contiguous(), self.S.contiguous(), self.Vh.contiguous()

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.U.shape[0]), int(self.Vh.shape[1]))


@dataclass
class TopK:
    """The top-k left singular directions of a tuned matrix W1, measured against the base.

    ``max_cos[j]`` = max_i |<y_j, u_i>| over ALL left singular vectors u_i of W0 (the paper's
    similarity), y_j the j-th left singular vector of W1 (descending singular value).
    """

    singular_values: Tensor  # (k,) of W1
    max_cos: Tensor  # (k,)
    argmax_base: Tensor  # (k,) int64: index i of the best-matching base vector (its rank in W0)
    method: str  # "exact" | "lowrank" | "block_krylov"
    base_coords: Tensor | None = None  # (p, k): U0^T y_j, signed; for the |cos| heat maps
    converged: bool = True  # False when an iterative method did not reach its tolerance
    residual: float | None = None  # the iterative method's convergence measure, when it has one
    note: str | None = None  # why an unconverged result is not trusted, beyond the residual
