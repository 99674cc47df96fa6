"""Hypothesis tests on paired differences, multiple-comparison control and seed planning.

``diff``: (seeds,) ``variant - baseline`` on the same seeds, finite.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

from ablab._estimators import nearly_constant


def wilcoxon_p(diff: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p-value (Wilcoxon, 1945) of H0: diff symmetric about 0.

    ``scipy.stats.wilcoxon`` with zero differences dropped ("wilcox"); exact for small
    samples without ties, normal approximation otherwise. 1.0 when every difference is 0.
    """
    nonzero = diff[diff != 0]
    if nonzero.size == 0:
        return 1.0
    return float(stats.wilcoxon(nonzero, zero_method="wilcox").pvalue)


def tost_p(diff: np.ndarray, margin: float) -> float:
    """Paired TOST p-value (Schuirmann, 1987) for equivalence within ``(-margin, +margin)``.

    Two one-sided one-sample t-tests on ``diff`` (``scipy.stats.ttest_1samp``):
    H0a: mean <= -margin vs greater, H0b: mean >= +margin vs less; p = max of the two.
    Small p = the mean difference is inside the margin. With zero variance the answer is
    exact: 0 if the (nearly) constant difference is inside the margin, else 1.
    """
    if nearly_constant(diff):
        value = abs(float(np.mean(diff)))
        return 0.0 if value < margin or value == 0.0 else 1.0
    p_low = stats.ttest_1samp(diff, -margin, alternative="greater").pvalue
    p_high = stats.ttest_1samp(diff, margin, alternative="less").pvalue
    return float(max(p_low, p_high))


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (Holm, 1979), controlling the family-wise error rate.

    Sorted ascending, p_(i) is multiplied by (m - i) (i from 0), made monotone by a running
    maximum and capped at 1; results are returned in the input order.
    """
    m = len(p_values)
    order = np.argsort(p_values, kind="stable")
    adjusted = np.empty(m)
    running = 0.0
    for rank, idx in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[idx]))
        adjusted[idx] = running
    return adjusted.tolist()


def paired_t_power(effect: float, sd: float, n: int, alpha: float = 0.05) -> float:
    """Power of the two-sided paired t-test with n seeds to detect a mean difference ``effect``.

    Non-central t (``scipy.stats.nct``) with df = n - 1 and noncentrality effect/sd * sqrt(n).
    """
    if n < 2:
        return 0.0
    df = n - 1
    nc = abs(effect) / sd * math.sqrt(n)
    t_crit = stats.t.ppf(1 - alpha / 2, df)
    return float(stats.nct.sf(t_crit, df, nc) + stats.nct.cdf(-t_crit, df, nc))


def seeds_needed(
    effect: float,
    sd: float,
    *,
    alpha: float = 0.05,
    power: float = 0.8,
    max_seeds: int = 10_000_000,
) -> int | None:
    """Smallest number of paired seeds giving ``power`` to detect ``effect`` (paired t-test).

    ``sd`` is the standard deviation of the paired differences (observed). None when the
    effect is 0 (undetectable) or needs more than ``max_seeds``. The Wilcoxon test used for
    the verdict has asymptotic relative efficiency ~0.955 to the t-test under normality
    (Hodges & Lehmann, 1956), so treat this as a close lower bound.
    """
    if effect == 0 or not np.isfinite(effect):
        return None
    if sd == 0:
        return 2
    lo, hi = 2, 2
    while paired_t_power(effect, sd, hi, alpha) < power:
        lo, hi = hi, hi * 2
        if hi > max_seeds:
            return None
    while lo < hi:  # smallest n in (lo, hi] with enough power
        mid = (lo + hi) // 2
        if paired_t_power(effect, sd, mid, alpha) >= power:
            hi = mid
        else:
            lo = mid + 1
    return hi
