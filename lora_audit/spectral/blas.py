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

from contextlib import contextmanager
from collections.abc import Iterator

import torch
from torch import Tensor


def mm(A: Tensor, X: Tensor) -> Tensor:
    """A @ X for a skinny X (or skinny result), in the orientation MKL runs fastest."""
    return (X.T @ A.T).T


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch's CPU kernels called from this thread on one thread inside this block.

    The LoRA path's kernels are small (QR and eigh of 2048 x 50 blocks, products with 16 columns):
    a second thread gains nothing on an idle machine, and on a busy one OpenMP's threads wait for
    each other at every barrier: measured here under a load average of 20 on 2 cores, a QR of a
    2048 x 20 block took 0.2 ms on one thread and 40-50 ms on two, one LoRA search 0.1 s against
    0.8-4.7 s, and a whole screen spent 330 s of 490 in QR. One thread also makes the results the
    same bits whatever torch's thread count (BLAS sums in another order on more threads).

    torch's thread count is per thread once a thread has run parallel work (OpenMP's and MKL's
    settings are thread-local), so this sets and restores the calling thread's own count; the
    reader thread and the main thread each use it for their part."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
