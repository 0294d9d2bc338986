"""What the spectral audit cannot measure, found before any SVD: non-finite weights (a diverged
fine-tune), updates that overflow the audit's dtype, and tuned matrices that are all zeros.

Each is a finding, not an error: the matrix is left out of the spectral statistics, recorded by
name in ``TunedResult.skipped``, and the rest of the model is audited. A finding is a
``results.spectrum.SkippedMatrix``: the BASE parameter name, where the problem is ("base",
"tuned", "lora_A", "lora_B", "magnitude", "scale" or "update"), the reason in words, and the
number of NaN/Inf values found there (for "update": in dW or W1 = W0 + dW as the audit forms
them, in its dtype; 0 when only a norm overflows).

Every finding but one marks a matrix that could not be audited (the result is incomplete): the
exception is an all-zero tuned matrix (where "tuned", reason ``ZERO_TUNED``, nonfinite_values 0),
which has no direction to examine and so no intruder.

The stored values are checked first, before ``checkpoints.deltas.is_changed``: a NaN in lora_B
would make that test say "unchanged" (NaN > 0 is false) and hide the matrix.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..checkpoints.deltas import Delta, Dense, DoRA, LowRank, is_changed
from ..results.spectrum import SkippedMatrix

ZERO_TUNED = "tuned matrix is all zeros"


def finding(name: str, where: str, reason: str, nonfinite_values: int = 0) -> SkippedMatrix:
    return SkippedMatrix(name=name, where=where, reason=reason, nonfinite_values=int(nonfinite_values))


def count_nonfinite(t: Tensor) -> int:
    """The number of NaN/Inf values of ``t``. A finite sum proves there are none (under IEEE
    arithmetic a NaN or an infinity, once in a partial sum, keeps it non-finite in any order), and
    one reduction costs a fiftieth of building and summing the mask, which this screen did for
    every base matrix on every run; the values are counted only when the sum is not finite
    (non-finite values, or finite ones large enough to overflow it)."""
    if t.numel() == 0 or (t.is_floating_point() and math.isfinite(float(t.sum()))):
        return 0
    return int(t.numel() - int(torch.isfinite(t).sum()))


def _dtype_name(t: Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def screen_base(name: str, W0: Tensor) -> SkippedMatrix | None:
    """A finding when the base matrix holds NaN/Inf (it is then skipped for every tuned model)."""
    n = count_nonfinite(W0)
    if not n:
        return None
    return finding(name, "base", f"{n} NaN/Inf value(s) in the base matrix ({_dtype_name(W0)}); "
                                 "skipped for every tuned model", n)


def screen_values(name: str, delta: Delta) -> SkippedMatrix | None:
    """A finding when a stored tensor of the delta (or its scale) is not finite."""
    if isinstance(delta, Dense):
        parts = [("tuned", "tuned matrix", delta.tuned)]
    else:
        parts = [("lora_A", "lora_A", delta.A), ("lora_B", "lora_B", delta.B)]
        if isinstance(delta, DoRA):
            parts.append(("magnitude", "DoRA magnitude vector", delta.magnitude))
    for where, what, t in parts:
        n = count_nonfinite(t)
        if n:
            return finding(name, where, f"{n} NaN/Inf value(s) in the {what} ({_dtype_name(t)})", n)
    if not isinstance(delta, Dense) and not math.isfinite(float(delta.scale)):
        return finding(name, "scale", f"the adapter scale (alpha / r) is {delta.scale}", 1)
    return None


def screen_delta(name: str, W0: Tensor, delta: Delta, *,
                 base_norm: float | None = None) -> tuple[bool, SkippedMatrix | None]:
    """(changed, finding) for one delta on a finite W0: changed is False when the delta leaves
    W0 exactly as it is; finding is None when the matrix can be audited. The stored values are
    checked before ``is_changed`` (which a NaN would fool: a delta with NaN counts as changed),
    the update after it. ``base_norm``: ||W0||_F when it is known already (from W0's spectrum)."""
    found = screen_values(name, delta)
    if found is None and not is_changed(delta, W0):
        return False, None
    return True, found or screen_update(name, W0, delta, base_norm=base_norm)


def screen_update(name: str, W0: Tensor, delta: Delta, *, base_norm: float | None = None) -> SkippedMatrix | None:
    """A finding when W1 = W0 + dW or dW, formed in W0's dtype as the audit forms them, holds
    NaN/Inf values or has a Frobenius norm beyond the dtype's largest number (then so may its
    singular values): an update that overflows, e.g. lora_alpha 1e39 in float32, or a DoRA row of
    norm 0. Also a finding: a tuned matrix that is all zeros. The stored values must be finite
    (``screen_values``).

    Nothing is materialised unless a bound says it might overflow (always for DoRA):
    ||W0 + dW||_F <= ||W0||_F + ||dW||_F, and for a LoRA update ||s B A||_F <= |s| ||B||_F ||A||_F,
    with a factor 2 of margin."""
    big = torch.finfo(W0.dtype).max
    if isinstance(delta, Dense) and not bool(delta.tuned.any()):
        return finding(name, "tuned", ZERO_TUNED)
    if not isinstance(delta, DoRA) and _norm_bound(W0, delta, base_norm) <= big / 2:
        return None
    W1, dW = delta.merged(W0), delta.update(W0)  # (m, n) each, in W0's dtype
    n = int((~(torch.isfinite(W1) & torch.isfinite(dW))).sum())
    dtype = _dtype_name(W0)
    if n:
        why = " (a row of W0 + s·B·A of norm 0, or an overflow)" if isinstance(delta, DoRA) else ""
        return finding(name, "update", f"update overflows {dtype}: {n} NaN/Inf value(s) in dW or W0 + dW{why}", n)
    norm = max(float(torch.linalg.vector_norm(W1, dtype=torch.float64)),
               float(torch.linalg.vector_norm(dW, dtype=torch.float64)))
    if norm > big:
        return finding(name, "update", f"update overflows {dtype}: a Frobenius norm of {norm:.3g} (of dW or "
                                       f"W0 + dW) is beyond the largest {dtype} number ({big:.3g})")
    return finding(name, "tuned", ZERO_TUNED) if not bool(W1.any()) else None


def _norm_bound(W0: Tensor, delta: Dense | LowRank, base_norm: float | None = None) -> float:
    """An upper bound on ||W0||_F + ||W1||_F (>= both Frobenius norms the audit forms); inf when a
    norm overflows the dtype (then the update is materialised and checked).

    Frobenius norms by one reduction each (torch.linalg.vector_norm: 0.6 ms on a 2048 x 2048
    float32 matrix, where the max |W0_ij| this used before cost 15 ms, an |W0| copy and a pass);
    ``base_norm`` (||W0||_F = ||S0||_2, known from a cached spectrum) spares even that pass."""
    w0 = float(torch.linalg.vector_norm(W0)) if base_norm is None else float(base_norm)
    if isinstance(delta, Dense):
        return w0 + float(torch.linalg.vector_norm(delta.tuned))
    B, A = delta.B.double(), delta.A.double()
    return 2 * w0 + abs(float(delta.scale)) * float(B.norm()) * float(A.norm())


def nonfinite_numbers(values: list[float | None]) -> int:
    """How many of the numbers an audit of one matrix produced are NaN/Inf (None is fine)."""
    return sum(1 for v in values if v is not None and not math.isfinite(v))
