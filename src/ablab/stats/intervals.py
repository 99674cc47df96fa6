"""Bootstrap confidence intervals over seeds (resampling whole pairs).

All take ``rng`` (a ``numpy.random.Generator``) explicitly. The paired differences are
put in a canonical order (sorted) before resampling, so the interval does not depend on
the order the seeds were given in.

Scale. A Monte Carlo bootstrap holds ``n_resamples x seeds`` resampled values and BCa's
jackknife does ``seeds x (seeds - 1)`` work, which at 100,000 seeds is gigabytes and
minutes. So:

* Resampling runs in batches of at most :data:`BATCH_ELEMENTS` values (``scipy.stats.
  bootstrap``'s ``batch``, which also batches the jackknife); batching draws the same
  random numbers in the same order, so the intervals do not change.
* Up to :data:`LARGE_N` seeds the intervals are exactly what they were (BCa via scipy).
* Above it, the **percentile** interval is used, and its bootstrap distribution is obtained
  without materializing resamples (see :func:`bootstrap_distribution`). BCa's bias
  correction ``z0`` and acceleration ``a`` are both O(n^-1/2) (Efron & Tibshirani, 1993,
  ch. 14 and 22; for the mean ``a`` is exactly skewness / (6 sqrt(n))), so the BCa and
  percentile endpoints differ by O(n^-1/2) *of the interval's width*: at 10,000 seeds and a
  skewness of 2 that is ~0.01 standard errors, below the Monte Carlo error of a 2.5 %
  endpoint from 9,999 resamples (~0.03 standard errors).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
from scipy import special, stats

from ablab.stats.estimators import nearly_constant, win_scores

LARGE_N = 10_000
"""Above this many seeds intervals are percentile intervals computed without resample
arrays (module docstring); at or below it they are unchanged (BCa, Monte Carlo)."""
BATCH_ELEMENTS = 2**22
"""Most resampled values (float64, plus as many int64 indices) held at once: ~64 MB."""
FEW_VALUES = 64
"""Data with at most this many distinct values (win scores: 0, 1/2, 1) have their bootstrap
mean drawn exactly from a multinomial over the distinct values."""
LINDEBERG_MAX = 0.1
"""Largest ``max|x - mean| / sqrt(n * var)`` for which the mean's bootstrap distribution is
taken from its Cornish-Fisher expansion (no single seed moves the resampled mean by more than
a tenth of its standard error, so the distribution is smooth and near normal)."""


def _batch(n_values: int) -> int:
    """Resamples per batch so that one batch holds at most :data:`BATCH_ELEMENTS` values."""
    return max(1, BATCH_ELEMENTS // max(1, n_values))


def _quantile_interval(theta: np.ndarray, confidence: float) -> tuple[float, float]:
    """Percentile interval of a bootstrap distribution ``theta`` (resamples,), with scipy's
    quantile rule (``scipy.stats.quantile``, linear), as ``scipy.stats.bootstrap`` does."""
    alpha = (1.0 - confidence) / 2.0
    lo, hi = stats.quantile(theta, np.array([alpha, 1.0 - alpha]))
    return float(lo), float(hi)


def mean_cornish_fisher(values: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval of the bootstrap distribution of the mean, analytically: (lo, hi).

    values: (seeds,) or (seeds, k) (one interval per column). The bootstrap mean is the mean of
    n draws from the empirical distribution, whose cumulants are exact: variance m2 / n,
    skewness m3 / (m2^1.5 sqrt(n)), excess kurtosis (m4 / m2^2 - 3) / n (m_r: central moments
    with divisor n). Its quantiles come from the Cornish-Fisher expansion (Cornish & Fisher,
    1937; Hall, 1992, "The Bootstrap and Edgeworth Expansion", sec. 2.5), whose error is
    O(n^-3/2) standard errors -- far below the Monte Carlo error of a resampled endpoint. Valid
    where :func:`lindeberg_ratio` is small (no single value dominates the resampled mean).
    """
    x = np.asarray(values, dtype=np.float64)
    n = x.shape[0]
    mean = x.mean(axis=0)
    d = x - mean
    d2 = d * d
    m2 = d2.mean(axis=0)
    m3 = (d2 * d).mean(axis=0)
    m4 = (d2 * d2).mean(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        skew = np.where(m2 > 0, m3 / (m2**1.5 * np.sqrt(n)), 0.0)
        exkurt = np.where(m2 > 0, (m4 / m2**2 - 3.0) / n, 0.0)
    se = np.sqrt(m2 / n)
    alpha = (1.0 - confidence) / 2.0
    ends = []
    for z in (special.ndtri(alpha), special.ndtri(1.0 - alpha)):
        w = (
            z
            + (z * z - 1.0) * skew / 6.0
            + (z**3 - 3.0 * z) * exkurt / 24.0
            - (2.0 * z**3 - 5.0 * z) * skew**2 / 36.0
        )
        ends.append(mean + se * w)
    return ends[0], ends[1]


def lindeberg_ratio(values: np.ndarray) -> np.ndarray:
    """``max |x - mean| / sqrt(n * m2)`` per column: the largest shift one resampled value
    makes to the bootstrap mean, in units of its standard error. The bootstrap central limit
    theorem (Bickel & Freedman, 1981) needs it to vanish; 0 for constant data."""
    x = np.asarray(values, dtype=np.float64)
    d = np.abs(x - x.mean(axis=0))
    scale = np.sqrt(x.shape[0] * (d * d).mean(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(scale > 0, d.max(axis=0) / scale, 0.0)


def median_bootstrap(sorted_values: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """``size`` draws of the bootstrap distribution of the median (``np.median`` of n values
    resampled with replacement), exactly, in O(size) rather than O(size * n).

    Resampling = n indices ``floor(n U_j)`` with U_j iid uniform; the data are sorted, so the
    k-th smallest resampled value is the value at the k-th smallest index, ``floor(n U_(k))``.
    ``U_(k)`` ~ Beta(k, n + 1 - k) and, given it, ``U_(k+1) = U_(k) + (1 - U_(k)) V`` with
    V ~ Beta(1, n - k) (the least of the n - k uniforms above it) -- the exact bootstrap
    distribution of the median (Maritz & Jarrett, 1978; Efron, 1979) by order statistics.
    """
    x = np.asarray(sorted_values, dtype=np.float64)
    n = x.shape[0]
    k = (n + 1) // 2 if n % 2 else n // 2  # 1-based rank of the (lower) middle value
    u = rng.beta(k, n + 1 - k, size=size)
    lower = x[np.minimum((n * u).astype(np.int64), n - 1)]
    if n % 2:
        return lower
    u_next = u + (1.0 - u) * rng.beta(1, n - k, size=size)
    upper = x[np.minimum((n * u_next).astype(np.int64), n - 1)]
    return (lower + upper) / 2.0


def _few_values_mean_bootstrap(
    values: np.ndarray, rng: np.random.Generator, size: int
) -> np.ndarray | None:
    """Exact bootstrap draws of the mean of data with few distinct values: the counts of each
    value in a resample are Multinomial(n, share of each value). None for other data."""
    distinct, counts = np.unique(values, return_counts=True)
    if distinct.size > FEW_VALUES:
        return None
    draws = rng.multinomial(values.size, counts / values.size, size=size)
    return draws @ distinct / values.size


def _large_n_interval(
    values: np.ndarray,
    statistic: Callable[..., np.ndarray],
    rng: np.random.Generator,
    confidence: float,
    n_resamples: int,
) -> tuple[float, float] | None:
    """Percentile interval above :data:`LARGE_N` without resample arrays, for np.mean and
    np.median; None where no exact or analytic shortcut applies (Monte Carlo is then used)."""
    if statistic is np.median:
        return _quantile_interval(median_bootstrap(values, rng, n_resamples), confidence)
    if statistic is np.mean:
        theta = _few_values_mean_bootstrap(values, rng, n_resamples)
        if theta is not None:
            return _quantile_interval(theta, confidence)
        if float(lindeberg_ratio(values)) <= LINDEBERG_MAX:
            lo, hi = mean_cornish_fisher(values, confidence)
            return float(lo), float(hi)
    return None


def bootstrap_ci(
    values: np.ndarray,
    statistic: Callable[..., np.ndarray],
    rng: np.random.Generator,
    *,
    confidence: float = 0.95,
    n_resamples: int = 9999,
) -> tuple[float, float]:
    """Bootstrap interval of ``statistic`` over ``values``: (seeds,) -> (lo, hi).

    Up to :data:`LARGE_N` seeds: BCa (Efron, 1987) by resampling seeds with replacement
    (``scipy.stats.bootstrap``). Above it: the percentile interval, from the exact (median,
    few-valued mean) or Cornish-Fisher (mean) bootstrap distribution, else from batched Monte
    Carlo resampling (module docstring). Paired data are resampled as pairs by passing their
    per-seed differences (or indicators). Where every value is equal the sampling distribution
    is a point and the interval is that point. ``statistic`` must accept ``axis`` (it is
    called vectorized).
    """
    values = np.sort(np.asarray(values, dtype=np.float64))
    point = float(statistic(values, axis=0))
    if nearly_constant(values):  # the sampling distribution is a point
        return point, point
    methods: tuple[str, ...] = ("BCa", "percentile")  # percentile only where BCa is undefined
    if values.size > LARGE_N:
        shortcut = _large_n_interval(values, statistic, rng, confidence, n_resamples)
        if shortcut is not None:
            return shortcut
        methods = ("percentile",)
    return _scipy_interval((values,), statistic, rng, methods, confidence, n_resamples)


def _scipy_interval(
    samples: tuple[np.ndarray, ...],
    statistic: Callable[..., np.ndarray],
    rng: np.random.Generator,
    methods: tuple[str, ...],
    confidence: float,
    n_resamples: int,
    **options: Any,
) -> tuple[float, float]:
    """``scipy.stats.bootstrap`` with the first of ``methods`` that gives a finite interval
    (BCa's jackknife acceleration is 0/0 on near-constant data: scipy warns and returns NaN,
    and the percentile interval is used instead), resampling in batches."""
    lo = hi = float("nan")
    for method in methods:
        with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
            warnings.simplefilter("ignore", stats.DegenerateDataWarning)
            res = stats.bootstrap(
                samples,
                statistic,
                n_resamples=n_resamples,
                batch=_batch(sum(x.size for x in samples)),
                confidence_level=confidence,
                method=method,
                vectorized=True,
                rng=rng,
                **options,
            )
        lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
        if np.isfinite(lo) and np.isfinite(hi):
            break
    return lo, hi


def bootstrap_ci_two_sample(
    variant: np.ndarray,
    baseline: np.ndarray,
    statistic: Callable[..., np.ndarray],
    rng: np.random.Generator,
    *,
    confidence: float = 0.95,
    n_resamples: int = 9999,
) -> tuple[float, float]:
    """Bootstrap interval of ``statistic(variant) - statistic(baseline)`` for unpaired arms:
    (n1,), (n2,) -> (lo, hi). Each arm is resampled on its own (``scipy.stats.bootstrap`` with
    ``paired=False``); BCa, or the percentile interval where BCa is undefined."""
    v = np.sort(np.asarray(variant, dtype=np.float64))
    b = np.sort(np.asarray(baseline, dtype=np.float64))

    def diff(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
        return statistic(x, axis=axis) - statistic(y, axis=axis)

    point = float(diff(v, b, axis=0))
    if nearly_constant(v) and nearly_constant(b):
        return point, point
    methods = ("BCa", "percentile")
    return _scipy_interval((v, b), diff, rng, methods, confidence, n_resamples, paired=False)


def prob_better_ci(
    gain: np.ndarray,
    rng: np.random.Generator,
    *,
    confidence: float = 0.95,
    n_resamples: int = 9999,
) -> tuple[float, float]:
    """Interval of P(variant better) from per-seed improvements ``gain`` (> 0 = better)."""
    wins = win_scores(gain)  # the share of wins is their mean
    return bootstrap_ci(wins, np.mean, rng, confidence=confidence, n_resamples=n_resamples)


def curve_ci(
    diff: np.ndarray,
    rng: np.random.Generator,
    *,
    confidence: float = 0.95,
    n_resamples: int = 2000,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-epoch mean paired difference with a percentile bootstrap band (scipy.stats.bootstrap).

    diff: (seeds, epochs) ``variant - baseline``. Returns (mean, low, high), each (epochs,).
    Seeds are resampled jointly across epochs (a seed's whole curve is one unit), in batches.
    Above :data:`LARGE_N` seeds, where every epoch passes :func:`lindeberg_ratio`, the band is
    each epoch's Cornish-Fisher percentile interval instead (:func:`mean_cornish_fisher`): the
    band is pointwise, so each epoch's interval depends only on that epoch's resampled means.
    """
    diff = np.asarray(diff, dtype=np.float64)
    diff = diff[np.all(np.isfinite(diff), axis=1)]
    mean = diff.mean(axis=0)
    if diff.shape[0] < 2:
        return mean, mean.copy(), mean.copy()
    if diff.shape[0] > LARGE_N and np.all(lindeberg_ratio(diff) <= LINDEBERG_MAX):
        low, high = mean_cornish_fisher(diff, confidence)
        return mean, low, high
    res = stats.bootstrap(
        (diff,),
        np.mean,
        n_resamples=n_resamples,
        batch=_batch(diff.size),
        confidence_level=confidence,
        method="percentile",
        vectorized=True,
        axis=0,  # the same resampled seeds for every epoch
        rng=rng,
    )
    low, high = res.confidence_interval.low, res.confidence_interval.high
    return mean, low, high
