"""The "why" of every run from its training curves: generalisation gap, trend at the last
epoch, seed sensitivity -- on synthetic histories whose slopes and gaps are known."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from ablab.analysis.dynamics import last_epochs, seed_slopes, training_dynamics
from ablab.store.records import VariantHistory

S, E = 40, 10
EPOCH = np.arange(1, E + 1, dtype=float)
# per-seed deviations with mean exactly 0 (symmetric), so the mean slope / median gap is known
D = np.linspace(-0.01, 0.01, S)[:, None]
G = np.linspace(-0.05, 0.05, S)[:, None]


def _histories() -> dict[str, VariantHistory]:
    """a: loss falls 0.05/epoch, val_loss 0.04/epoch (+ D per seed), so the gap val_loss − loss
    grows 0.01/epoch from 0.2 (+ G per seed): 0.3 at epoch 10 and still improving.
    b: flat at 1 (+ G): settled, gap 0.3 constant."""
    loss = 1.0 - 0.05 * EPOCH + G
    val = loss + 0.2 + 0.01 * EPOCH + D * EPOCH + G
    flat = np.ones((S, E)) + G
    seeds = np.arange(S)
    return {
        "a": VariantHistory(seeds, {"loss": loss, "val_loss": val}),
        "b": VariantHistory(seeds, {"loss": flat, "val_loss": flat + 0.3}),
    }


COMPARISON = {
    "variant": "a",
    "baseline": "b",
    "metric": "val_loss",
    "lower_is_better": True,
    "paired": True,
    "diff_mean": -0.02,
    "prob_better": 0.55,
}


def test_slopes_are_least_squares_over_the_last_epochs() -> None:
    assert [last_epochs(n) for n in (2, 3, 10, 20, 100)] == [2, 3, 3, 4, 20]
    values = np.random.default_rng(0).normal(size=(5, 10))
    ref = [stats.linregress(np.arange(4), row[-4:]).slope for row in values]
    np.testing.assert_allclose(seed_slopes(values, 4), ref, rtol=1e-12)


def test_gap_trend_and_seed_spread_of_a_known_history() -> None:
    d = training_dynamics(_histories(), [COMPARISON])
    a, b = d["a"], d["b"]
    # gap: val − loss at epoch 10 = 0.2 + 0.01·10 + 10·D + G -> median 0.3 (symmetric);
    # its order-statistics interval is two of the seeds' own gaps around it
    gaps = (_histories()["a"].values["val_loss"] - _histories()["a"].values["loss"])[:, -1]
    assert a["gap"]["median"] == pytest.approx(0.3)
    assert a["gap"]["ci_low"] < 0.3 < a["gap"]["ci_high"]
    assert {a["gap"]["ci_low"], a["gap"]["ci_high"]} <= set(gaps)
    # the gap grows 0.01 + D per epoch: mean 0.01, t-interval over seeds (Student, 39 df)
    half = stats.t.ppf(0.975, S - 1) * np.std(D, ddof=1) / np.sqrt(S)
    trend = a["gap"]["trend"]
    assert trend["slope"] == pytest.approx(0.01) and trend["epochs"] == 3
    assert trend["ci_high"] - trend["slope"] == pytest.approx(half, rel=1e-9)
    assert a["gap"]["overfitting"] and "growing: overfitting" in a["gap"]["text"]
    # val_loss falls 0.04 − D per epoch: still improving -> undertrained
    assert a["trend"]["slope"] == pytest.approx(-0.04)
    assert a["trend"]["ci_high"] < 0 and a["trend"]["undertrained"]
    assert "undertrained: more epochs would change the answer" in a["trend"]["text"]
    assert a["trend"]["relative"] == pytest.approx(-0.04 / np.median(a_final()))
    # the paired effect a − b moves with a's slope: the verdict may still change
    assert a["effect_trend"]["slope"] == pytest.approx(-0.04)
    assert "still moving" in a["effect_trend"]["reading"]
    # seed sensitivity: SD of the final val_loss against |Δ mean| = 0.02, P(better) 0.55
    sd = np.std(a_final(), ddof=1)
    assert a["seeds"]["sd"] == pytest.approx(sd)
    assert a["seeds"]["iqr"] == pytest.approx(np.subtract(*np.percentile(a_final(), [75, 25])))
    assert a["seeds"]["ratio"] == pytest.approx(sd / 0.02)
    assert f"{sd / 0.02:.1f}× the effect 0.02 vs b" in a["seeds"]["text"]
    assert a["seeds"]["text"].endswith("probability 0.55: a coin flip")
    assert a["text"] == [a[k]["text"] for k in ("gap", "trend", "effect_trend", "seeds")]
    # b: flat curves -- settled, a constant gap, no comparison of its own
    assert not b["trend"]["undertrained"] and b["trend"]["reading"] == "settled"
    assert not b["gap"]["overfitting"] and b["gap"]["reading"] == "steady"
    assert b["seeds"]["ratio"] is None and b["effect_trend"] is None


def a_final() -> np.ndarray:
    return _histories()["a"].values["val_loss"][:, -1]


def test_higher_is_better_metrics_and_short_runs() -> None:
    acc = 0.5 + 0.02 * EPOCH + G  # accuracy still rising; validation falls behind by 0.01/epoch
    h = {"m": VariantHistory(np.arange(S), {"accuracy": acc, "val_accuracy": acc - 0.01 * EPOCH})}
    m = training_dynamics(h, [], metric="val_accuracy")["m"]
    assert not m["lower_is_better"]
    assert m["trend"]["undertrained"] and m["trend"]["slope"] == pytest.approx(0.01)
    assert m["gap"]["median"] == pytest.approx(-0.1) and m["gap"]["overfitting"]
    short = {"s": VariantHistory(np.arange(4), {"loss": np.ones((4, 2))})}
    s = training_dynamics(short, [])["s"]
    assert s["trend"] is None and s["gap"] is None and s["seeds"]["sd"] == 0.0
