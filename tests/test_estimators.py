"""Point estimates: hand-checkable cases and invariants."""

from __future__ import annotations

import numpy as np
import pytest

from ablab.stats.estimators import cliffs_delta, prob_better


def test_prob_better_by_hand() -> None:
    base = np.array([1.0, 1.0, 1.0, 1.0])
    var = np.array([0.5, 2.0, 1.0, 0.9])  # wins, loses, ties, wins (lower is better)
    d = var - base
    assert prob_better(d, lower=True) == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    assert prob_better(d, lower=False) == pytest.approx((0 + 1 + 0.5 + 0) / 4)


def test_cliffs_delta_by_hand() -> None:
    # variant {1, 2} vs baseline {3}: every variant value is lower -> delta = +1 (lower better)
    assert cliffs_delta(np.array([3.0]), np.array([1.0, 2.0]), lower=True) == 1.0
    assert cliffs_delta(np.array([3.0]), np.array([1.0, 2.0]), lower=False) == -1.0
    # {1, 3} vs {2}: one win, one loss -> 0
    assert cliffs_delta(np.array([2.0]), np.array([1.0, 3.0]), lower=True) == 0.0


def test_swapping_arms_flips_signs() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=50), rng.normal(0.3, size=50)
    assert cliffs_delta(a, b, True) == pytest.approx(-cliffs_delta(b, a, True))
    p_ab = prob_better(b - a, True)
    assert p_ab == pytest.approx(1 - prob_better(a - b, True))


def test_cliffs_delta_rank_formula_equals_the_pairwise_definition() -> None:
    # Expected: Cliff's (1993) definition over all n*m cross pairs, mean of sign(better), here
    # computed pairwise on small inputs with many ties (integers 0..4) and unequal sizes.
    rng = np.random.default_rng(20)
    for n, m in ((1, 1), (3, 7), (25, 18), (60, 60)):
        base = rng.integers(0, 5, n).astype(float)
        var = rng.integers(0, 5, m).astype(float)
        pairwise_lower = float(np.mean(np.sign(base[:, None] - var[None, :])))
        assert cliffs_delta(base, var, lower=True) == pytest.approx(pairwise_lower, abs=1e-12)
        assert cliffs_delta(base, var, lower=False) == pytest.approx(-pairwise_lower, abs=1e-12)
