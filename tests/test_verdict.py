"""Verdicts over histories: directions, Holm across comparisons, margins, pairing, and
calibration on real training.

Calibration on real training: 200 A/A comparisons -- the same variant twice, the second from a
different block of seeds -- must come out `helps`/`hurts` at a rate <= 0.08 at alpha 0.05 (the
simulated calibration over thousands of replicates is tests/test_rule.py and
bench/calibration.py), and a real effect (Adam's learning rate x 0.1) must be detected.
"""

from __future__ import annotations

import numpy as np
import pytest

import ablab
from ablab.errors import StudyError
from ablab.stats.verdicts import compare, lower_is_better, paired_curve
from ablab.store.records import VariantHistory
from ablab.study.schema import VerdictSpec
from tests.conftest import make_program

FAST = VerdictSpec(n_resamples=999)


def _hist(final: np.ndarray, metric: str = "val_loss", seeds: np.ndarray | None = None):
    seeds = np.arange(len(final)) if seeds is None else seeds
    return VariantHistory(seeds=seeds, values={metric: np.asarray(final, float)[:, None]})


def test_mean_and_ranks_disagreeing_is_inconclusive() -> None:
    # +0.05 worse on 90 % of seeds, -1.0 better on 10 %: the signed ranks are sure the typical
    # seed is worse, the mean says better -- no verdict the seeds contradict
    base = np.random.default_rng(6).normal(1.0, 0.2, 200)
    delta = np.where(np.arange(200) % 10 == 0, -1.0, 0.05)
    (c,) = compare({"b": _hist(base), "v": _hist(base + delta)}, "b", FAST)
    assert c.p_adjusted < 1e-6 and c.diff_mean < 0 and c.diff_median > 0
    assert c.verdict == "inconclusive" and "typical seed and the average disagree" in c.reason


def test_identical_variants_are_equivalent_even_with_zero_margin() -> None:
    base = np.random.default_rng(7).normal(1.0, 0.2, 30)
    spec = VerdictSpec(n_resamples=999, margin=0.0)
    (c,) = compare({"a": _hist(base), "b": _hist(base.copy())}, "a", spec)
    assert c.verdict == "equivalent"


def test_direction_from_metric_name() -> None:
    assert lower_is_better("val_loss") and lower_is_better("mae")
    assert not lower_is_better("val_accuracy") and not lower_is_better("auc")
    assert lower_is_better("val_accuracy", override=False)


def test_identical_variants_are_equivalent() -> None:
    base = np.random.default_rng(0).normal(1.0, 0.2, 100)
    (c,) = compare({"a": _hist(base), "b": _hist(base.copy())}, "a", FAST)
    assert c.verdict == "equivalent" and c.diff_mean == 0.0 and c.p_value == 1.0
    assert c.ci_low == c.ci_high == 0.0 and c.prob_better == 0.5


def test_clear_effects_and_their_direction() -> None:
    rng = np.random.default_rng(1)
    base = rng.normal(1.0, 0.2, 200)
    noise = rng.normal(0.0, 0.02, 200)
    hists = {
        "base": _hist(base),
        "better": _hist(base - 0.1 + noise),
        "worse": _hist(base + 0.1 + noise),
    }
    by = {c.variant: c for c in compare(hists, "base", FAST)}
    assert by["better"].verdict == "helps" and by["worse"].verdict == "hurts"
    assert by["better"].ci_low < by["better"].diff_mean < by["better"].ci_high < 0
    assert by["better"].prob_better > 0.99 and by["worse"].prob_better < 0.01
    # accuracy: higher is better, so the same shift reverses the verdicts
    acc = {k: _hist(v.values["val_loss"][:, 0], "val_accuracy") for k, v in hists.items()}
    spec = VerdictSpec(n_resamples=999, metric="val_accuracy")
    by_acc = {c.variant: c for c in compare(acc, "base", spec)}
    assert by_acc["better"].verdict == "hurts" and by_acc["worse"].verdict == "helps"


def test_holm_is_applied_across_all_comparisons() -> None:
    rng = np.random.default_rng(2)
    base = rng.normal(1.0, 0.2, 40)
    hists = {"base": _hist(base)}
    for k in range(4):
        hists[f"v{k}"] = _hist(base + rng.normal(0.0, 0.05, 40))
    comps = compare(hists, "base", FAST)
    raw = sorted(c.p_value for c in comps)
    assert min(c.p_adjusted for c in comps) == pytest.approx(min(1.0, 4 * raw[0]))
    assert all(c.p_adjusted >= c.p_value for c in comps)


def test_explicit_pairs_each_with_its_own_baseline() -> None:
    rng = np.random.default_rng(4)
    a, b = rng.normal(1.0, 0.2, 80), rng.normal(3.0, 0.2, 80)
    hists = {"a": _hist(a), "a_bn": _hist(a - 0.2), "b": _hist(b), "b_bn": _hist(b + 0.2)}
    spec = VerdictSpec(n_resamples=999, pairs=[("a_bn", "a"), ("b_bn", "b")])
    comps = compare(hists, "a", spec)
    assert [(c.variant, c.baseline, c.verdict) for c in comps] == [
        ("a_bn", "a", "helps"),
        ("b_bn", "b", "hurts"),
    ]
    assert comps[1].margin == pytest.approx(0.1 * np.std(b, ddof=1))  # its own baseline's SD


def test_per_epoch_curve_band_brackets_the_mean() -> None:
    rng = np.random.default_rng(5)
    base = rng.normal(1.0, 0.2, (50, 4))
    hists = {
        "a": VariantHistory(np.arange(50), {"val_loss": base}),
        "b": VariantHistory(np.arange(50), {"val_loss": base - np.arange(4) * 0.1}),
    }
    curve = paired_curve(hists, "b", "a", "val_loss", np.random.default_rng(0), n_resamples=500)
    np.testing.assert_allclose(curve["diff_mean"], -np.arange(4) * 0.1, atol=1e-12)
    assert curve["epoch"].tolist() == [1, 2, 3, 4]
    assert np.all(curve["ci_low"] <= curve["diff_mean"] + 1e-12)
    assert np.all(curve["diff_mean"] <= curve["ci_high"] + 1e-12)


def test_pairs_by_seed_id() -> None:
    base = _hist(np.array([1.0, 2.0, 3.0, np.nan]), seeds=np.array([0, 1, 2, 3]))
    var = _hist(np.array([0.5, 2.5, 1.5]), seeds=np.array([2, 1, 0]))  # seeds in another order
    (c,) = compare({"b": base, "v": var}, "b", FAST)
    assert c.n == 3 and c.paired  # seed 3 has no partner
    # pairs by id: seed0 1.0->1.5, seed1 2.0->2.5, seed2 3.0->0.5
    assert c.diff_mean == pytest.approx((0.5 + 0.5 - 2.5) / 3)


def test_diverged_seeds_stay_in_the_comparison_as_the_worst_outcome() -> None:
    rng = np.random.default_rng(8)
    base = rng.normal(1.0, 0.1, 40)
    var = base + rng.normal(0.0, 0.01, 40)
    var[:3] = np.inf
    (c,) = compare({"b": _hist(base), "v": _hist(var)}, "b", FAST)
    assert c.n == 40 and c.n_finite == 37 and (c.diverged, c.baseline_diverged) == (3, 0)
    assert c.verdict != "equivalent"  # a seed diverging in one arm only is a real difference
    assert c.prob_better < 0.5 + 0.5 * 37 / 40  # the diverged seeds count as losses
    assert c.p_diverged == pytest.approx(0.25)  # exact McNemar, 3 discordant pairs


def test_margin_choices_and_their_description() -> None:
    rng = np.random.default_rng(9)
    base = rng.normal(5.0, 0.2, 50)
    hists = {"b": _hist(base), "v": _hist(base + rng.normal(0, 0.01, 50))}
    (sd,) = compare(hists, "b", FAST, plan_seeds=False)
    (ab,) = compare(hists, "b", VerdictSpec(n_resamples=99, margin=0.05), plan_seeds=False)
    (pct,) = compare(hists, "b", VerdictSpec(n_resamples=99, margin_pct=2), plan_seeds=False)
    assert sd.margin == pytest.approx(0.1 * np.std(base, ddof=1))
    assert ab.margin == 0.05 and "absolute" in ab.margin_rule
    assert pct.margin == pytest.approx(0.02 * np.median(base)) and "2 %" in pct.margin_rule
    with pytest.raises(ValueError, match="at most one"):
        VerdictSpec(margin=0.1, margin_pct=1)


def test_runs_stored_with_the_old_margin_keys_keep_their_meaning() -> None:
    # study.json written before the margin rule changed: margin = fraction, margin_abs beside
    assert VerdictSpec.model_validate({"margin": 0.01, "margin_abs": None}).margin_pct == 1.0
    old_abs = VerdictSpec.model_validate({"margin": 0.01, "margin_abs": 0.3})
    assert old_abs.margin == 0.3 and old_abs.margin_pct is None


def test_both_margins_in_a_study_file_is_a_study_error() -> None:
    with pytest.raises(StudyError, match=r"\[verdicts\].*at most one"):
        ablab.study_from_dict(
            {
                "data": {"synthetic": {"shape": [20, 3]}},
                "train": {"loss": "mse"},
                "model": {"layers": [{"layer": "Dense", "units": 3}]},
                "verdicts": {"margin": 0.1, "margin_pct": 2},
            }
        )


def test_disjoint_seed_sets_are_compared_unpaired() -> None:
    rng = np.random.default_rng(10)
    base = _hist(rng.normal(1.0, 0.1, 30), seeds=np.arange(30))
    var = _hist(rng.normal(0.8, 0.1, 30), seeds=np.arange(100, 130))
    (c,) = compare({"b": base, "v": var}, "b", FAST)
    assert not c.paired and "Mann-Whitney" in c.test
    assert c.verdict == "helps" and c.ci_low < c.diff_mean < c.ci_high < 0


def test_inconclusive_reports_seeds_needed() -> None:
    rng = np.random.default_rng(3)
    base = rng.normal(1.0, 0.3, 12)
    var = base + rng.normal(-0.03, 0.3, 12)
    (c,) = compare({"b": _hist(base), "v": _hist(var)}, "b", FAST)
    assert c.verdict == "inconclusive"
    assert c.seeds_needed is not None and c.seeds_needed > 12


def _study(seeds: int) -> ablab.Study:
    return ablab.Study(
        data={"synthetic": {"shape": [100, 12], "seed": 1}},
        train={
            "optimizer": "adam",
            "loss": "mse",
            "epochs": 20,
            "validation_split": 0.1,
            "shuffle": False,
        },
        variants={
            "plain": {"layers": [{"layer": "Dense", "units": 8}, {"layer": "Dense", "units": 12}]},
            "slow": {
                "layers": [{"layer": "Dense", "units": 8}, {"layer": "Dense", "units": 12}],
                "train": {"optimizer": {"name": "adam", "learning_rate": 1e-4}},
            },
        },
        seeds={"count": seeds},
    )


def test_calibration_a_a_false_verdicts_at_most_8_percent() -> None:
    n_cmp, n_seeds = 200, 30
    program = make_program(_study(1), "plain")
    finals = program.train(np.arange(2 * n_cmp * n_seeds, dtype=np.uint32))["val_loss"][:, -1]
    blocks = finals.reshape(2 * n_cmp, n_seeds)
    verdicts = []
    for k in range(n_cmp):
        # "the same variant twice, the second with a different seed base": pair by position
        a, b = _hist(blocks[2 * k]), _hist(blocks[2 * k + 1])
        # the verdict alone is calibrated here: no intervals' precision needed, no planning
        (c,) = compare({"a": a, "b": b}, "a", VerdictSpec(n_resamples=99), plan_seeds=False)
        verdicts.append(c.verdict)
    false_rate = np.mean([v in ("helps", "hurts") for v in verdicts])
    assert false_rate <= 0.08, false_rate


def test_a_real_effect_is_detected() -> None:
    study = _study(30)
    ids = np.arange(30, dtype=np.uint32)
    hists = {
        v: VariantHistory(seeds=ids.astype(np.int64), values=make_program(study, v).train(ids))
        for v in ("plain", "slow")
    }
    (c,) = compare(hists, "plain", FAST)
    assert c.verdict == "hurts" and c.diff_mean > 0 and c.p_adjusted < 0.05
