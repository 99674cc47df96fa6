"""Point estimates of a paired comparison: arrays in, numbers out (no I/O, no global RNG).

Layout: ``baseline`` and ``variant`` are (seeds,) final values of one metric, element i of
both coming from the same seed (same data order, same shared initial weights). ``lower``
says whether lower values are better (losses) or higher (accuracy).
"""

from __future__ import annotations

import numpy as np
from scipy import stats


def nearly_constant(values: np.ndarray) -> bool:
    """Are all values equal up to float rounding (range <= 1e-12 x max(1, |mean|))?

    Such data make t statistics and BCa accelerations 0/0; callers answer exactly instead.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.size < 2:
        return True
    return float(np.ptp(values)) <= 1e-12 * max(1.0, abs(float(values.mean())))


def improvement(diff: np.ndarray, lower: bool) -> np.ndarray:
    """Per-seed improvement of the variant over the baseline: positive = better.

    For a loss (``lower``) this is ``-(variant - baseline)``; for accuracy ``variant - baseline``.
    """
    return -diff if lower else diff


def prob_better(diff: np.ndarray, lower: bool) -> float:
    """P(variant better than baseline on the same seed): share of seeds it wins, ties count 1/2.

    The paired "probability of improvement" (Agarwal et al., 2021, "Deep RL at the edge of
    the statistical precipice", rliable), here over seeds of one task.
    """
    return float(np.mean(win_scores(improvement(diff, lower))))


def win_scores(gain: np.ndarray) -> np.ndarray:
    """Per seed: 1 if the variant is better (gain > 0), 1/2 on a tie, 0 if worse."""
    return (gain > 0) + 0.5 * (gain == 0)


def cliffs_delta(baseline: np.ndarray, variant: np.ndarray, lower: bool) -> float:
    """Cliff's delta (Cliff, 1993) of variant over baseline, in [-1, 1]; positive = variant better.

    ``P(variant better than a random baseline run) - P(worse)`` over all n*m cross pairs
    (unpaired dominance), computed from the Mann-Whitney U statistic
    (``scipy.stats.mannwhitneyu``): delta = 2U/(nm) - 1 with U counting the variant's wins.
    """
    if lower:
        u = stats.mannwhitneyu(baseline, variant, method="asymptotic").statistic
    else:
        u = stats.mannwhitneyu(variant, baseline, method="asymptotic").statistic
    return float(2.0 * u / (len(baseline) * len(variant)) - 1.0)
