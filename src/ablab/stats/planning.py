"""Seed planning: how many seeds the verdict rule needs to conclude, by simulation.

"Seeds needed" is the smallest number of seeds (pairs; per arm when unpaired) at which the
verdict rule (``ablab.stats.rule``, the one that judged the study) reaches a conclusive verdict --
helps, hurts or equivalent -- in at least ``power`` of simulated studies. A simulated study
resamples the observed outcomes with replacement (divergence included), so it needs no normal
model of the metric, and it accounts for the test actually used, its ties, the small-n floor
and the multiple-comparison adjustment (Bonferroni alpha / family, the bound Holm's first step
uses). It is the bootstrap power estimate of Efron & Tibshirani (1993, sec. 25.3).

* Up to :data:`SIM_MAX` seeds the answer is simulated (:data:`REPLICATES` studies per size;
  the estimate's own error is about +-5 % of n).
* Beyond, it is extrapolated with normal approximations of the same tests: Noether's (1987)
  formula for the signed-rank test, ``n = (z_{1-a/2} + z_power)^2 / (3 (p' - 1/2)^2)`` with
  ``p' = P(g_i + g_j > 0)`` estimated from the observed pairs, and the normal TOST formula
  (Chow, Shao & Wang, 2008, sec. 3.2) for equivalence; ``method`` says which.
* ``None`` with a ``reason`` where no number of seeds would let the rule conclude: most
  simulated studies are inconclusive for a reason more seeds do not remove (the mean and the
  signed ranks disagree, a trade-off between divergence and the converged seeds, ...), or no
  seed converged in either arm. Unpaired comparisons are simulated only (no extrapolation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ablab.stats.hypothesis import min_seeds, z_quantile
from ablab.stats.rule import (
    INCONCLUSIVE,
    R_DIVERGES_LESS,
    R_DIVERGES_MORE,
    R_RANK_MEAN_DISAGREE,
    R_TRADE_OFF,
    STRUCTURAL,
    decide,
    paired_evidence,
    unpaired_evidence,
)

REPLICATES = 200
SIM_MAX = 2_000
"""Simulated up to here; beyond, the normal approximations (measured: a 0.03-SD effect, 3,072
seeds simulated vs 3,282 by Noether's formula, in a third of the time)."""
MAX_SEEDS = 10_000_000

_WHY_STUCK = {
    R_RANK_MEAN_DISAGREE: "the signed ranks and the mean point in opposite directions (the "
    "typical seed and the average disagree)",
    R_TRADE_OFF: "one arm diverges less but the other wins on the seeds that converge",
    R_DIVERGES_MORE: "the variant wins on ranks but diverges more often",
    R_DIVERGES_LESS: "the variant loses on ranks but diverges less often",
}


@dataclass(frozen=True)
class SeedPlan:
    """``n``: seeds needed (None: no finite number); ``method``: how it was obtained;
    ``reason``: why ``n`` is None."""

    n: int | None
    method: str
    reason: str | None = None


@dataclass
class Outcomes:
    """Observed outcomes to resample: paired ``gain`` (n,) or unpaired ``variant`` / ``baseline``
    scores (module ``ablab.stats.rule`` for the encoding)."""

    paired: bool
    gain: np.ndarray | None = None
    variant: np.ndarray | None = None
    baseline: np.ndarray | None = None


def _simulate(
    obs: Outcomes,
    n: int,
    *,
    margin: float,
    margin_se: float,
    alpha: float,
    family: int,
    rng: np.random.Generator,
) -> tuple[float, np.ndarray]:
    """(share of conclusive verdicts, reason codes) over :data:`REPLICATES` studies of n seeds."""
    if obs.paired:
        assert obs.gain is not None
        resampled = obs.gain[rng.integers(0, obs.gain.size, (REPLICATES, n))]
        ev = paired_evidence(resampled, margin, margin_se)
    else:
        assert obs.variant is not None and obs.baseline is not None
        v = obs.variant[rng.integers(0, obs.variant.size, (REPLICATES, n))]
        b = obs.baseline[rng.integers(0, obs.baseline.size, (REPLICATES, n))]
        ev = unpaired_evidence(v, b, margin, margin_se)
    p_div = np.where(ev.div_testable(alpha), np.minimum(1.0, family * ev.p_div), 1.0)
    bonferroni = np.minimum(1.0, family * ev.p_rank), p_div
    verdict, reason = decide(ev, *bonferroni, alpha, family)
    return float(np.mean(verdict != INCONCLUSIVE)), reason


def _noether(obs: Outcomes, alpha: float, family: int, power: float) -> int | None:
    """Noether's (1987) sample size for the signed-rank test, from p' = P(g_i + g_j > 0) over
    the observed pairs (ties 1/2; divergence as +-inf). None where p' = 1/2 or unpaired."""
    if not obs.paired or obs.gain is None:
        return None
    g = np.sort(np.where(np.isnan(obs.gain), 0.0, obs.gain))
    n = g.size
    # for each i, the j > i with g_j > -g_i (sorted g: from index `right` on) and g_j = -g_i
    first_j = np.arange(1, n + 1)
    right = np.maximum(np.searchsorted(g, -g, side="right"), first_j)
    left = np.maximum(np.searchsorted(g, -g, side="left"), first_j)
    above = n - right
    tie = right - left
    pairs = n * (n - 1) / 2
    if pairs == 0:
        return None
    p_prime = (above.sum() + 0.5 * tie.sum()) / pairs
    if p_prime == 0.5:
        return None
    z = z_quantile(1 - alpha / family / 2) + z_quantile(power)
    return math.ceil(z * z / (3.0 * (p_prime - 0.5) ** 2))


def _tost_normal(obs: Outcomes, margin: float, alpha: float, power: float) -> int | None:
    """Normal-approximation TOST sample size (Chow, Shao & Wang, 2008, sec. 3.2) from the
    converged pairs' mean and SD; None where the mean is not inside the margin."""
    if not obs.paired or obs.gain is None:
        return None
    d = obs.gain[np.isfinite(obs.gain)]
    if d.size < 2 or np.isinf(obs.gain).any():  # divergence in one arm bars equivalence
        return None
    gap = margin - abs(float(d.mean()))
    if gap <= 0:
        return None
    z = z_quantile(1 - alpha) + z_quantile(power)
    return math.ceil(z * z * float(d.var(ddof=1)) / gap**2)


def plan(
    obs: Outcomes,
    *,
    margin: float,
    alpha: float,
    family: int,
    power: float,
    rng: np.random.Generator,
    margin_se: float = 0.0,
) -> SeedPlan:
    """Seeds needed for the rule to conclude with probability ``power`` (module docstring)."""
    parts = [obs.gain] if obs.paired else [obs.variant, obs.baseline]
    if not any(x is not None and np.isfinite(x).any() for x in parts):
        return SeedPlan(None, "none", "no seed converged in either arm: nothing to compare")
    kw: dict[str, Any] = {"margin": margin, "margin_se": margin_se, "alpha": alpha}
    kw.update(family=family, rng=rng)
    sim = f"simulation ({REPLICATES} resampled studies per size)"
    lo = min_seeds(alpha, family, paired=obs.paired)
    share, reasons = _simulate(obs, lo, **kw)
    if share >= power:
        return SeedPlan(lo, sim)
    hi = lo
    while True:
        lo, hi = hi, min(2 * hi, SIM_MAX)
        share, reasons = _simulate(obs, hi, **kw)
        if share >= power:
            break
        stuck = np.isin(reasons, STRUCTURAL)
        if stuck.mean() > 1.0 - power:
            codes, counts = np.unique(reasons[stuck], return_counts=True)
            why = _WHY_STUCK[int(codes[np.argmax(counts)])]
            return SeedPlan(
                None, sim, f"the rule cannot conclude: {why}; more seeds do not change that"
            )
        if hi == SIM_MAX:
            return _extrapolate(obs, margin=margin, alpha=alpha, family=family, power=power)
    while hi - lo > max(1, hi // 20):  # bisection to ~5 %, the simulation's own precision
        mid = (lo + hi) // 2
        if _simulate(obs, mid, **kw)[0] >= power:
            hi = mid
        else:
            lo = mid
    return SeedPlan(hi, sim)


def _extrapolate(
    obs: Outcomes, *, margin: float, alpha: float, family: int, power: float
) -> SeedPlan:
    """Beyond :data:`SIM_MAX`: the normal approximations of the module docstring."""
    candidates = []
    rank_n = _noether(obs, alpha, family, power)
    if rank_n is not None:
        candidates.append((rank_n, "Noether's formula for the signed-rank test"))
    tost_n = _tost_normal(obs, margin, alpha, power)
    if tost_n is not None:
        candidates.append((tost_n, "the normal TOST formula"))
    beyond = f"beyond {SIM_MAX:,} simulated seeds: "
    if not candidates:
        return SeedPlan(
            None,
            beyond + "no normal approximation applies",
            f"not settled by {SIM_MAX:,} seeds, and the rule's tests give no estimate beyond",
        )
    n, how = min(candidates)
    n = max(n, SIM_MAX + 1)
    if n > MAX_SEEDS:
        return SeedPlan(None, beyond + how, f"more than {MAX_SEEDS:,} seeds")
    return SeedPlan(n, beyond + how)
