"""The project's statistics, in one place, on scipy and scikit-learn where they do the job.

    wilson_interval(k, n)            binomial proportion, Wilson score interval
                                     (``scipy.stats.binomtest(...).proportion_ci(method="wilson")``)
    newcombe_interval(p1, ci1, ...)  difference of two independent proportions, Newcombe's hybrid
                                     score interval from the two Wilson intervals (a formula: neither
                                     scipy nor scikit-learn has it; statsmodels does, and is not a
                                     dependency)
    bootstrap_mean_interval(x)       seeded percentile bootstrap interval of a mean
                                     (``scipy.stats.bootstrap(method="percentile")``)
    auroc(scores, labels)            area under the ROC curve (``sklearn.metrics.roc_auc_score``)
    auroc_interval(scores, labels)   the AUROC and its seeded percentile bootstrap interval over
                                     cases (resamples with one class only skipped, which
                                     ``scipy.stats.bootstrap`` cannot do)
    calibration_bins(p, y)           expected calibration error and the reliability bins of
                                     probabilities against 0/1 outcomes (a sum; sklearn's
                                     ``calibration_curve`` drops the counts ECE needs)
    spearman(x, y)                   Spearman's rank correlation (``scipy.stats.spearmanr``)
    fit_logistic(X, y, l2)           L2-penalised logistic regression
                                     (``sklearn.linear_model.LogisticRegression``)
    expected_max_abs_normal(p)       E[max_{i<=p} |g_i|] for p standard normals (one integral,
                                     Simpson's rule on ``math.erfc``: no scipy import at start-up)
    mean_chi(m)                      E||g|| for g ~ N(0, I_m)

Each returns None where the statistic is undefined (one class only, a constant series, nothing
to count), never NaN: results are JSON, and JSON has no NaN. scipy and scikit-learn are imported
inside the functions: the CLI's ``--help`` and the report do not pay for them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

CONFIDENCE = 0.95


def wilson_interval(k: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials (Wilson 1927; Newcombe 1998a, method 3);
    (0.0, 1.0) when n == 0 (nothing measured). Exact 0 at k = 0 and exact 1 at k = n."""
    if isinstance(k, bool) or isinstance(n, bool) or n < 0 or k < 0 or k > n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return (0.0, 1.0)
    from scipy.stats import binomtest

    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return (float(ci.low), float(ci.high))


def newcombe_interval(p1, ci1, p2, ci2) -> tuple[float, float] | None:
    """Newcombe's hybrid score interval for p1 - p2 from the Wilson intervals (l1, u1), (l2, u2):

        [d - sqrt((p1 - l1)^2 + (u2 - p2)^2),  d + sqrt((u1 - p1)^2 + (p2 - l2)^2)],  d = p1 - p2

    clipped to [-1, 1] (Newcombe 1998, Stat. Med. 17:873, method 10). None when a value is missing
    or not a number. The two samples are taken as independent; for the same prompts given to two
    models the interval is conservative (their refusals are positively correlated)."""
    try:
        p1, p2 = float(p1), float(p2)
        l1, u1 = (float(x) for x in ci1)
        l2, u2 = (float(x) for x in ci2)
    except (TypeError, ValueError, OverflowError):
        return None
    if not all(math.isfinite(x) for x in (p1, p2, l1, u1, l2, u2)):
        return None
    d = p1 - p2
    return (max(-1.0, d - math.hypot(p1 - l1, u2 - p2)), min(1.0, d + math.hypot(u1 - p1, p2 - l2)))


BOOTSTRAP = 2000  # resamples of a bootstrap interval


def bootstrap_mean_interval(values, *, seed: int = 0, resamples: int = BOOTSTRAP,
                            confidence: float = CONFIDENCE) -> list[float]:
    """Percentile bootstrap interval of the mean of ``values`` (any 1-D array-like; a torch tensor
    is read as float64), ``resamples`` resamples drawn from a generator seeded with ``seed`` (the
    same values and seed give the same interval). [x, x] with fewer than two values (x their mean,
    0 for none)."""
    v = np.asarray(values.detach().double().cpu() if hasattr(values, "detach") else values, dtype=np.float64).ravel()
    if v.size < 2 or np.all(v == v[0]):
        x = float(v.mean()) if v.size else 0.0
        return [x, x]
    from scipy.stats import bootstrap

    res = bootstrap((v,), np.mean, n_resamples=resamples, confidence_level=confidence, method="percentile",
                    rng=np.random.default_rng(seed), vectorized=True)
    ci = res.confidence_interval
    return [float(ci.low), float(ci.high)]


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties counted half
    (the Mann-Whitney U statistic / (n_pos n_neg)). None without both classes."""
    y = [bool(t) for t in labels]
    if len(set(y)) < 2:
        return None
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, np.asarray(scores, dtype=np.float64)))


def auroc_interval(scores: Sequence[float], labels: Sequence[bool], *, seed: int = 0, resamples: int = BOOTSTRAP,
                   confidence: float = CONFIDENCE) -> tuple[float | None, list[float]]:
    """(AUROC, its percentile bootstrap interval): cases resampled with replacement, resamples that
    hold one class only skipped; seeded (the same input gives the same interval). (None, []) without
    both classes."""
    from sklearn.metrics import roc_auc_score

    x = np.asarray(scores, dtype=np.float64)
    y = np.asarray([bool(t) for t in labels])
    point = auroc(x, y)  # type: ignore[arg-type]
    if point is None:
        return None, []
    idx = np.random.default_rng(seed).integers(0, len(x), size=(resamples, len(x)))
    values = [roc_auc_score(y[i], x[i]) for i in idx if y[i].any() and not y[i].all()]
    tail = 100 * (1 - confidence) / 2
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return point, [float(min(lo, point)), float(max(hi, point))]


def calibration_bins(probabilities: Sequence[float], outcomes: Sequence[bool], bins: int = 10
                     ) -> tuple[float, list[tuple[float, float, int, float | None, float | None]]]:
    """(expected calibration error, [(low, high, n, mean probability, share of positives)] per bin):
    equal-width bins on [0, 1] (the last one closed), ECE = sum_b (n_b / n) |mean_b - share_b|."""
    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray([float(bool(t)) for t in outcomes])
    if p.size == 0 or p.size != y.size or not np.all((p >= 0) & (p <= 1)):
        raise ValueError("calibration needs as many outcomes as probabilities, each in [0, 1]")
    which = np.minimum((p * bins).astype(int), bins - 1)
    out: list[tuple[float, float, int, float | None, float | None]] = []
    ece = 0.0
    for b in range(bins):
        m = which == b
        n = int(m.sum())
        if n:
            mean, share = float(p[m].mean()), float(y[m].mean())
            ece += n / p.size * abs(mean - share)
            out.append((b / bins, (b + 1) / bins, n, mean, share))
        else:
            out.append((b / bins, (b + 1) / bins, n, None, None))
    return float(ece), out


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation (Pearson's r of the ranks, ties at mid-rank); None with fewer
    than 3 pairs or when either side is constant."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.size != b.size:
        raise ValueError(f"spearman: {a.size} values against {b.size}")
    if a.size < 3 or np.all(a == a[0]) or np.all(b == b[0]):
        return None
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def fit_logistic(X: np.ndarray, y: np.ndarray, l2: float = 1.0) -> tuple[np.ndarray, float]:
    """(w, b) minimising sum_i log(1 + exp(-(2 y_i - 1)(x_i w + b))) + l2 ||w||^2 / 2, the intercept
    b not penalised: scikit-learn's LogisticRegression with C = 1 / l2 (its objective is C times the
    log-loss plus ||w||^2 / 2), solved to a tight tolerance with Newton's method (newton-cholesky:
    the panel is a few dozen rows and a handful of features)."""
    from sklearn.linear_model import LogisticRegression

    X, y = np.asarray(X, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if l2 <= 0:
        raise ValueError(f"l2 must be above 0 (it keeps the weights finite on separable data), got {l2}")
    model = LogisticRegression(C=1.0 / l2, solver="newton-cholesky", tol=1e-12, max_iter=1000).fit(X, y)
    return model.coef_[0].astype(np.float64), float(model.intercept_[0])


# The integrand of ``expected_max_abs_normal`` is smooth; Simpson's rule on this many intervals of
# [0, T] is accurate to ~1e-12 (checked against scipy.integrate.quad in the tests).
_SIMPSON_INTERVALS = 4000


def expected_max_abs_normal(p: int) -> float:
    """E[max_{i<=p} |g_i|] for p independent standard normals:

        E[max] = int_0^inf P(max > t) dt = int_0^inf 1 - erf(t / sqrt 2)^p dt

    on [0, T] with p erfc(T / sqrt 2) < 1e-17 (the tail beyond T is negligible); 1 - erf^p is
    computed as -expm1(p log1p(-erfc)) to keep its small values.

    Simpson's weights and ``math.erfc`` rather than scipy.integrate and scipy.special: every
    spectrum audit computes this (``spectral.calibration``), and importing those two modules cost a
    ``lora-audit spectrum`` process about a quarter of torch's own import time (python -X
    importtime), more than auditing a cached 2048-wide LoRA matrix; the rule is 4,001 erfc calls."""
    if p < 1:
        raise ValueError(f"need p >= 1, got {p}")
    top = math.sqrt(2.0 * math.log(max(p, 2))) + 9.0
    t = np.linspace(0.0, top, _SIMPSON_INTERVALS + 1)
    e = np.array([math.erfc(x / math.sqrt(2.0)) for x in t.tolist()])
    with np.errstate(divide="ignore"):
        f = np.where(e < 1.0, -np.expm1(p * np.log1p(-np.minimum(e, 1.0))), 1.0)
    w = np.ones_like(t)
    w[1:-1:2], w[2:-1:2] = 4.0, 2.0  # composite Simpson: 1, 4, 2, 4, ..., 2, 4, 1
    return float((w * f).sum() * (t[1] - t[0]) / 3.0)


def mean_chi(m: int) -> float:
    """E||g|| for g ~ N(0, I_m): sqrt(2) Gamma((m + 1) / 2) / Gamma(m / 2)."""
    return math.sqrt(2.0) * math.exp(math.lgamma((m + 1) / 2.0) - math.lgamma(m / 2.0))
