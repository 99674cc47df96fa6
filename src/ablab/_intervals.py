"""Bootstrap confidence intervals over seeds (resampling whole pairs).

All take ``rng`` (a ``numpy.random.Generator``) explicitly. The paired differences are
put in a canonical order (sorted) before resampling, so the interval does not depend on
the order the seeds were given in.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
from scipy import stats

from ablab._estimators import nearly_constant, win_scores


def bootstrap_ci(
    values: np.ndarray,
    statistic: Callable[..., np.ndarray],
    rng: np.random.Generator,
    *,
    confidence: float = 0.95,
    n_resamples: int = 9999,
) -> tuple[float, float]:
    """BCa bootstrap interval (Efron, 1987) of ``statistic`` over ``values``: (seeds,) -> (lo, hi).

    Resamples seeds with replacement (``scipy.stats.bootstrap``, method "BCa"). Paired data
    are resampled as pairs by passing their per-seed differences (or indicators). Where every
    value is equal the sampling distribution is a point and the interval is that point.
    ``statistic`` must accept ``axis`` (it is called vectorized).
    """
    values = np.sort(np.asarray(values, dtype=np.float64))
    point = float(statistic(values, axis=0))
    if nearly_constant(values):  # the sampling distribution is a point
        return point, point
    lo = hi = float("nan")
    for method in ("BCa", "percentile"):  # percentile only where BCa is undefined
        with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
            # BCa's jackknife acceleration is 0/0 on near-constant data: scipy warns and
            # returns NaN, and the percentile interval is used instead.
            warnings.simplefilter("ignore", stats.DegenerateDataWarning)
            res = stats.bootstrap(
                (values,),
                statistic,
                n_resamples=n_resamples,
                confidence_level=confidence,
                method=method,
                vectorized=True,
                rng=rng,
            )
        lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
        if np.isfinite(lo) and np.isfinite(hi):
            break
    return lo, hi


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
    Seeds are resampled jointly across epochs (a seed's whole curve is one unit).
    """
    diff = np.asarray(diff, dtype=np.float64)
    diff = diff[np.all(np.isfinite(diff), axis=1)]
    mean = diff.mean(axis=0)
    if diff.shape[0] < 2:
        return mean, mean.copy(), mean.copy()
    res = stats.bootstrap(
        (diff,),
        np.mean,
        n_resamples=n_resamples,
        confidence_level=confidence,
        method="percentile",
        vectorized=True,
        axis=0,  # the same resampled seeds for every epoch
        rng=rng,
    )
    low, high = res.confidence_interval.low, res.confidence_interval.high
    return mean, low, high
