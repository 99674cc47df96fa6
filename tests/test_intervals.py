"""Bootstrap intervals: they bracket the estimate, ignore seed order, flip with the arms."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from ablab._intervals import bootstrap_ci, curve_ci, prob_better_ci


def _rng() -> np.random.Generator:
    return np.random.default_rng(123)


def test_ci_brackets_the_estimate_and_covers_the_truth_roughly() -> None:
    data = np.random.default_rng(1).normal(0.5, 1.0, 400)
    lo, hi = bootstrap_ci(data, np.mean, _rng())
    assert lo < data.mean() < hi
    # Close to the t interval for a mean of 400 normal draws (scipy.stats.t).
    t_lo, t_hi = stats.t.interval(0.95, 399, loc=data.mean(), scale=stats.sem(data))
    assert lo == pytest.approx(t_lo, abs=0.02) and hi == pytest.approx(t_hi, abs=0.02)


def test_seed_order_does_not_matter() -> None:
    data = np.random.default_rng(2).normal(size=200)
    shuffled = np.random.default_rng(3).permutation(data)
    assert bootstrap_ci(data, np.median, _rng()) == bootstrap_ci(shuffled, np.median, _rng())


def test_swapping_arms_flips_the_interval() -> None:
    diff = np.random.default_rng(4).normal(0.2, 1.0, 300)
    lo, hi = bootstrap_ci(diff, np.mean, _rng())
    nlo, nhi = bootstrap_ci(-diff, np.mean, _rng())
    assert nlo == pytest.approx(-hi, abs=5e-3) and nhi == pytest.approx(-lo, abs=5e-3)


def test_constant_data_gives_a_point_interval() -> None:
    assert bootstrap_ci(np.zeros(10), np.mean, _rng()) == (0.0, 0.0)


def test_prob_better_ci_brackets_the_share() -> None:
    gain = np.random.default_rng(5).normal(0.3, 1.0, 300)
    share = float(np.mean(gain > 0))
    lo, hi = prob_better_ci(gain, _rng())
    assert 0 <= lo < share < hi <= 1


def test_curve_band_brackets_the_mean_per_epoch() -> None:
    diff = np.random.default_rng(6).normal(size=(100, 5)) + np.arange(5)
    mean, lo, hi = curve_ci(diff, _rng(), n_resamples=500)
    assert mean.shape == lo.shape == hi.shape == (5,)
    assert np.all(lo < mean) and np.all(mean < hi)
