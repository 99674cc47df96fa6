"""Training dynamics: the "why" of every run, read from its stored per-seed, per-epoch history.

Three findings per variant on the verdict metric, none of which needs the model (so they apply
to every run, beside the analytic optimum and BatchNormalization diagnoses of
``ablab.analysis.explain``):

* **Generalisation gap**: the final validation metric minus its training counterpart
  (``val_loss − loss``, ``val_accuracy − accuracy``) per seed, when both were recorded; its
  median over seeds with a distribution-free interval from order statistics
  (``scipy.stats.quantile_test``; Conover, 1999, §3.2), and its trend over the last epochs. A
  gap on the validation-is-worse side that keeps growing (its slope's interval excludes 0) is
  overfitting. Keras' training figure
  is the epoch's running mean in training mode (dropout on, weights still moving), so part of
  a gap is that rather than generalisation.
* **Still improving at the last epoch**: the least-squares slope of the verdict metric over the
  last ``k = max(3, ⌈20 % of the epochs⌉)`` epochs. The slope of the mean curve is the mean of
  the seeds' own slopes (least squares is linear in y), so its confidence interval is the
  t-interval over seeds (``scipy.stats.ttest_1samp``). An interval that excludes 0 in the
  improving direction: undertrained -- more epochs would change the answer. For a paired
  comparison the same slope of the paired difference says whether the effect itself still moves.
* **Seed sensitivity**: the SD and IQR (``scipy.stats.iqr``) of the final metric over seeds
  against the paired effect vs the baseline (the comparison's mean difference), with the
  comparison's P(better): what one run per variant would have said.

Diverged seeds (a non-finite value in the epochs used) are left out of every figure here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

from ablab.stats.summary import headline_metric
from ablab.stats.verdicts import lower_is_better
from ablab.store.records import VariantHistory

MIN_EPOCHS = 3
"""The fewest epochs a slope is fitted over (and a run needs for one)."""
TAIL_FRACTION = 0.2
"""The share of the epochs, at the end, a slope is fitted over (at least MIN_EPOCHS)."""
COIN_FLIP = (0.4, 0.6)
"""P(better) inside this range: one run per variant would order them by chance."""


def last_epochs(n_epochs: int) -> int:
    """How many final epochs a slope is fitted over: ``max(3, ⌈0.2 n⌉)``, at most ``n``."""
    return min(n_epochs, max(MIN_EPOCHS, math.ceil(TAIL_FRACTION * n_epochs)))


def seed_slopes(values: np.ndarray, k: int) -> np.ndarray:
    """(seeds,) least-squares slope per epoch of each seed's last ``k`` epochs; ``values``
    (seeds, epochs). Seeds with a non-finite value among them are dropped."""
    tail = np.asarray(values, dtype=np.float64)[:, -k:]
    tail = tail[np.isfinite(tail).all(axis=1)]
    x = np.arange(k, dtype=np.float64) - (k - 1) / 2.0  # centred: sum(x) = 0
    return np.asarray(tail @ x / (x @ x))


def _interval(values: np.ndarray, confidence: float) -> tuple[float, float, float] | None:
    """(mean, low, high): the t-interval of the mean of ``values`` over seeds; None with fewer
    than two finite values. Identical values: a zero-width interval."""
    v = values[np.isfinite(values)]
    if v.size < 2:
        return None
    mean = float(v.mean())
    if np.ptp(v) <= 1e-12 * max(1.0, abs(mean)):
        return mean, mean, mean
    ci = stats.ttest_1samp(v, 0.0).confidence_interval(confidence_level=confidence)
    return mean, float(ci.low), float(ci.high)


def slope(values: np.ndarray, confidence: float) -> dict[str, Any] | None:
    """``{"slope", "ci_low", "ci_high", "epochs", "n"}``: the slope per epoch of the mean curve
    over the last epochs (:func:`last_epochs`) with its t-interval over seeds; None with fewer
    than MIN_EPOCHS epochs or two usable seeds."""
    n_epochs = values.shape[1]
    if n_epochs < MIN_EPOCHS:
        return None
    k = last_epochs(n_epochs)
    slopes = seed_slopes(values, k)
    est = _interval(slopes, confidence)
    if est is None:
        return None
    mean, low, high = est
    return {"slope": mean, "ci_low": low, "ci_high": high, "epochs": k, "n": int(slopes.size)}


def median_interval(values: np.ndarray, confidence: float) -> dict[str, Any] | None:
    """``{"median", "ci_low", "ci_high", "n"}`` over the finite values: the median with its
    distribution-free interval (order statistics, ``scipy.stats.quantile_test``; None bounds
    where too few seeds reach ``confidence``); None without a finite value."""
    v = values[np.isfinite(values)]
    if v.size == 0:
        return None
    median = float(np.median(v))
    low = high = None
    if v.size > 1 and np.ptp(v) > 0:
        ci = stats.quantile_test(v, q=median, p=0.5).confidence_interval(confidence)
        low = float(ci.low) if np.isfinite(ci.low) else None
        high = float(ci.high) if np.isfinite(ci.high) else None
    elif v.size > 1:
        low = high = median
    return {"median": median, "ci_low": low, "ci_high": high, "n": int(v.size)}


def _excludes_zero(s: Mapping[str, Any] | None, sign: float) -> bool:
    """Does the slope's interval lie strictly on the ``sign`` side of zero?"""
    if s is None:
        return False
    return bool(s["ci_low"] > 0) if sign > 0 else bool(s["ci_high"] < 0)


def _train_name(metric: str) -> str | None:
    return metric.removeprefix("val_") if metric.startswith("val_") else None


def _paired_difference(
    variant: VariantHistory, baseline: VariantHistory, metric: str
) -> np.ndarray | None:
    """(common seeds, epochs) variant − baseline on ``metric`` over the seeds both ran."""
    if metric not in variant.values or metric not in baseline.values:
        return None
    common, iv, ib = np.intersect1d(variant.seeds, baseline.seeds, return_indices=True)
    a, b = variant.values[metric][iv], baseline.values[metric][ib]
    if common.size < 2 or a.shape[1] != b.shape[1]:
        return None
    return np.asarray(a - b)


def _g(x: float) -> str:
    return f"{x:.3g}"


def _signed(x: float) -> str:
    return f"{x:+.3g}"


def _gap_reading(g: Mapping[str, Any], lower: bool) -> str:
    """What the gap's trend says, or "" without a trend: "growing: overfitting" (validation
    worse than training and falling further behind), "narrowing" (validation better, its lead
    shrinking -- typical early on, when the running training mean still carries the first
    batches), "shrinking" or "steady"."""
    trend = g.get("trend")
    if trend is None:
        return ""
    if g["overfitting"]:
        return "growing: overfitting"
    worse = 1.0 if lower else -1.0
    if _excludes_zero(trend, worse):
        return "narrowing: validation's lead over training shrinks"
    return "shrinking" if _excludes_zero(trend, -worse) else "steady"


def _gap_text(g: Mapping[str, Any], metric: str) -> str:
    ci = (
        f" [{_signed(g['ci_low'])}, {_signed(g['ci_high'])}]"
        if g["ci_low"] is not None and g["ci_high"] is not None
        else ""
    )
    text = (
        f"generalisation gap {metric} − {g['train_metric']} {_signed(g['median'])}{ci} "
        "(median of seeds)"
    )
    trend = g.get("trend")
    if trend is None:
        return text
    per = f"{_signed(trend['slope'])}/epoch over the last {trend['epochs']} epochs"
    return f"{text}, {g['reading']} ({per})"


def _trend_reading(t: Mapping[str, Any], lower: bool) -> str:
    if t["undertrained"]:
        return "undertrained: more epochs would change the answer"
    return "getting worse" if _excludes_zero(t, 1.0 if lower else -1.0) else "settled"


def _trend_text(t: Mapping[str, Any], metric: str) -> str:
    ci = f"[{_signed(t['ci_low'])}, {_signed(t['ci_high'])}]"
    per = f"{metric} {_signed(t['slope'])}/epoch {ci} over the last {t['epochs']} epochs"
    if t["undertrained"]:
        return f"still improving at the last epoch ({per}): {t['reading']}"
    if t["reading"] == "settled":
        return f"settled at the last epoch: {per}, its CI includes 0"
    return f"getting worse at the last epoch: {per}"


def _seed_reading(s: Mapping[str, Any], variant: str) -> str:
    """The spread against the effect and what one run per variant would say; "" for a
    variant without a comparison."""
    if s.get("baseline") is None:
        return ""
    base = s["baseline"]
    parts = [
        f"no mean effect vs {base}"
        if s["ratio"] is None
        else f"SD {s['ratio']:.1f}× the effect {_g(s['effect'])} vs {base}"
    ]
    p = s.get("prob_better")
    if p is not None:
        coin = ": a coin flip" if COIN_FLIP[0] <= p <= COIN_FLIP[1] else ""
        parts.append(f"one run per variant calls {variant} better with probability {p:.2f}{coin}")
    return "; ".join(parts)


def _seed_text(s: Mapping[str, Any], metric: str) -> str:
    text = f"seed spread of final {metric}: SD {_g(s['sd'])}, IQR {_g(s['iqr'])}"
    return f"{text}; {s['reading']}" if s["reading"] else text


def _effect_reading(et: Mapping[str, Any]) -> str:
    if _excludes_zero(et, 1.0 if et["slope"] > 0 else -1.0):
        return "still moving: the verdict may differ with more epochs"
    return "settled (its CI includes 0)"


def training_dynamics(
    histories: Mapping[str, VariantHistory],
    comparisons: Sequence[Mapping[str, Any]],
    *,
    metric: str | None = None,
    higher_is_better: bool | None = None,
    confidence: float = 0.95,
) -> dict[str, dict[str, Any]]:
    """Per variant, in the order given: generalisation gap, trend at the last epoch and seed
    sensitivity of the verdict metric (see the module docstring).

    ``comparisons``: the run document's (``Comparison.to_json()``), for the effect, P(better)
    and the metric; ``metric`` / ``higher_is_better``: the verdict metric and its direction
    when there is no comparison (default: val_loss with validation data, else loss). Each entry:
    ``metric``, ``lower_is_better``, ``epochs``, ``gap`` (``{"train_metric", "median", "ci_low",
    "ci_high", "n", "trend", "overfitting"}`` or None), ``trend`` (:func:`slope` plus
    ``relative`` -- per epoch, as a share of the final median -- and ``undertrained``; or None),
    ``effect_trend`` (:func:`slope` of the paired difference vs the baseline, plus
    ``baseline``; or None), ``seeds`` (``{"sd", "iqr", "n", "effect", "ratio", "prob_better",
    "baseline"}`` or None) -- each finding with a short ``reading`` and its sentence, ``text``
    -- and ``text``, the findings' sentences in that order.
    """
    by_variant: dict[str, Mapping[str, Any]] = {}
    for row in comparisons:
        by_variant.setdefault(str(row["variant"]), row)
    out: dict[str, dict[str, Any]] = {}
    for variant, history in histories.items():
        c = by_variant.get(variant)
        ref = c or (comparisons[0] if comparisons else None)  # a baseline: the run's metric
        name = str(ref["metric"]) if ref else metric or headline_metric(history)
        if name not in history.values:
            continue
        lower = bool(ref["lower_is_better"]) if ref else lower_is_better(name, higher_is_better)
        values = history.values[name]
        entry: dict[str, Any] = {
            "metric": name,
            "lower_is_better": lower,
            "epochs": int(values.shape[1]),
            "gap": None,
            "trend": None,
            "effect_trend": None,
            "seeds": None,
        }
        train = _train_name(name)
        if train is not None and train in history.values:
            diff = values - history.values[train]
            gap = median_interval(diff[:, -1], confidence)
            if gap is not None:
                trend = slope(diff, confidence)
                g = {"train_metric": train, **gap, "trend": trend}
                worse = 1.0 if lower else -1.0  # the sign of a gap where validation is worse
                g["overfitting"] = _excludes_zero(trend, worse) and gap["median"] * worse > 0
                g["reading"] = _gap_reading(g, lower)
                g["text"] = _gap_text(g, name)
                entry["gap"] = g
        t = slope(values, confidence)
        if t is not None:
            final = median_interval(values[:, -1], confidence)
            level = abs(final["median"]) if final else 0.0
            t["relative"] = t["slope"] / level if level > 0 else None
            t["undertrained"] = _excludes_zero(t, -1.0 if lower else 1.0)
            t["reading"] = _trend_reading(t, lower)
            t["text"] = _trend_text(t, name)
            entry["trend"] = t
        if c and c.get("paired", True) and c["baseline"] in histories:
            paired = _paired_difference(history, histories[c["baseline"]], name)
            et = slope(paired, confidence) if paired is not None else None
            if et is not None:
                et["baseline"] = c["baseline"]
                et["reading"] = _effect_reading(et)
                et["text"] = (
                    f"paired effect vs {c['baseline']} {_signed(et['slope'])}/epoch "
                    f"[{_signed(et['ci_low'])}, {_signed(et['ci_high'])}] over the last "
                    f"{et['epochs']} epochs: {et['reading']}"
                )
            entry["effect_trend"] = et
        finals = values[:, -1]
        finals = finals[np.isfinite(finals)]
        if finals.size >= 2:
            s: dict[str, Any] = {
                "sd": float(np.std(finals, ddof=1)),
                "iqr": float(stats.iqr(finals)),
                "n": int(finals.size),
                "effect": None,
                "ratio": None,
                "prob_better": None,
                "baseline": None,
            }
            if c is not None and c.get("diff_mean") is not None:
                effect = abs(float(c["diff_mean"]))
                s.update(effect=effect, baseline=c["baseline"], prob_better=c.get("prob_better"))
                s["ratio"] = s["sd"] / effect if effect > 0 else None
            s["reading"] = _seed_reading(s, variant)
            s["text"] = _seed_text(s, name)
            entry["seeds"] = s
        findings = ("gap", "trend", "effect_trend", "seeds")
        text = [entry[k]["text"] for k in findings if entry[k] is not None]
        entry["text"] = text
        out[variant] = entry
    return out
