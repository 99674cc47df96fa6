"""The verdict rule: from one comparison's per-seed outcomes to helps / hurts / equivalent /
inconclusive, with the reason.

The rule is vectorized over replicates, so one piece of code judges a study's comparisons (one
replicate), plans seeds by simulation (``ablab.stats.planning``: resampled replicates) and is
calibrated (``bench/calibration.py``: thousands of simulated studies).

Outcomes are in "score" orientation (higher = better; a loss is negated):

* paired -- ``gain`` (..., n): the variant's improvement over the baseline on each shared seed;
  ``+inf`` where only the baseline diverged, ``-inf`` where only the variant diverged, NaN where
  both did (a tie). **Divergence is an outcome, not missing data**: it is the worst result a
  seed can have, so it enters the rank test with the largest rank on the diverged arm's side.
* unpaired -- ``variant`` (..., n1) and ``baseline`` (..., n2) scores, ``-inf`` = diverged.

The rule, at level ``alpha`` (the p-values already adjusted across the study's comparisons):

0. **too few seeds** -- if even a perfect result could not reach ``alpha`` after the adjustment
   (``ablab.stats.hypothesis.min_seeds``), ``inconclusive``.
1. **equivalent** -- the TOST on the seeds where both arms converged puts the mean difference
   inside ``(-margin, +margin)`` (p < alpha), and divergence does not differ between the arms
   (paired: no seed diverged in one arm only; unpaired: equal divergence rates).
2. **stability** -- the exact test on divergence (McNemar paired, Fisher unpaired; in the Holm
   family only where it could reject at all) says one arm diverges more: ``hurts`` for the
   variant that diverges more ("less stable"), ``helps`` for the one that diverges less ("more
   stable") -- unless the rank test says the opposite at alpha, which is a trade-off:
   ``inconclusive``.
3. **rank test** -- Wilcoxon signed-rank with Pratt's zeros (paired) or Mann-Whitney
   (unpaired) p < alpha; the **direction is the test's own** (signed ranks W+ vs W-), and it
   must agree with the mean improvement over the converged seeds (else the typical seed and
   the average disagree: ``inconclusive``). A variant that detectably diverges more often (its
   divergence test, unadjusted, p < alpha) is never called ``helps``, and one that detectably
   diverges less often never ``hurts`` (``inconclusive`` instead).
4. otherwise **inconclusive**.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ablab.stats.hypothesis import (
    fisher_p,
    holm_rows,
    mcnemar_exact_p,
    min_p_paired,
    min_p_unpaired,
    rank_sum,
    signed_rank,
    tost_p,
    tost_welch_p,
)

VERDICTS = ("helps", "hurts", "equivalent", "inconclusive")
HELPS, HURTS, EQUIVALENT, INCONCLUSIVE = range(4)

# Why a verdict came out as it did (codes, vectorized; words in ablab.stats.verdicts).
R_TOO_FEW = 0
R_EQUIVALENT = 1
R_MORE_STABLE = 2
R_LESS_STABLE = 3
R_TRADE_OFF = 4
R_RANK = 5
R_RANK_MEAN_DISAGREE = 6
R_DIVERGES_MORE = 7
R_DIVERGES_LESS = 8
R_NOT_SIGNIFICANT = 9

STRUCTURAL = (R_TRADE_OFF, R_RANK_MEAN_DISAGREE, R_DIVERGES_MORE, R_DIVERGES_LESS)
"""Inconclusive for a reason more seeds do not remove: the evidence contradicts itself."""

PAIRED_TEST = "Wilcoxon signed-rank (Pratt zeros); divergence: exact McNemar"
UNPAIRED_TEST = "Mann-Whitney U; divergence: Fisher exact"


@dataclass
class Evidence:
    """What the rule looks at, each array (R,) over replicates (R = 1 for a real comparison).

    ``n`` / ``n_baseline``: pairs (paired: both equal) or seeds per arm (unpaired).
    """

    paired: bool
    n: int
    n_baseline: int
    p_rank: np.ndarray
    """Two-sided rank-test p (unadjusted)."""
    direction: np.ndarray
    """+1: the rank statistic says the variant is better; -1 worse; 0 neither."""
    mean_gain: np.ndarray
    """Mean improvement over converged seeds (variant - baseline in score units); NaN if none."""
    p_tost: np.ndarray
    div_variant: np.ndarray
    div_baseline: np.ndarray
    """Diverged seeds per arm (counts)."""
    p_div: np.ndarray
    """Two-sided exact test of equal divergence (unadjusted); 1 without any difference."""
    div_differs: np.ndarray
    """Paired: some seed diverged in one arm only; unpaired: the divergence rates differ."""
    div_events: np.ndarray
    """Paired: seeds that diverged in one arm only (McNemar's discordant pairs); unpaired:
    diverged seeds in both arms."""

    def div_testable(self, alpha: float) -> np.ndarray:
        """Could the divergence test reject at ``alpha`` on its own? (Its smallest p, every
        event in one arm, is 2 / 2^events.) Only such tests join the Holm family: one that
        cannot reject costs the others power and buys nothing (Tarone, 1990)."""
        return 2.0 ** (1.0 - self.div_events) < alpha

    @property
    def div_rate_diff(self) -> np.ndarray:
        """Variant's divergence rate minus the baseline's (> 0: the variant diverges more)."""
        return self.div_variant / self.n - self.div_baseline / self.n_baseline

    def min_p(self) -> float:
        """The smallest p the rank test can give at these sample sizes."""
        return min_p_paired(self.n) if self.paired else min_p_unpaired(self.n, self.n_baseline)


def rank_ready(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scores with +-inf replaced by values beyond every finite one (ranks unchanged: a diverged
    outcome is worse than -- or, for the other arm, better than -- any finite one, and all
    diverged outcomes tie), and the finite-only copy (NaN elsewhere)."""
    finite = np.isfinite(x)
    span = np.where(finite, np.abs(x), 0.0).max(initial=0.0)
    big = 2.0 * span + 1.0
    ranked = np.where(finite, x, np.where(np.isnan(x), 0.0, np.sign(x) * big))
    return ranked, np.where(finite, x, np.nan)


def paired_evidence(
    gain: np.ndarray, margin: float | np.ndarray, margin_se: float | np.ndarray = 0.0
) -> Evidence:
    """Evidence from paired outcomes ``gain`` (R, n) (module docstring for the encoding);
    ``margin``: a number, or one per replicate (R,); ``margin_se``: its standard error when
    it was estimated from the data (``ablab.stats.hypothesis.tost_p``)."""
    g = np.atleast_2d(np.asarray(gain, dtype=np.float64))
    ranked, finite = rank_ready(g)
    p_rank, direction = signed_rank(ranked)
    only_b = np.sum(g == np.inf, axis=1)
    only_v = np.sum(g == -np.inf, axis=1)
    both = np.sum(np.isnan(g), axis=1)
    k = np.sum(np.isfinite(finite), axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_gain = np.where(k > 0, np.nansum(finite, axis=1) / k, np.nan)
    return Evidence(
        paired=True,
        n=g.shape[1],
        n_baseline=g.shape[1],
        p_rank=p_rank,
        direction=direction,
        mean_gain=mean_gain,
        p_tost=np.atleast_1d(tost_p(finite, margin, margin_se)),
        div_variant=only_v + both,
        div_baseline=only_b + both,
        p_div=mcnemar_exact_p(only_b, only_v),
        div_differs=(only_b + only_v) > 0,
        div_events=only_b + only_v,
    )


def unpaired_evidence(
    variant: np.ndarray,
    baseline: np.ndarray,
    margin: float | np.ndarray,
    margin_se: float | np.ndarray = 0.0,
) -> Evidence:
    """Evidence from unpaired scores ``variant`` (R, n1) and ``baseline`` (R, n2), -inf =
    diverged (module docstring)."""
    v = np.atleast_2d(np.asarray(variant, dtype=np.float64))
    b = np.atleast_2d(np.asarray(baseline, dtype=np.float64))
    both = np.concatenate([v, b], axis=1)
    ranked, finite = rank_ready(both)
    n1, n2 = v.shape[1], b.shape[1]
    p_rank, direction = rank_sum(ranked[:, :n1], ranked[:, n1:])
    fv, fb = finite[:, :n1], finite[:, n1:]
    kv, kb = np.isfinite(fv).sum(axis=1), np.isfinite(fb).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_gain = np.nansum(fv, axis=1) / kv - np.nansum(fb, axis=1) / kb
    mean_gain = np.where((kv > 0) & (kb > 0), mean_gain, np.nan)
    dv, db = n1 - kv, n2 - kb
    return Evidence(
        paired=False,
        n=n1,
        n_baseline=n2,
        p_rank=p_rank,
        direction=direction,
        mean_gain=mean_gain,
        p_tost=tost_welch_p(fv, fb, margin, margin_se),
        div_variant=dv,
        div_baseline=db,
        p_div=fisher_p(dv, n1, db, n2),
        div_differs=dv * n2 != db * n1,
        div_events=dv + db,
    )


def decide(
    ev: Evidence,
    p_rank_adjusted: np.ndarray,
    p_div_adjusted: np.ndarray,
    alpha: float,
    family: int | np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """The rule (module docstring): ``(verdict codes, reason codes)``, each (R,).

    ``family``: the number of hypotheses the p-values were adjusted over, one number or one
    per replicate (the small-n floor compares the test's smallest attainable p, times this,
    with ``alpha``).
    """
    shape = np.shape(ev.p_rank)
    verdict = np.full(shape, INCONCLUSIVE)
    reason = np.full(shape, R_NOT_SIGNIFICANT)
    open_ = np.ones(shape, dtype=bool)

    def settle(mask: np.ndarray, v: int | np.ndarray, r: int) -> None:
        nonlocal open_
        take = np.broadcast_to(mask, shape) & open_
        verdict[take] = np.broadcast_to(v, shape)[take]
        reason[take] = r
        open_ = open_ & ~take

    settle(ev.min_p() * np.asarray(family) >= alpha, INCONCLUSIVE, R_TOO_FEW)
    settle((ev.p_tost < alpha) & ~ev.div_differs, EQUIVALENT, R_EQUIVALENT)

    rank_sig = p_rank_adjusted < alpha
    stable_sign = -np.sign(ev.div_rate_diff)  # +1: the variant diverges less
    stability = (p_div_adjusted < alpha) & (stable_sign != 0)
    settle(stability & rank_sig & (ev.direction == -stable_sign), INCONCLUSIVE, R_TRADE_OFF)
    settle(stability & (stable_sign > 0), HELPS, R_MORE_STABLE)
    settle(stability & (stable_sign < 0), HURTS, R_LESS_STABLE)

    # the winner on ranks must not be detectably less stable (its own test, unadjusted)
    div_shown = ev.p_div < alpha
    more, less = div_shown & (ev.div_rate_diff > 0), div_shown & (ev.div_rate_diff < 0)
    settle(rank_sig & (ev.direction > 0) & more, INCONCLUSIVE, R_DIVERGES_MORE)
    settle(rank_sig & (ev.direction < 0) & less, INCONCLUSIVE, R_DIVERGES_LESS)
    disagree = np.isfinite(ev.mean_gain) & (np.sign(ev.mean_gain) != ev.direction)
    settle(rank_sig & disagree, INCONCLUSIVE, R_RANK_MEAN_DISAGREE)
    settle(rank_sig, np.where(ev.direction > 0, HELPS, HURTS), R_RANK)
    return verdict, reason


def judge_alone(ev: Evidence, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """The rule for a study with this one comparison, per replicate: Holm over its rank test
    and -- where it could reject (:meth:`Evidence.div_testable`) -- its divergence test,
    exactly as ``ablab.stats.verdicts.compare_arms`` adjusts a one-comparison family. For
    calibration."""
    two = ev.div_testable(alpha)
    both = holm_rows(np.stack([ev.p_rank, ev.p_div], axis=1))
    p_rank = np.where(two, both[:, 0], ev.p_rank)
    p_div = np.where(two, both[:, 1], 1.0)
    return decide(ev, p_rank, p_div, alpha, np.where(two, 2, 1))


def family_size(evidence: list[Evidence], alpha: float) -> int:
    """Hypotheses in a study's family: one rank test per comparison, plus one divergence test
    per comparison where that test could reject (a study without divergence adds none)."""
    return len(evidence) + sum(int(ev.div_testable(alpha)[0]) for ev in evidence)
