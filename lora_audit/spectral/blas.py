"""One matrix product for blocks of vectors: ``A @ X`` with X skinny (m x b, b << m).

MKL (torch's CPU BLAS) is 2-4x faster here, and sometimes 10-40x, when the skinny operand is on
the LEFT: (X^T A^T)^T instead of A X. Measured on this project's 2-core CPU, one thread, float64,
A 2048 x 2048 (ms, a one-off micro-benchmark when this was written; ``bench/bench_spectrum.py``
shows only the end-to-end effect):

    b     A @ X   A.T @ X   (X.T @ A.T).T   (X.T @ A).T
    10      8.7      36.6             8.4           8.9
    20     15.1      23.0             6.8           7.7

and the same for the Krylov bases (A = Q, 2048 x 150: 1.0-1.4 ms against 0.5). The transposes
are views; the result is a transposed view of a contiguous (b x m) array, which the next ``mm``
consumes in the fast orientation again. Same numbers as ``A @ X`` up to rounding order.
"""

from __future__ import annotations

from torch import Tensor


def mm(A: Tensor, X: Tensor) -> Tensor:
    """A @ X for a skinny X (or skinny result), in the orientation MKL runs fastest."""
    return (X.T @ A.T).T
