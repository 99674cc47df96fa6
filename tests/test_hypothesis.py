"""Tests and correction: reference values (scipy, by hand) and properties, eager and batched."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from ablab.stats.hypothesis import (
    fisher_p,
    holm,
    mcnemar_exact_p,
    min_p_paired,
    min_seeds,
    rank_sum,
    signed_rank,
    tost_p,
    tost_welch_p,
)


def test_holm_by_hand() -> None:
    # Holm (1979): sorted p = .01, .02, .04 with m = 3 -> .03, .04, .04 (running max)
    assert holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert holm([]) == []


def test_signed_rank_matches_scipy_pratt_and_its_direction_is_the_ranks() -> None:
    d = np.array([0.5, -0.1, 0.3, 0.8, 0.2, -0.05, 0.4])
    p, direction = signed_rank(d)
    assert float(p) == pytest.approx(stats.wilcoxon(d, zero_method="pratt").pvalue)
    assert direction == 1  # W+ = 26 > W- = 2 (ranks of 0.1 and 0.05)
    p_neg, dir_neg = signed_rank(-d)  # swapping the arms flips the direction, not the p
    assert float(p_neg) == pytest.approx(float(p)) and dir_neg == -1
    assert signed_rank(np.zeros(20)) == (1.0, 0.0)


def test_signed_rank_small_samples_with_ties_enumerate_every_sign_flip() -> None:
    # <= 13 pairs with ties and zeros: the exact sign-flip p, as scipy's permutation test gives
    rng = np.random.default_rng(1)
    for n, reps in ((3, 10), (7, 10), (11, 3)):  # scipy's reference: slow at 13 (same path)
        for _ in range(reps):
            g = np.round(rng.normal(0.2, 1.0, n), 1)
            if not np.any(g):
                continue
            ref = stats.wilcoxon(g, zero_method="pratt").pvalue
            assert float(signed_rank(g)[0]) == pytest.approx(ref, abs=1e-12)


def test_signed_rank_batched_equals_one_by_one() -> None:
    rng = np.random.default_rng(2)
    for n in (8, 40, 120):
        batch = rng.normal(0.1, 1.0, (5, n))
        p, direction = signed_rank(batch)
        for row, pr, dr in zip(batch, p, direction, strict=True):
            p1, d1 = signed_rank(row)
            assert pr == pytest.approx(float(p1)) and dr == d1


def test_heavy_ties_keep_their_information_with_pratt() -> None:
    # 60 % zeros, 40 % +0.05: Pratt ranks the zeros and concludes; the direction is +
    g = np.where(np.arange(200) % 5 < 2, 0.05, 0.0)
    p, direction = signed_rank(g)
    assert float(p) < 1e-10 and direction == 1


def test_mcnemar_is_the_exact_binomial_test_on_discordant_pairs() -> None:
    for b, c in ((10, 0), (3, 7), (5, 5), (0, 1)):
        ref = stats.binomtest(b, b + c, 0.5).pvalue
        assert float(mcnemar_exact_p(b, c)) == pytest.approx(ref)
    assert float(mcnemar_exact_p(0, 0)) == 1.0
    np.testing.assert_allclose(mcnemar_exact_p(np.array([10, 0]), np.array([0, 10])), 2 * 0.5**10)


def test_fisher_matches_scipy() -> None:
    ref = stats.fisher_exact([[8, 22], [1, 29]]).pvalue
    assert float(fisher_p(np.array(8), 30, np.array(1), 30)) == pytest.approx(ref)
    assert float(fisher_p(np.array(0), 30, np.array(0), 30)) == 1.0


def test_rank_sum_matches_scipy_and_direction() -> None:
    rng = np.random.default_rng(3)
    v, b = rng.normal(1.0, 1.0, 30), rng.normal(0.0, 1.0, 25)
    p, direction = rank_sum(v, b)
    assert float(p) == pytest.approx(stats.mannwhitneyu(v, b).pvalue)
    assert direction == 1 and rank_sum(b, v)[1] == -1


def test_tost_inside_and_outside_margin() -> None:
    rng = np.random.default_rng(0)
    small = rng.normal(0.0, 0.01, 500)
    assert tost_p(small, margin=0.01) < 0.01
    assert tost_p(small + 0.05, margin=0.01) > 0.5
    assert tost_p(np.full(5, 0.001), 0.01) == 0.0 and tost_p(np.full(5, 0.1), 0.01) == 1.0
    # missing values (NaN) are left out, not counted
    assert tost_p(np.append(small, np.nan), 0.01) == pytest.approx(tost_p(small, 0.01))


def test_tost_equals_two_one_sided_scipy_t_tests() -> None:
    d = np.random.default_rng(4).normal(0.003, 0.01, 40)
    lo = stats.ttest_1samp(d, -0.01, alternative="greater").pvalue
    hi = stats.ttest_1samp(d, 0.01, alternative="less").pvalue
    assert tost_p(d, 0.01) == pytest.approx(max(lo, hi))


def test_welch_tost_equals_scipy_welch_t_tests() -> None:
    rng = np.random.default_rng(5)
    v, b = rng.normal(0.0, 0.01, 40), rng.normal(0.002, 0.02, 30)
    lo = stats.ttest_ind(v + 0.01, b, equal_var=False, alternative="greater").pvalue
    hi = stats.ttest_ind(v - 0.01, b, equal_var=False, alternative="less").pvalue
    assert float(tost_welch_p(v, b, 0.01)) == pytest.approx(max(lo, hi))


def test_small_n_floor() -> None:
    # the signed-rank test's smallest two-sided p is 2 / 2^n: with Holm over 3 comparisons
    # no verdict exists at n <= 6 (3 * 2^-5 = 0.094), one does at 7 (3 * 2^-6 = 0.047)
    assert min_p_paired(6) == pytest.approx(2 / 64)
    assert min_seeds(0.05, 1) == 6 and min_seeds(0.05, 3) == 7
    assert min_seeds(0.05, 1, paired=False) == 4  # Mann-Whitney: 2 / C(8, 4) = 0.029
