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

from contextlib import AbstractContextManager, contextmanager
from collections.abc import Iterator

import torch
from torch import Tensor


def mm(A: Tensor, X: Tensor) -> Tensor:
    """A @ X for a skinny X (or skinny result), in the orientation MKL runs fastest."""
    return (X.T @ A.T).T


@contextmanager
def threads(n: int) -> Iterator[None]:
    """Run torch's CPU kernels called from this thread on ``n`` threads inside this block, then
    restore the count this thread had.

    torch's count is per thread once that thread has read or set it, but a thread that has not yet
    done so takes whatever another thread set last: measured here, the main thread's first
    ``one_thread`` block read 1 while the reader thread was inside its own, "restored" 1, and every
    base SVD of a cold audit then ran on one core (1.9 s instead of 1.2 s a 2048-wide matrix on 2
    cores). So the heavy work is run under ``threads(n)`` with the count the caller had before the
    reader thread started (``engine.audit``), not with whatever the thread reads later."""
    before = torch.get_num_threads()
    if before == n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def one_thread() -> AbstractContextManager[None]:
    """Run torch's CPU kernels called from this thread on one thread inside this block.

    The LoRA path's kernels are small (QR and eigh of 2048 x 50 blocks, products with 16 columns):
    a second thread gains nothing on an idle machine, and on a busy one OpenMP's threads wait for
    each other at every barrier: measured here under a load average of 20 on 2 cores, a QR of a
    2048 x 20 block took 0.2 ms on one thread and 40-50 ms on two, one LoRA search 0.1 s against
    0.8-4.7 s, and a whole screen spent 330 s of 490 in QR. One thread also makes the results the
    same bits whatever torch's thread count (BLAS sums in another order on more threads).
    The reader thread and the main thread each use it for their part (``threads`` says how the
    count is kept per thread)."""
    return threads(1)
