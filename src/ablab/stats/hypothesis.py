"""Hypothesis tests behind the verdicts, and multiple-comparison control.

Every test is vectorized over leading axes: the last axis holds one sample, so the same code
judges one comparison ``(n,)`` and a batch of simulated replicates ``(R, n)`` (seed planning,
calibration). Conventions:

* ``gain``: per-pair improvement of the variant over the baseline (> 0 = variant better), a
  tie is 0. Divergence is encoded by the caller (``ablab.stats.rule``) before a test sees it.
* ``values`` with NaN: NaN marks an observation that is not there (a diverged seed for the
  t-based equivalence tests, which only look at converged seeds).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import special, stats


def _rows(values: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
    x = np.asarray(values, dtype=np.float64)
    return x.reshape(-1, x.shape[-1]), x.shape[:-1]


ENUMERATE_MAX = 13
"""Up to this many pairs the signed-rank p-value is computed from all 2^n sign flips."""


def _sign_flip_p(ranks: np.ndarray, w_plus: np.ndarray) -> np.ndarray:
    """Exact two-sided p of the signed-rank sum W+ by enumerating every sign flip.

    ranks: (R, n) ranks of |gain| with zeros' ranks set to 0 (Pratt: ranked, then counted for
    neither side); w_plus: (R,) observed. Under H0 each non-zero pair's sign is + or - with
    probability 1/2, so the flips are equally likely; p = min(1, 2 min(P(W+ <= w),
    P(W+ >= w))), the convention of ``scipy.stats.permutation_test`` (which scipy's Wilcoxon
    uses for <= 13 pairs with ties or zeros, and which equals its exact distribution without
    them). Only the non-zero pairs are flipped (a zero adds 0 whatever its sign), so a row of
    any length with at most :data:`ENUMERATE_MAX` non-zero pairs is enumerated exactly.
    """
    # move each row's non-zero ranks to the front: the flips of the zero padding are no-ops
    order = np.argsort(ranks == 0, axis=1, kind="stable")
    ranks = np.take_along_axis(ranks, order, axis=1)[:, : int((ranks != 0).sum(axis=1).max())]
    n = ranks.shape[1]
    flips = (np.arange(2**n)[:, None] >> np.arange(n)[None, :]) & 1  # (2^n, n) 0/1
    null = ranks @ flips.T.astype(np.float64)  # (R, 2^n): W+ of every flip
    w = w_plus[:, None]
    eps = 1e-9  # ranks are multiples of 1/2: exact in float
    low = np.mean(null <= w + eps, axis=1)
    high = np.mean(null >= w - eps, axis=1)
    return np.minimum(1.0, 2.0 * np.minimum(low, high))


def signed_rank(gain: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Wilcoxon signed-rank test (Wilcoxon, 1945) with Pratt's treatment of zeros (Pratt, 1959).

    gain: (..., n) finite. Returns ``(p, direction)``, each (...,): the two-sided p-value of
    H0 "gain is symmetric about 0" and the side the signed ranks point to (+1 variant better:
    W+ > W-, -1 worse, 0 neither). Zeros (ties between the arms) are ranked with the other
    pairs and then count for neither side, so heavily tied metrics (accuracy on a small
    validation set) keep their information instead of being dropped (``scipy.stats.wilcoxon``,
    ``zero_method="pratt"``: every sign flip enumerated when at most 13 pairs are non-zero,
    the exact null distribution up to 50 pairs without ties or zeros, else the normal
    approximation with Cureton's zero and tie corrections). A row of zeros has p = 1 and
    direction 0.
    """
    x, lead = _rows(gain)
    p = np.ones(x.shape[0])
    direction = np.zeros(x.shape[0])
    live = np.any(x != 0, axis=1)
    if live.any():
        y = x[live]
        ranks = stats.rankdata(np.abs(y), axis=1)
        w_plus = np.sum(ranks * (y > 0), axis=1)
        w_minus = np.sum(ranks * (y < 0), axis=1)
        direction[live] = np.sign(w_plus - w_minus)
        # few non-zero pairs (small n, or heavy ties): the normal approximation would be far
        # off (16 ties + 4 wins: 0.046 instead of the exact 0.125), so enumerate them
        few = np.count_nonzero(y, axis=1) <= ENUMERATE_MAX
        out = np.empty(y.shape[0])
        if few.any():
            out[few] = _sign_flip_p(ranks[few] * (y[few] != 0), w_plus[few])
        if (~few).any():
            out[~few] = stats.wilcoxon(y[~few], zero_method="pratt", axis=1).pvalue
        p[live] = out
    return np.clip(p, 0.0, 1.0).reshape(lead), direction.reshape(lead)


def rank_sum(variant: np.ndarray, baseline: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mann-Whitney U test (Mann & Whitney, 1947) for unpaired arms, higher = better.

    variant: (..., n1), baseline: (..., n2), finite. Returns ``(p, direction)`` (...,): the
    two-sided p (``scipy.stats.mannwhitneyu``: exact for small samples without ties, else
    the tie-corrected normal approximation) and +1 when the variant tends to be higher
    (U > n1 n2 / 2), -1 lower, 0 neither.
    """
    v, lead = _rows(variant)
    b, _ = _rows(baseline)
    res = stats.mannwhitneyu(v, b, alternative="two-sided", axis=1)
    direction = np.sign(res.statistic - v.shape[1] * b.shape[1] / 2.0)
    return np.asarray(res.pvalue, dtype=np.float64).reshape(lead), direction.reshape(lead)


def mcnemar_exact_p(only_baseline: np.ndarray, only_variant: np.ndarray) -> np.ndarray:
    """Exact McNemar test (McNemar, 1947) on discordant pairs: two-sided p of H0 "the two
    kinds of discordant pair are equally likely".

    only_baseline / only_variant: counts (...,) of pairs where just that arm had the event
    (here: diverged). Conditional on their total m, H0 makes one count Binomial(m, 1/2); the
    two-sided p is ``min(1, 2 P(X <= min))`` (= ``scipy.stats.binomtest(...).pvalue`` for
    p = 1/2). 1 where there is no discordant pair.
    """
    b = np.asarray(only_baseline, dtype=np.float64)
    c = np.asarray(only_variant, dtype=np.float64)
    m = b + c
    p = np.minimum(1.0, 2.0 * stats.binom.cdf(np.minimum(b, c), np.maximum(m, 1), 0.5))
    return np.where(m > 0, p, 1.0)


def fisher_p(
    events_variant: np.ndarray, n_variant: int, events_baseline: np.ndarray, n_baseline: int
) -> np.ndarray:
    """Fisher's exact test (Fisher, 1922) of equal event rates in two unpaired arms (here:
    divergence), two-sided, per element of ``events_*`` (...,) (``scipy.stats.fisher_exact``)."""
    ev = np.asarray(events_variant, dtype=np.int64)
    eb = np.broadcast_to(np.asarray(events_baseline, dtype=np.int64), ev.shape)
    out = np.ones(ev.shape)
    for idx in np.ndindex(ev.shape):
        a, c = int(ev[idx]), int(eb[idx])
        if a or c:
            table = [[a, n_variant - a], [c, n_baseline - c]]
            out[idx] = stats.fisher_exact(table).pvalue
    return out


def _moments(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(count, mean, unbiased variance, is-constant) over the last axis, NaN = missing."""
    x, _ = _rows(values)
    ok = np.isfinite(x)
    k = ok.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(ok, x, 0.0).sum(axis=1) / k
        dev = np.where(ok, x - mean[:, None], 0.0)
        var = (dev * dev).sum(axis=1) / (k - 1)
        hi = np.where(ok, x, -np.inf).max(axis=1)
        lo = np.where(ok, x, np.inf).min(axis=1)
        constant = (hi - lo) <= 1e-12 * np.maximum(1.0, np.abs(mean))
    return k, mean, var, constant


def tost_p(
    values: np.ndarray, margin: float | np.ndarray, margin_se: float | np.ndarray = 0.0
) -> Any:
    """Paired TOST p-value (Schuirmann, 1987) for equivalence within ``(-margin, +margin)``.

    values: (..., n) paired differences, NaN = left out; margin: a number or one per row
    (...,). Two one-sided one-sample t-tests
    (t distribution from ``scipy.stats.t``): H0a mean <= -margin, H0b mean >= +margin; p = max
    of the two; small p = the mean difference is inside the margin. ``margin_se``: the standard
    error of a margin estimated from the data (0 for a stated one), added in quadrature to the
    mean's, so an estimated margin does not make the test liberal. Constant data have no
    variance: the answer is then exact (0 if the constant is inside the margin or is 0, else
    1). Fewer than 2 values: 1. Returns (...,) (a float for 1-D input).
    """
    lead = np.shape(values)[:-1]
    k, mean, var, constant = _moments(values)
    with np.errstate(invalid="ignore", divide="ignore"):
        se = np.sqrt(var / k + np.square(margin_se))
        p_low = stats.t.sf((mean + margin) / se, k - 1)
        p_high = stats.t.cdf((mean - margin) / se, k - 1)
    p = np.maximum(p_low, p_high)
    exact = np.where((np.abs(mean) < margin) | (mean == 0.0), 0.0, 1.0)
    p = np.where(constant, exact, p)
    p = np.where(k < 2, 1.0, p)
    out = np.asarray(p, dtype=np.float64).reshape(lead)
    return float(out) if out.ndim == 0 else out


def tost_welch_p(
    variant: np.ndarray,
    baseline: np.ndarray,
    margin: float | np.ndarray,
    margin_se: float | np.ndarray = 0.0,
) -> np.ndarray:
    """Unpaired TOST (Schuirmann, 1987) with Welch's t (Welch, 1947): equivalence of the two
    arms' means within ``margin``. variant (..., n1), baseline (..., n2), NaN = left out.
    Returns (...,). Both arms constant: exact as in :func:`tost_p`; ``margin_se`` as there."""
    lead = np.shape(variant)[:-1]
    k1, m1, v1, c1 = _moments(variant)
    k2, m2, v2, c2 = _moments(baseline)
    diff = m1 - m2
    with np.errstate(invalid="ignore", divide="ignore"):
        a, b = v1 / k1, v2 / k2
        se = np.sqrt(a + b + np.square(margin_se))
        df = (a + b) ** 2 / (a * a / (k1 - 1) + b * b / (k2 - 1))
        p_low = stats.t.sf((diff + margin) / se, df)
        p_high = stats.t.cdf((diff - margin) / se, df)
    p = np.maximum(p_low, p_high)
    exact = np.where((np.abs(diff) < margin) | (diff == 0.0), 0.0, 1.0)
    p = np.where(c1 & c2, exact, p)
    p = np.where((k1 < 2) | (k2 < 2), 1.0, p)
    return np.asarray(p, dtype=np.float64).reshape(lead)


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (Holm, 1979), controlling the family-wise error rate.

    Sorted ascending, p_(i) is multiplied by (m - i) (i from 0), made monotone by a running
    maximum and capped at 1; results are returned in the input order.
    """
    if not p_values:
        return []
    return holm_rows(np.asarray(p_values, dtype=np.float64)[None, :])[0].tolist()


def holm_rows(p: np.ndarray) -> np.ndarray:
    """:func:`holm` on every row of ``p`` (R, m) at once (ties keep their order: stable)."""
    p = np.asarray(p, dtype=np.float64)
    m = p.shape[1]
    order = np.argsort(p, axis=1, kind="stable")
    ranked = np.take_along_axis(p, order, axis=1) * (m - np.arange(m))
    ranked = np.minimum(1.0, np.maximum.accumulate(ranked, axis=1))
    out = np.empty_like(ranked)
    np.put_along_axis(out, order, ranked, axis=1)
    return out


def min_p_paired(n: int) -> float:
    """The smallest two-sided p the signed-rank (or sign, or McNemar) test can give with n
    pairs: every pair on one side, probability 2 / 2^n under H0."""
    return 2.0 ** (1 - n) if n >= 1 else 1.0


def min_p_unpaired(n_variant: int, n_baseline: int) -> float:
    """The smallest two-sided p of the exact Mann-Whitney test: 2 / C(n1 + n2, n1) (the arms
    completely separated)."""
    if n_variant < 1 or n_baseline < 1:
        return 1.0
    n = n_variant + n_baseline
    log_comb = math.lgamma(n + 1) - math.lgamma(n_variant + 1) - math.lgamma(n_baseline + 1)
    return min(1.0, 2.0 * math.exp(-log_comb))


def min_seeds(alpha: float, family: int, *, paired: bool = True) -> int:
    """The fewest seeds (pairs; per arm when unpaired) at which a verdict is possible at all:
    the test's smallest p, times the ``family`` size (Holm's first step), below ``alpha``.

    Paired: n > 1 + log2(family / alpha) -- 6 for one comparison at 0.05, 7 for three.
    """
    n = 1
    while True:
        p = min_p_paired(n) if paired else min_p_unpaired(n, n)
        if family * p < alpha:
            return n
        n += 1


def z_quantile(q: float) -> float:
    """Standard normal quantile (``scipy.special.ndtri``)."""
    return float(special.ndtri(q))
