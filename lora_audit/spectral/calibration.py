"""Calibrated intruder statistics: what a max |cos| means at a matrix's width, how much of the
top singular energy the intruders carry, and a drift score that is informative when no
direction crosses epsilon.

A count of intruders at one epsilon mixes directions of very different weight: at width m a
direction unrelated to every base direction has max |cos| of about sqrt(2 ln(2m) / m) (0.13 at
m = 576, 0.04 at m = 4096), far below the usual epsilon = 0.5 (Shuttleworth et al. 2024,
arXiv 2410.21228, Sec. 3). Three numbers put a count in context:

    null_max_cos(m, p)   E[ max_i |<u_i, x>| ] for x uniform on the unit sphere of R^m and the
                         p orthonormal columns u_i of U0 (m x p, p = min(m, n), the base's left
                         singular vectors). Exact, from one 1-D integral (``null_max_cos``).
    intruder energy      E_eps = sum_{j: c_j < eps} s_j^2 / sum_j s_j^2 over the examined top-k
                         directions j of W1 (s_j its singular values, c_j their max |cos|): the
                         share of the top-k energy that intruders carry.
    drift                1 - min_j c_j: 0 when every top direction is a base direction, close to
                         1 - null_max_cos when one is as unrelated as a random direction.

No torch: the report reads these without it (the integral is ``stats.expected_max_abs_normal``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from ..stats import expected_max_abs_normal, mean_chi


@functools.lru_cache(maxsize=256)
def null_max_cos(m: int, p: int) -> float:
    """Expected max |cos| of a uniformly random direction of R^m with p orthonormal vectors of R^m.

    With x = g / ||g||, g ~ N(0, I_m), rotated so that the p vectors are the first p coordinate
    axes, max_i |<u_i, x>| = max_{i<=p} |g_i| / ||g||. The direction g / ||g|| is independent of
    the length ||g||, so E[max_{i<=p} |g_i|] = E||g|| * E[max_i |<u_i, x>|], i.e.

        null_max_cos(m, p) = E[max_{i<=p} |g_i|] / E||g||
                           = int_0^inf (1 - erf(t / sqrt 2)^p) dt / (sqrt 2 Gamma((m+1)/2) / Gamma(m/2)).

    Exact for any m >= p >= 1 (no large-m approximation); for m = p it is close to
    sqrt(2 ln(2m) / m). For an (m x n) weight, p = min(m, n): the thin SVD's U0 has that many
    columns, all of which the audit compares against.
    """
    if not 1 <= p <= m:
        raise ValueError(f"need 1 <= p <= m, got m={m}, p={p}")
    return expected_max_abs_normal(p) / mean_chi(m)


def null_for_shape(shape: Sequence[int]) -> float:
    """``null_max_cos`` for a weight of shape (m, n) analysed as (out x in): U0 is m x min(m, n)."""
    m, n = int(shape[0]), int(shape[1])
    return null_max_cos(m, min(m, n))


def drift(max_cos: Sequence[float]) -> float | None:
    """1 - min_j c_j over the examined top-k directions (None when none was examined)."""
    return 1.0 - min(max_cos) if len(max_cos) else None


def intruder_energy(singular_values: Sequence[float], max_cos: Sequence[float], epsilon: float) -> float | None:
    """sum_{j: c_j < epsilon} s_j^2 / sum_j s_j^2 over the examined directions j (s_j of W1, in
    the same order as ``max_cos``); None when there is no energy to share."""
    total = sum(s * s for s in singular_values)
    if not total > 0.0:
        return None
    return sum(s * s for s, c in zip(singular_values, max_cos, strict=True) if c < epsilon) / total


def sweep_energy(singular_values: Sequence[float], max_cos: Sequence[float],
                 sweep: Sequence[float]) -> list[float | None]:
    """``intruder_energy`` at every epsilon of a sweep (same order as ``sweep``)."""
    return [intruder_energy(singular_values, max_cos, e) for e in sweep]
