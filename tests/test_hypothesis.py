"""Tests, correction and planning: reference values and properties."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from ablab._hypothesis import holm, paired_t_power, seeds_needed, tost_p, wilcoxon_p


def test_holm_by_hand() -> None:
    # Holm (1979): sorted p = .01, .02, .04 with m = 3 -> .03, .04, .04 (running max)
    assert holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert holm([]) == []


def test_wilcoxon_matches_scipy_and_handles_all_zero() -> None:
    d = np.array([0.5, -0.1, 0.3, 0.8, 0.2, -0.05, 0.4])
    assert wilcoxon_p(d) == pytest.approx(stats.wilcoxon(d).pvalue)
    assert wilcoxon_p(np.zeros(20)) == 1.0


def test_tost_inside_and_outside_margin() -> None:
    rng = np.random.default_rng(0)
    small = rng.normal(0.0, 0.01, 500)
    assert tost_p(small, margin=0.01) < 0.01
    assert tost_p(small + 0.05, margin=0.01) > 0.5
    assert tost_p(np.full(5, 0.001), 0.01) == 0.0 and tost_p(np.full(5, 0.1), 0.01) == 1.0


def test_power_reference_value() -> None:
    # Cohen (1988): d = 0.5, two-sided alpha .05 -> n = 34 paired observations for power .80
    # (G*Power gives 34 for the one-sample/paired t-test with these settings).
    assert seeds_needed(0.5, 1.0) == 34
    assert paired_t_power(0.5, 1.0, 34) >= 0.8 > paired_t_power(0.5, 1.0, 33)


def test_seeds_needed_properties() -> None:
    assert seeds_needed(0.0, 1.0) is None
    assert seeds_needed(0.1, 1.0) > seeds_needed(0.2, 1.0)  # smaller effects need more seeds
    assert seeds_needed(-0.2, 1.0) == seeds_needed(0.2, 1.0)  # symmetric in direction
