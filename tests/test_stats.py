"""lora_audit.stats against published worked examples and brute force, never against itself."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from lora_audit import stats as S

# Newcombe (1998a), "Two-sided confidence intervals for the single proportion", Stat. Med. 17:857,
# Table I, method 3 (Wilson score, no continuity correction), 95 %.
NEWCOMBE_1998A = [((81, 263), (0.2553, 0.3662)), ((15, 148), (0.0624, 0.1605)), ((0, 20), (0.0, 0.1611)),
                  ((1, 29), (0.0061, 0.1718))]
# Newcombe (1998b), "Interval estimation for the difference between independent proportions", Stat. Med.
# 17:873, Table II, method 10 (hybrid score, no continuity correction), 95 %: (k1, n1, k2, n2) -> limits.
NEWCOMBE_1998B = [((56, 70, 48, 80), (0.0524, 0.3339)), ((9, 10, 3, 10), (0.1705, 0.8090)),
                  ((6, 7, 2, 7), (0.0582, 0.8062)), ((5, 56, 0, 29), (-0.0381, 0.1926)),
                  ((0, 10, 0, 20), (-0.1611, 0.2775)), ((0, 10, 0, 10), (-0.2775, 0.2775)),
                  ((10, 10, 0, 20), (0.6791, 1.0)), ((10, 10, 0, 10), (0.6075, 1.0))]


@pytest.mark.parametrize("case,limits", NEWCOMBE_1998A)
def test_wilson_matches_newcombe_1998a_table_1(case, limits):
    lo, hi = S.wilson_interval(*case)
    assert lo == pytest.approx(limits[0], abs=5e-5) and hi == pytest.approx(limits[1], abs=5e-5)


def test_wilson_formula_and_edges():
    z = 1.959963984540054  # the 97.5 % normal quantile
    for k, n in [(3, 16), (50, 100), (1, 3), (7, 9)]:  # Wilson (1927) written out
        p, d = k / n, 1 + z * z / n
        c, h = (p + z * z / (2 * n)) / d, z / d * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        assert S.wilson_interval(k, n) == pytest.approx((c - h, c + h), abs=1e-12)
    assert S.wilson_interval(0, 12)[0] == 0.0 and S.wilson_interval(12, 12)[1] == 1.0  # exact, not 1e-17
    assert S.wilson_interval(0, 10)[1] == pytest.approx(z * z / (10 + z * z), rel=1e-12)
    assert S.wilson_interval(0, 0) == (0.0, 1.0)
    for k, n in [(5, 3), (-1, 3), (True, 3)]:
        with pytest.raises(ValueError):
            S.wilson_interval(k, n)


@pytest.mark.parametrize("case,limits", NEWCOMBE_1998B)
def test_newcombe_matches_newcombe_1998b_table_2(case, limits):
    k1, n1, k2, n2 = case
    lo, hi = S.newcombe_interval(k1 / n1, S.wilson_interval(k1, n1), k2 / n2, S.wilson_interval(k2, n2))
    assert lo == pytest.approx(limits[0], abs=5e-5) and hi == pytest.approx(limits[1], abs=5e-5)


def test_newcombe_missing_or_broken_values_give_none():
    assert S.newcombe_interval(None, [0, 1], 0.5, [0, 1]) is None
    assert S.newcombe_interval(0.5, [0, 1], 0.5, None) is None
    assert S.newcombe_interval(0.5, ["a", 1], 0.5, [0, 1]) is None
    assert S.newcombe_interval(float("nan"), [0, 1], 0.5, [0, 1]) is None
    assert S.newcombe_interval(10 ** 400, [0, 1], 0.5, [0, 1]) is None  # OverflowError, not a crash


def _brute_auroc(scores, labels):
    pairs = list(itertools.product([s for s, y in zip(scores, labels, strict=True) if y], [s for s, y in zip(scores, labels, strict=True) if not y]))
    return sum((p > q) + 0.5 * (p == q) for p, q in pairs) / len(pairs)


def _midranks(x):
    return [sum(v < a for v in x) + (sum(v == a for v in x) + 1) / 2 for a in x]


def _brute_spearman(x, y):
    rx, ry = np.array(_midranks(x)), np.array(_midranks(y))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / math.sqrt((rx * rx).sum() * (ry * ry).sum()))


def test_auroc_and_spearman_against_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(20):
        scores = list(rng.integers(0, 5, 30).astype(float))  # many ties
        labels = list(rng.random(30) > 0.5)
        assert S.auroc(scores, labels) == pytest.approx(_brute_auroc(scores, labels), abs=1e-12)
        y = list(rng.normal(size=30))
        assert S.spearman(scores, y) == pytest.approx(_brute_spearman(scores, y), abs=1e-12)
    assert S.auroc([1, 2], [True, True]) is None and S.auroc([], []) is None
    assert S.spearman([1, 1, 1], [1, 2, 3]) is None and S.spearman([1, 2], [1, 2]) is None
    assert S.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_logistic_fit_satisfies_its_optimality_condition():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(40, 3))
    y = (X @ [1.0, -2.0, 0.5] + rng.normal(size=40) > 0).astype(float)
    for l2 in (0.1, 1.0, 10.0):
        w, b = S.fit_logistic(X, y, l2=l2)
        p = 1 / (1 + np.exp(-(X @ w + b)))
        # the gradient of sum log-loss + l2 ||w||^2 / 2 vanishes; the intercept is not penalised
        assert np.allclose(X.T @ (p - y) + l2 * w, 0, atol=1e-7) and abs(float((p - y).sum())) < 1e-7
    Xs, ys = np.array([[0.0], [1.0], [2.0], [3.0]]), np.array([0.0, 0.0, 1.0, 1.0])  # separable: still finite
    w, b = S.fit_logistic(Xs, ys, l2=1.0)
    assert np.isfinite(w).all() and math.isfinite(b) and w[0] > 0
    with pytest.raises(ValueError):
        S.fit_logistic(Xs, ys, l2=0.0)


def test_bootstrap_interval_is_seeded_and_covers_the_mean():
    x = torch.arange(20, dtype=torch.float64)
    a, b = S.bootstrap_mean_interval(x, seed=1), S.bootstrap_mean_interval(x.numpy(), seed=1)
    assert a == b and a[0] < 9.5 < a[1]
    assert S.bootstrap_mean_interval(x, seed=2) != a  # the seed is used
    se = float(x.std() / math.sqrt(20))  # the normal interval's half width, for scale
    assert a[1] - a[0] == pytest.approx(2 * 1.96 * se, rel=0.2)
    assert S.bootstrap_mean_interval([3.0, 3.0, 3.0]) == [3.0, 3.0]
    assert S.bootstrap_mean_interval([2.0]) == [2.0, 2.0] and S.bootstrap_mean_interval([]) == [0.0, 0.0]


def test_bootstrap_percentiles_match_the_exact_bootstrap_distribution():
    """For 4 values the bootstrap distribution of the mean has 4^4 equally likely resamples: the
    2.5 % and 97.5 % points of 20,000 draws lie near its exact quantiles."""
    v = np.array([0.0, 1.0, 3.0, 10.0])
    means = np.sort([np.mean(c) for c in itertools.product(v, repeat=4)])
    lo, hi = S.bootstrap_mean_interval(v, seed=0, resamples=20_000)
    assert np.quantile(means, 0.02) <= lo <= np.quantile(means, 0.03)
    assert np.quantile(means, 0.97) <= hi <= np.quantile(means, 0.98)


def test_expected_max_abs_normal_against_quadrature_and_closed_forms():
    from scipy import integrate, special

    assert S.expected_max_abs_normal(1) == pytest.approx(math.sqrt(2 / math.pi), abs=1e-10)  # E|g|
    for p in (2, 7, 100, 4096):
        ref, _ = integrate.quad(lambda t, p=p: 1 - special.erf(t / math.sqrt(2)) ** p, 0, np.inf, limit=200)
        assert S.expected_max_abs_normal(p) == pytest.approx(ref, abs=1e-8)
    sample = np.abs(np.random.default_rng(3).normal(size=(20_000, 7))).max(axis=1)
    assert abs(S.expected_max_abs_normal(7) - sample.mean()) < 4 * sample.std() / math.sqrt(20_000)
    assert S.mean_chi(1) == pytest.approx(math.sqrt(2 / math.pi))
    assert S.mean_chi(2) == pytest.approx(math.sqrt(math.pi / 2))
    assert S.mean_chi(3) == pytest.approx(2 * math.sqrt(2 / math.pi))
    with pytest.raises(ValueError):
        S.expected_max_abs_normal(0)
