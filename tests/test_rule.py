"""The vectorized verdict rule: calibration on simulated studies, batched = one by one, and
each branch of the rule on a hand-made case.

Simulated calibration (fast, normal data): the full figures over >= 2,000 replicates per
setting are bench/calibration.py's; here 2,000 A/A studies at n = 30 must give helps + hurts
at a rate <= alpha + 1 % plus 3 Monte Carlo standard errors.
"""

from __future__ import annotations

import numpy as np
import pytest

from ablab.stats.rule import (
    EQUIVALENT,
    HELPS,
    HURTS,
    INCONCLUSIVE,
    R_LESS_STABLE,
    R_RANK,
    R_TOO_FEW,
    R_TRADE_OFF,
    decide,
    family_size,
    judge_alone,
    paired_evidence,
    unpaired_evidence,
)


def _judge(gain: np.ndarray, margin: float, alpha: float = 0.05):
    return judge_alone(paired_evidence(gain, margin), alpha)


@pytest.mark.parametrize("n", [10, 30, 100])
def test_a_a_false_verdicts_are_at_the_nominal_rate(n: int) -> None:
    rng = np.random.default_rng(n)
    reps = 2000
    gain = rng.normal(0.0, 1.0, (reps, n)) - rng.normal(0.0, 1.0, (reps, n))
    verdict, _ = _judge(gain, margin=0.1 * np.sqrt(2))
    false = np.mean((verdict == HELPS) | (verdict == HURTS))
    se = np.sqrt(0.05 * 0.95 / reps)
    assert false <= 0.06 + 3 * se, false
    assert np.mean(verdict == HELPS) > 0.005 and np.mean(verdict == HURTS) > 0.005  # symmetric


def test_a_a_with_divergence_in_both_arms_stays_at_the_nominal_rate() -> None:
    # divergence tested too (exact McNemar), Holm over the two tests keeps the family at alpha
    rng = np.random.default_rng(5)
    reps, n = 2000, 100
    a, b = rng.normal(0.0, 1.0, (2, reps, n))
    a[rng.random(a.shape) < 0.1] = -np.inf
    b[rng.random(b.shape) < 0.1] = -np.inf
    with np.errstate(invalid="ignore"):
        verdict, _ = _judge(a - b, margin=0.1)
    false = np.mean((verdict == HELPS) | (verdict == HURTS))
    assert false <= 0.06 + 3 * np.sqrt(0.05 * 0.95 / reps), false


def test_a_known_shift_is_found_in_the_right_direction() -> None:
    rng = np.random.default_rng(1)
    gain = rng.normal(0.5, 1.0, (500, 30))  # a 0.5-SD paired improvement
    verdict, reason = _judge(gain, margin=0.05)
    assert np.mean(verdict == HELPS) > 0.6 and np.all(verdict != HURTS)
    assert np.all(reason[verdict == HELPS] == R_RANK)
    flipped, _ = _judge(-gain, margin=0.05)  # swapping the arms swaps the verdict
    np.testing.assert_array_equal(flipped == HURTS, verdict == HELPS)


def test_batched_rule_equals_one_study_at_a_time() -> None:
    rng = np.random.default_rng(2)
    gain = rng.normal(0.3, 1.0, (40, 25))
    gain[::7, 3] = -np.inf  # some divergence
    verdict, reason = _judge(gain, margin=0.1)
    for i in range(gain.shape[0]):
        v1, r1 = _judge(gain[i : i + 1], margin=0.1)
        assert (v1[0], r1[0]) == (verdict[i], reason[i])


def test_too_few_seeds_is_inconclusive_whatever_the_data() -> None:
    verdict, reason = _judge(np.full((1, 5), 3.0), margin=0.1)  # 2^-4 = 0.0625 >= 0.05
    assert verdict[0] == INCONCLUSIVE and reason[0] == R_TOO_FEW
    verdict, _ = _judge(np.full((1, 6), 3.0), margin=0.1)  # 2^-5 = 0.031 < 0.05
    assert verdict[0] == HELPS


def test_identical_arms_are_equivalent_and_divergence_in_one_arm_bars_it() -> None:
    verdict, _ = _judge(np.zeros((1, 50)), margin=0.0)
    assert verdict[0] == EQUIVALENT
    gain = np.zeros((1, 50))
    gain[0, 0] = -np.inf
    verdict, _ = _judge(gain, margin=0.1)
    assert verdict[0] != EQUIVALENT
    both = np.zeros((1, 50))
    both[0, :5] = np.nan  # both arms diverged on the same seeds: a tie, still equivalent
    assert _judge(both, margin=0.1)[0][0] == EQUIVALENT


def test_stability_decides_and_a_trade_off_is_inconclusive() -> None:
    rng = np.random.default_rng(3)
    gain = rng.normal(0.05, 0.01, (1, 40))
    gain[0, :12] = -np.inf  # the variant diverges on 12 of 40, wins slightly elsewhere
    verdict, reason = _judge(gain, margin=0.001)
    assert (verdict[0], reason[0]) == (HURTS, R_LESS_STABLE)
    trade = rng.normal(1.0, 0.01, (1, 400))
    trade[0, :60] = -np.inf  # diverges on 15 %, but clearly better on the rest
    verdict, reason = _judge(trade, margin=0.001)
    assert (verdict[0], reason[0]) == (INCONCLUSIVE, R_TRADE_OFF)


def test_family_counts_divergence_tests_only_where_they_could_reject() -> None:
    plain = paired_evidence(np.ones((1, 10)), 0.1)
    diverging = paired_evidence(np.r_[np.ones(9), -np.inf][None, :], 0.1)
    assert family_size([plain, plain], 0.05) == 2
    assert family_size([plain, diverging], 0.05) == 2  # 1 discordant pair: p >= 1, left out
    six = paired_evidence(np.r_[np.ones(4), np.full(6, -np.inf)][None, :], 0.1)
    assert family_size([plain, six], 0.05) == 3  # 6 discordant: 2^-5 < 0.05 can reject


def test_unpaired_evidence_and_rule() -> None:
    rng = np.random.default_rng(4)
    v = rng.normal(0.5, 1.0, (1, 60))
    b = rng.normal(0.0, 1.0, (1, 60))
    ev = unpaired_evidence(v, b, margin=0.1)
    assert not ev.paired and ev.direction[0] == 1
    verdict, _ = decide(ev, ev.p_rank, ev.p_div, 0.05, 1)
    assert verdict[0] == HELPS
    b[0, :20] = -np.inf  # the baseline diverges on a third: the variant is more stable
    ev = unpaired_evidence(v, b, margin=0.1)
    assert ev.div_baseline[0] == 20 and ev.p_div[0] < 1e-5


def test_few_non_zero_pairs_among_many_ties_get_the_exact_p() -> None:
    # 16 ties and 4 wins: the exact sign-flip p is 2 / 2^4 = 0.125 (the normal approximation
    # said 0.046, a false "helps"); enumerated over the non-zero pairs whatever n is
    gain = np.r_[np.zeros(16), np.full(4, 0.05)][None, :]
    ev = paired_evidence(gain, margin=0.0)
    assert ev.p_rank[0] == pytest.approx(0.125)
    assert _judge(gain, margin=0.0)[0][0] == INCONCLUSIVE


def test_an_estimated_margin_does_not_make_equivalence_liberal() -> None:
    # true difference exactly at the margin (0.1 x the baseline's true SD): the TOST's null
    # holds, so "equivalent" must come out at most alpha -- with the margin estimated from
    # each replicate's own baseline and its standard error carried into the test
    rng = np.random.default_rng(6)
    reps, n = 2000, 30
    base = rng.normal(0.0, 1.0, (reps, n))
    var = 0.995 * base + np.sqrt(1 - 0.995**2) * rng.normal(0.0, 1.0, (reps, n)) + 0.1
    margin = 0.1 * base.std(axis=1, ddof=1)
    ev = paired_evidence(var - base, margin, margin / np.sqrt(2 * (n - 1)))
    verdict, _ = judge_alone(ev, 0.05)
    assert np.mean(verdict == EQUIVALENT) <= 0.05 + 3 * np.sqrt(0.05 * 0.95 / reps)


def test_divergence_in_both_arms_does_not_block_a_real_effect() -> None:
    # both arms diverge on ~10 % of seeds at random; the variant is 0.5 SD better elsewhere:
    # chance differences in divergence must not turn most of its wins into "inconclusive"
    rng = np.random.default_rng(7)
    reps, n = 1000, 100
    gain = rng.normal(0.5, 1.0, (reps, n))
    gain[rng.random((reps, n)) < 0.1] = -np.inf
    gain[rng.random((reps, n)) < 0.1] = np.inf
    verdict, _ = _judge(gain, margin=0.05)
    assert np.mean(verdict == HELPS) > 0.7
