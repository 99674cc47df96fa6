"""The verdict rule on the adversarial cases of issue #14, one test per row of its table.

Each case was given a wrong verdict by the rule before (the comment says which); the expected
answers are the issue's "right answer" column. Data are synthetic with fixed generators.
"""

from __future__ import annotations

import numpy as np
import pytest

from ablab.stats.verdicts import compare
from ablab.store.records import VariantHistory
from ablab.study.schema import VerdictSpec

FAST = VerdictSpec(n_resamples=999)


def _hist(final: np.ndarray, metric: str = "val_loss") -> VariantHistory:
    return VariantHistory(
        seeds=np.arange(len(final)), values={metric: np.asarray(final, float)[:, None]}
    )


def _one(base: np.ndarray, var: np.ndarray, spec: VerdictSpec = FAST, metric: str = "val_loss"):
    (c,) = compare({"b": _hist(base, metric), "v": _hist(var, metric)}, "b", spec)
    return c


def test_survivorship_variant_better_on_survivors_but_diverges_is_not_helps() -> None:
    # before: "helps" -- the 10 diverged seeds were dropped and the 20 survivors were better
    rng = np.random.default_rng(10)
    base = rng.normal(1.0, 0.1, 30)
    var = base - 0.03 + rng.normal(0.0, 0.005, 30)
    var[:10] = np.nan
    c = _one(base, var)
    assert c.verdict == "hurts" and c.stability == "less stable"
    assert (c.diverged, c.baseline_diverged) == (10, 0)
    assert c.p_diverged == pytest.approx(2 * 0.5**10)  # exact McNemar: 10 discordant, all one way
    assert "less stable" in c.reason and "10 of 30" in c.reason


def test_variant_that_diverges_less_is_reported_more_stable() -> None:
    # before: "hurts" -- survivors 0.03 worse, the baseline's 10 diverged seeds ignored
    rng = np.random.default_rng(11)
    base = rng.normal(1.0, 0.1, 30)
    var = base + 0.03 + rng.normal(0.0, 0.005, 30)
    base[:10] = np.inf
    c = _one(base, var)
    assert c.verdict == "helps" and c.stability == "more stable"
    assert (c.diverged, c.baseline_diverged) == (0, 10)
    assert "more stable" in c.reason


def test_constant_offset_does_not_hide_a_five_sd_effect() -> None:
    # before: "equivalent" -- the margin was 1 % of the level (100 -> 1.0 > 0.5)
    rng = np.random.default_rng(12)
    base = rng.normal(100.0, 0.1, 30)
    var = base + 0.5 + rng.normal(0.0, 0.01, 30)
    c = _one(base, var)
    assert c.verdict == "hurts"
    # the margin is set by the spread: the same data shifted by a constant keep it
    shifted = _one(base - 100.0, var - 100.0)
    assert shifted.margin == pytest.approx(c.margin, rel=1e-9)
    assert shifted.verdict == "hurts"
    assert c.margin == pytest.approx(0.1 * np.std(base, ddof=1))
    assert "baseline SD" in c.margin_rule


def test_metric_near_zero_gives_one_stable_answer() -> None:
    # before: 63 equivalent / 35 inconclusive / 2 helps over 100 repeats (margin = 1 % of ~0)
    rng = np.random.default_rng(13)
    verdicts = set()
    for _ in range(100):
        base = rng.normal(0.0, 0.05, 30)
        var = base + rng.normal(0.0, 1e-4, 30)
        verdicts.add(_one(base, var, VerdictSpec(n_resamples=99)).verdict)
    assert verdicts == {"equivalent"}


@pytest.mark.parametrize("n", [200, 2000])
def test_heavily_tied_accuracy_that_never_loses_helps(n: int) -> None:
    # before: "inconclusive" (median gain 0) with "seeds needed 14", at p 4e-19 / 5e-176
    rng = np.random.default_rng(14)
    base = rng.choice([0.90, 0.95], n)
    better = np.arange(n) % 5 < 2  # 40 % of seeds better by 0.05, 60 % tied
    var = base + 0.05 * better
    c = _one(base, var, VerdictSpec(n_resamples=999, metric="val_accuracy"), "val_accuracy")
    assert c.diff_median == 0.0 and c.diff_mean > 0
    assert c.verdict == "helps"
    assert "Pratt" in c.test


def test_direction_comes_from_the_signed_ranks_not_mean_and_median() -> None:
    # before: "helps" -- mean and median below 0 (a loss: better), but W+ > W-
    rng = np.random.default_rng(15)
    diff = np.concatenate([np.full(105, -0.001), np.full(85, 0.05), np.full(10, -1.0)])
    diff = diff + rng.normal(0.0, 1e-5, diff.size)
    base = rng.normal(2.0, 0.2, diff.size)
    c = _one(base, base + diff)
    assert c.diff_mean < 0 and c.diff_median < 0 and c.p_value < 0.01
    assert c.verdict != "helps"
    assert c.verdict == "inconclusive" and "signed ranks say worse" in c.reason


def test_every_seed_diverged_hurts_and_says_so() -> None:
    # before: "inconclusive", n 0, p 1, and "add seeds"
    base = np.random.default_rng(16).normal(1.0, 0.1, 30)
    c = _one(base, np.full(30, np.nan))
    assert c.verdict == "hurts" and c.stability == "less stable"
    assert "diverged on every seed (30 of 30)" in c.reason
    assert c.n == 30 and c.diff_mean is None


def test_two_seeds_with_equal_differences_are_inconclusive() -> None:
    # before: "equivalent" by the zero-variance shortcut at n = 2
    c = _one(np.array([1.0, 1.2]), np.array([1.005, 1.205]))
    assert c.verdict == "inconclusive" and "too few seeds" in c.reason
    assert c.n_min == 6


def test_seeds_needed_respects_the_tests_floor_after_holm() -> None:
    # before: "seeds needed 4"; with Holm over 3 comparisons no Wilcoxon verdict exists at n <= 6
    rng = np.random.default_rng(17)
    base = rng.normal(1.0, 0.2, 40)
    hists = {"b": _hist(base)}
    for k in range(3):
        hists[f"v{k}"] = _hist(base - 0.1 + rng.normal(0.0, 0.03, 40))
    for c in compare(hists, "b", FAST):
        assert c.n_min == 7
        assert c.seeds_needed is not None and c.seeds_needed >= 7
        assert c.seeds_needed_method.startswith("simulation")


def test_ties_plus_a_few_big_wins_get_the_rules_answer_not_a_fake_count() -> None:
    # before: "seeds needed 231 / 109" with mean and median disagreeing. 290 ties and 10 seeds
    # much better, never worse: Pratt's signed-rank test concludes (the variant never loses).
    base = np.random.default_rng(18).normal(1.0, 0.1, 300)
    var = base.copy()
    var[:10] -= 0.5
    c = _one(base, var)
    assert c.verdict == "helps" and c.diff_median == 0.0
    assert c.seeds_needed is not None


def test_when_no_number_of_seeds_can_settle_it_seeds_needed_is_null_with_a_reason() -> None:
    # the typical seed slightly worse, a few much better: ranks and mean disagree, forever
    base = np.random.default_rng(6).normal(1.0, 0.2, 200)
    delta = np.where(np.arange(200) % 10 == 0, -1.0, 0.05)  # mean -0.055, margin ~0.02
    c = _one(base, base + delta)
    assert c.verdict == "inconclusive"
    assert c.seeds_needed is None
    assert c.seeds_needed_reason is not None and "cannot conclude" in c.seeds_needed_reason
