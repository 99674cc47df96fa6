"""Bootstrap intervals: they bracket the estimate, ignore seed order, flip with the arms."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from ablab.stats.intervals import (
    LARGE_N,
    LINDEBERG_MAX,
    bootstrap_ci,
    curve_ci,
    lindeberg_ratio,
    mean_cornish_fisher,
    median_bootstrap,
    prob_better_ci,
)


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


# -- scale: more than LARGE_N seeds ---------------------------------------------------------


def test_batching_leaves_todays_intervals_unchanged() -> None:
    # Expected: scipy.stats.bootstrap's BCa without `batch` (the previous implementation) on the
    # same sorted data and generator seed; batching draws the same random numbers in order.
    data = np.sort(np.random.default_rng(7).gamma(2.0, 1.0, 1001))
    for statistic in (np.mean, np.median):
        ref = stats.bootstrap(
            (data,), statistic, n_resamples=3000, method="BCa", rng=np.random.default_rng(8)
        ).confidence_interval
        got = bootstrap_ci(data, statistic, np.random.default_rng(8), n_resamples=3000)
        assert got == (float(ref.low), float(ref.high))


def test_large_n_mean_interval_matches_normal_theory() -> None:
    # Expected: the normal-theory (CLT) interval mean +- z * sd / sqrt(n). At n = 50,000 even
    # exponential data (skewness 2) move the bootstrap percentiles by only
    # (z^2 - 1) * 2 / (6 sqrt(n)) ~ 0.004 standard errors (Cornish-Fisher), so 0.02 SE is tight.
    data = np.random.default_rng(9).exponential(1.0, 50_000)
    assert data.size > LARGE_N
    se = data.std() / np.sqrt(data.size)
    z = stats.norm.ppf(0.975)
    lo, hi = bootstrap_ci(data, np.mean, _rng())
    assert lo == pytest.approx(data.mean() - z * se, abs=0.02 * se)
    assert hi == pytest.approx(data.mean() + z * se, abs=0.02 * se)
    # the skewness term points the right way: the upper arm is longer
    assert hi - data.mean() > data.mean() - lo


def test_cornish_fisher_matches_a_resampled_percentile_interval() -> None:
    # Expected: scipy.stats.bootstrap's Monte Carlo percentile interval (20,000 resamples, whose
    # endpoints carry ~0.02 SE of Monte Carlo error) on skewed data of moderate size.
    data = np.random.default_rng(10).exponential(1.0, 2000)
    se = data.std() / np.sqrt(data.size)
    ref = stats.bootstrap(
        (data,), np.mean, n_resamples=20_000, method="percentile", rng=np.random.default_rng(11)
    ).confidence_interval
    lo, hi = mean_cornish_fisher(data, 0.95)
    assert float(lo) == pytest.approx(ref.low, abs=0.1 * se)
    assert float(hi) == pytest.approx(ref.high, abs=0.1 * se)


def test_median_bootstrap_is_exact_for_odd_n() -> None:
    # Expected: the exact bootstrap distribution of the median of n = 2k - 1 values (Maritz &
    # Jarrett, 1978): P(median* <= x_(j)) = P(Binomial(n, j / n) >= k), j = 1..n.
    n, k, draws = 9, 5, 200_000
    x = np.arange(n, dtype=float)
    sample = median_bootstrap(x, np.random.default_rng(12), draws)
    cdf = np.array([np.mean(sample <= v) for v in x])
    exact = stats.binom.sf(k - 1, n, np.arange(1, n + 1) / n)
    assert np.max(np.abs(cdf - exact)) < 0.005  # ~4.5 binomial SEs at 200,000 draws


def test_median_bootstrap_matches_resampling_for_even_n() -> None:
    # Expected: np.median of resamples drawn directly (the definition); two independent samples
    # of 200,000 have a CDF difference SE of ~0.0016, so 0.01 is > 6 SEs.
    n, draws = 8, 200_000
    x = np.array([0.0, 1.0, 3.0, 4.0, 8.0, 9.0, 15.0, 20.0])
    sample = median_bootstrap(x, np.random.default_rng(13), draws)
    direct = np.median(x[np.random.default_rng(14).integers(0, n, (draws, n))], axis=1)
    grid = np.union1d(sample, direct)
    diff = np.searchsorted(np.sort(sample), grid, "right") - np.searchsorted(
        np.sort(direct), grid, "right"
    )
    assert np.max(np.abs(diff)) / draws < 0.01


def test_large_n_median_interval_is_deterministic_and_brackets_the_median() -> None:
    data = np.random.default_rng(15).normal(1.0, 2.0, 30_001)
    shuffled = np.random.default_rng(16).permutation(data)
    lo, hi = bootstrap_ci(data, np.median, _rng())
    assert (lo, hi) == bootstrap_ci(shuffled, np.median, _rng())
    assert lo < np.median(data) < hi
    # Expected width from the asymptotic SE of a normal median, sqrt(pi / 2) * sd / sqrt(n).
    se = np.sqrt(np.pi / 2) * 2.0 / np.sqrt(data.size)
    assert hi - lo == pytest.approx(2 * stats.norm.ppf(0.975) * se, rel=0.1)


def test_large_n_prob_better_interval_matches_the_wald_interval() -> None:
    # Expected: the Wald interval p +- z sqrt(p (1 - p) / n) of a share of n = 50,000 wins
    # (the exact multinomial bootstrap agrees to Monte Carlo error, ~0.03 SE).
    gain = np.random.default_rng(17).normal(0.2, 1.0, 50_000)
    gain[:500] = 0.0  # ties count 1/2: three distinct win scores
    share = float(np.mean((gain > 0) + 0.5 * (gain == 0)))
    se = np.sqrt(share * (1 - share) / gain.size)
    z = stats.norm.ppf(0.975)
    lo, hi = prob_better_ci(gain, _rng())
    assert (lo, hi) == prob_better_ci(gain, _rng())  # deterministic given the generator
    assert lo == pytest.approx(share - z * se, abs=0.1 * se)
    assert hi == pytest.approx(share + z * se, abs=0.1 * se)


def test_an_outlying_seed_falls_back_to_resampling() -> None:
    data = np.random.default_rng(18).normal(size=LARGE_N + 1)
    data[0] = 1e4  # one seed alone moves a resampled mean by ~1 standard error
    assert lindeberg_ratio(data) > LINDEBERG_MAX
    lo, hi = bootstrap_ci(data, np.mean, _rng(), n_resamples=200)
    assert lo < data.mean() < hi
    # the outlier's count in a resample is ~Poisson(1): a lumpy, right-skewed distribution
    assert hi - data.mean() > data.mean() - lo


def test_large_n_curve_band_matches_normal_theory_per_epoch() -> None:
    # Expected: per epoch, mean +- z sd / sqrt(n) (normal data: skewness ~0); an epoch where
    # every difference is 0 has a point band.
    diff = np.random.default_rng(19).normal(size=(20_000, 3)) + np.array([0.0, 1.0, 2.0])
    diff[:, 0] = 0.0
    mean, lo, hi = curve_ci(diff, _rng())
    se = diff.std(axis=0) / np.sqrt(diff.shape[0])
    z = stats.norm.ppf(0.975)
    assert lo[0] == hi[0] == 0.0
    np.testing.assert_allclose(lo[1:], (mean - z * se)[1:], atol=0.02 * se[1:].max())
    np.testing.assert_allclose(hi[1:], (mean + z * se)[1:], atol=0.02 * se[1:].max())
