"""Seed planning by simulating the rule: reference values, properties and the null cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from ablab.stats.planning import SIM_MAX, Outcomes, _noether, _simulate, plan


def _plan(gain: np.ndarray, margin: float = 0.01, family: int = 1, seed: int = 0):
    return plan(
        Outcomes(paired=True, gain=gain),
        margin=margin,
        alpha=0.05,
        family=family,
        power=0.8,
        rng=np.random.default_rng(seed),
    )


def test_planned_seeds_give_the_power_they_promise() -> None:
    gain = np.random.default_rng(0).normal(0.0, 1.0, 300)
    gain = (gain - gain.mean()) / gain.std(ddof=1) + 0.3  # exactly d = 0.3
    p = _plan(gain)
    assert p.n is not None and p.method.startswith("simulation")
    # reference: the paired t-test needs n = 90 for d = 0.3 (G*Power, two-sided .05, power .8);
    # Wilcoxon's efficiency 3/pi on normal data (Hodges & Lehmann, 1956) -> ~94; the
    # simulation's own error is ~+-10 %
    assert 75 <= p.n <= 120
    obs = Outcomes(paired=True, gain=gain)
    kw = {"margin": 0.01, "margin_se": 0.0, "alpha": 0.05, "family": 1}
    kw["rng"] = np.random.default_rng(9)
    assert _simulate(obs, p.n, **kw)[0] >= 0.7  # a fresh simulation agrees (MC error ~0.03)
    assert _simulate(obs, p.n // 2, **kw)[0] < 0.8


def test_smaller_effects_need_more_seeds_and_more_comparisons_too() -> None:
    rng = np.random.default_rng(1)
    noise = rng.normal(0.0, 1.0, 300)
    big, small = _plan(noise + 0.6), _plan(noise + 0.3)
    assert big.n < small.n
    assert _plan(noise + 0.6, family=5).n > big.n  # Bonferroni alpha / 5


def test_identical_arms_need_only_the_tests_floor() -> None:
    p = _plan(np.zeros(100), margin=0.0, family=3)
    assert p.n == 7  # equivalent as soon as a verdict is possible at all (Holm over 3)


def test_a_rule_that_cannot_conclude_gets_no_number() -> None:
    gain = np.where(np.arange(300) % 10 == 0, 1.0, -0.05)  # ranks say worse, mean better
    p = _plan(gain, margin=0.001)
    assert p.n is None and "cannot conclude" in p.reason and "opposite" in p.reason


def test_noether_matches_its_closed_form_on_a_known_distribution() -> None:
    # Noether (1987): n = (z_{1-a/2} + z_pow)^2 / (3 (p' - 1/2)^2); for normal g with mean d
    # and SD 1, p' = P(g1 + g2 > 0) = Phi(sqrt(2) d)
    d = 0.05
    gain = stats.norm.ppf((np.arange(20_000) + 0.5) / 20_000) + d
    p_prime = stats.norm.cdf(math.sqrt(2) * d)
    expected = (stats.norm.ppf(0.975) + stats.norm.ppf(0.8)) ** 2 / (3 * (p_prime - 0.5) ** 2)
    n = _noether(Outcomes(paired=True, gain=gain), 0.05, 1, 0.8)
    assert n == pytest.approx(expected, rel=0.02)


def test_beyond_the_simulated_range_the_normal_approximation_is_used() -> None:
    gain = np.random.default_rng(2).normal(0.0, 1.0, 4000)
    gain = gain - gain.mean() + 0.015  # ~0.015 SD: tens of thousands of seeds
    p = _plan(gain, margin=0.001)
    assert p.n is not None and p.n > SIM_MAX
    assert "Noether" in p.method
    # the t-test needs (1.96 + 0.84)^2 / 0.015^2 = 34,900; Wilcoxon ~pi/3 more
    assert 25_000 < p.n < 60_000
