"""Verdicts: each variant against the baseline, on paired seeds.

The rule (also in the README and every report), at level ``alpha`` with equivalence
``margin`` (absolute, in the metric's units):

1. **equivalent** -- the paired TOST rejects "the mean difference is at least the margin"
   (p_tost < alpha): whatever the difference is, it is smaller than the margin.
2. **helps** / **hurts** -- otherwise, the Holm-adjusted Wilcoxon signed-rank p-value is
   below alpha and the mean and the median improvement agree in sign, which gives the
   direction (lower is better for losses, higher for accuracy-like metrics). Wilcoxon tests
   the typical (rank) shift; if a few large losses pull the mean the other way, the
   comparison is ``inconclusive`` rather than a verdict the seeds contradict.
3. **inconclusive** -- neither: more seeds are needed (``seeds_needed`` says how many, for
   the observed effect or a stated one, at the requested power).

Identical variants give all-zero differences and come out ``equivalent``.
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ablab._estimators import (
    cliffs_delta,
    finite_pairs,
    improvement,
    paired_differences,
    prob_better,
)
from ablab._hypothesis import holm, seeds_needed, tost_p, wilcoxon_p
from ablab._intervals import bootstrap_ci, curve_ci, prob_better_ci
from ablab._records import VariantHistory
from ablab._study import VerdictSpec
from ablab._summary import headline_metric

RULE = (
    "equivalent if the paired TOST shows |mean difference| < margin (p < alpha); else "
    "helps / hurts if the Holm-adjusted Wilcoxon signed-rank p < alpha and the mean and median "
    "improvement agree in sign (that sign is the direction); else inconclusive."
)

_HIGHER_IS_BETTER = ("acc", "auc", "precision", "recall", "f1", "iou", "r2")


def lower_is_better(metric: str, override: bool | None = None) -> bool:
    """Losses and errors: lower is better; accuracy-like metrics (name contains acc, auc,
    precision, recall, f1, iou, r2): higher. ``override`` = higher_is_better from the study."""
    if override is not None:
        return not override
    name = metric.removeprefix("val_").lower()
    return not any(tag in name for tag in _HIGHER_IS_BETTER)


@dataclass
class Comparison:
    """One variant vs the baseline on one metric (final epoch), over ``n`` finite pairs."""

    variant: str
    baseline: str
    metric: str
    n: int
    diff_mean: float | None
    ci_low: float | None
    ci_high: float | None
    diff_median: float | None
    median_ci_low: float | None
    median_ci_high: float | None
    rel_diff: float | None
    prob_better: float | None
    prob_better_ci_low: float | None
    prob_better_ci_high: float | None
    cliffs_delta: float | None
    p_value: float | None
    p_adjusted: float | None
    p_tost: float | None
    margin: float | None
    verdict: str
    seeds_needed: int | None
    lower_is_better: bool
    confidence: float = 0.95

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def decide(
    p_adjusted: float,
    p_tost: float,
    mean_gain: float,
    alpha: float,
    median_gain: float | None = None,
) -> str:
    """The verdict rule (module docstring). A gain > 0 means the variant is better."""
    median_gain = mean_gain if median_gain is None else median_gain
    if p_tost < alpha:
        return "equivalent"
    if p_adjusted < alpha and mean_gain * median_gain > 0:
        return "helps" if mean_gain > 0 else "hurts"
    return "inconclusive"


def paired_curve(
    histories: dict[str, VariantHistory],
    variant: str,
    baseline: str,
    metric: str,
    rng: np.random.Generator,
    *,
    confidence: float = 0.95,
    n_resamples: int = 2000,
) -> dict[str, np.ndarray]:
    """Per-epoch paired difference ``variant - baseline`` of ``metric`` with a bootstrap band.

    Returns ``{"epoch", "diff_mean", "ci_low", "ci_high"}``, each (epochs,) over the epochs both
    arms have; seeds matched by id, a seed non-finite anywhere in either curve left out
    (``ablab._intervals.curve_ci``).
    """
    base, var = histories[baseline], histories[variant]
    _, bi, vi = np.intersect1d(base.seeds, var.seeds, return_indices=True)
    epochs = min(base.values[metric].shape[1], var.values[metric].shape[1])  # shared epochs
    diff = var.values[metric][vi, :epochs] - base.values[metric][bi, :epochs]
    mean, low, high = curve_ci(diff, rng, confidence=confidence, n_resamples=n_resamples)
    return {
        "epoch": np.arange(1, diff.shape[1] + 1),
        "diff_mean": mean,
        "ci_low": low,
        "ci_high": high,
    }


def _final(history: VariantHistory, metric: str) -> np.ndarray:
    return history.values[metric][:, -1]


def resolve_metric(spec: VerdictSpec, histories: dict[str, VariantHistory]) -> str:
    """The metric compared: the study's choice, else the summary's headline metric."""
    if spec.metric is not None:
        return spec.metric
    return headline_metric(next(iter(histories.values())))


def compare(
    histories: dict[str, VariantHistory], baseline: str, spec: VerdictSpec
) -> list[Comparison]:
    """Every non-baseline variant vs ``baseline`` -- or, when ``spec.pairs`` is set, each
    ``[variant, its baseline]`` pair -- on ``spec.metric``'s final-epoch values.

    Seeds are matched by id (the paired design); a seed missing or non-finite in either arm
    is left out of that comparison. Holm's correction runs across all comparisons here.
    """
    metric = resolve_metric(spec, histories)
    lower = lower_is_better(metric, spec.higher_is_better)
    rows: list[dict[str, Any]] = []
    if spec.pairs:
        pairs = [(v, b) for v, b in spec.pairs if v in histories and b in histories]
    else:
        pairs = [(v, baseline) for v in histories if v != baseline]
    for name, base_name in pairs:
        hist, base = histories[name], histories[base_name]
        # Each comparison's own generator: its CI does not depend on the other variants.
        rng = np.random.default_rng([spec.random_seed, zlib.crc32(f"{name}|{base_name}".encode())])
        base_final = _final(base, metric)
        finite_base = base_final[np.isfinite(base_final)]
        base_median = float(np.median(finite_base)) if finite_base.size else float("nan")
        margin = spec.margin_abs if spec.margin_abs is not None else spec.margin * abs(base_median)
        _, bi, vi = np.intersect1d(base.seeds, hist.seeds, return_indices=True)
        b, v = finite_pairs(base_final[bi], _final(hist, metric)[vi])
        row: dict[str, Any] = {
            "variant": name,
            "baseline": base_name,
            "metric": metric,
            "n": int(b.size),
            "margin": margin,
            "lower_is_better": lower,
            "confidence": spec.confidence,
        }
        if b.size < 2:
            row.update(verdict="inconclusive", p_value=1.0, seeds_needed=None)
            rows.append(row)
            continue
        diff = paired_differences(b, v)
        gain = improvement(diff, lower)
        ci = bootstrap_ci(
            diff, np.mean, rng, confidence=spec.confidence, n_resamples=spec.n_resamples
        )
        mci = bootstrap_ci(
            diff, np.median, rng, confidence=spec.confidence, n_resamples=spec.n_resamples
        )
        pci = prob_better_ci(gain, rng, confidence=spec.confidence, n_resamples=spec.n_resamples)
        effect = spec.effect if spec.effect is not None else float(diff.mean())
        row.update(
            diff_mean=float(diff.mean()),
            ci_low=ci[0],
            ci_high=ci[1],
            diff_median=float(np.median(diff)),
            median_ci_low=mci[0],
            median_ci_high=mci[1],
            rel_diff=float(diff.mean() / base_median) if base_median else None,
            prob_better=prob_better(diff, lower),
            prob_better_ci_low=pci[0],
            prob_better_ci_high=pci[1],
            cliffs_delta=cliffs_delta(b, v, lower),
            p_value=wilcoxon_p(diff),
            p_tost=tost_p(diff, margin),
            # planned at alpha / m (Bonferroni), a safe bound for Holm's first step
            seeds_needed=seeds_needed(
                effect, float(diff.std(ddof=1)), alpha=spec.alpha / len(pairs), power=spec.power
            ),
            _gain=(float(gain.mean()), float(np.median(gain))),
        )
        rows.append(row)
    adjusted = holm([r["p_value"] for r in rows]) if rows else []
    out = []
    for row, p_adj in zip(rows, adjusted, strict=True):
        row["p_adjusted"] = p_adj
        if "_gain" in row:
            mean_gain, median_gain = row.pop("_gain")
            row["verdict"] = decide(p_adj, row["p_tost"], mean_gain, spec.alpha, median_gain)
        fields = {f: row.get(f) for f in Comparison.__dataclass_fields__}
        out.append(Comparison(**fields))
    return out
