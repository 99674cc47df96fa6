"""Verdicts: each variant against its baseline on one metric's final values, seed by seed.

This module turns per-seed results into :class:`Comparison` rows: it pairs the seeds, encodes
divergence as an outcome, sets the equivalence margin, runs the rule (``ablab.stats.rule``) with
Holm's correction across the study's comparisons, estimates effects with bootstrap intervals
and plans seeds (``ablab.stats.planning``). The same code serves ``ablab run`` (histories) and
``ablab compare`` (per-seed values from anywhere).

**The margin.** By default the equivalence margin is ``margin_sd`` = 0.1 times the baseline's
across-seed standard deviation of the metric. It is set by the spread, not the level, so it
does not move when a constant is added to the metric and stays meaningful when the metric
sits near 0. Why a tenth: a shift of 0.1 SD changes which of two single runs wins only
slightly -- P(a variant run beats a baseline run) = Phi(0.1 / sqrt 2) = 0.53 instead of 0.50,
Cliff's delta 0.056 -- well inside the "negligible" band of effect-size conventions (Cohen's
d < 0.2; |delta| < 0.147, Romano et al. 2006), so a difference inside it is one no single
training run could show. ``margin`` (absolute) or ``margin_pct`` (percent of the baseline's
|median|) replace it.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any

import numpy as np

from ablab.stats.estimators import cliffs_delta, prob_better
from ablab.stats.hypothesis import holm, min_seeds
from ablab.stats.intervals import bootstrap_ci, bootstrap_ci_two_sample, curve_ci, prob_better_ci
from ablab.stats.metric_choice import choose_metric
from ablab.stats.planning import Outcomes, SeedPlan, plan
from ablab.stats.rule import (
    PAIRED_TEST,
    R_DIVERGES_LESS,
    R_DIVERGES_MORE,
    R_EQUIVALENT,
    R_LESS_STABLE,
    R_MORE_STABLE,
    R_NOT_SIGNIFICANT,
    R_RANK,
    R_RANK_MEAN_DISAGREE,
    R_TOO_FEW,
    R_TRADE_OFF,
    UNPAIRED_TEST,
    VERDICTS,
    Evidence,
    decide,
    family_size,
    paired_evidence,
    rank_ready,
    unpaired_evidence,
)
from ablab.store.records import VariantHistory
from ablab.study.schema import VerdictSpec, default_pairs

RULE = (
    "divergence counts as the worst outcome. Too few seeds for the test to reach alpha after "
    "Holm -> inconclusive. Else equivalent if the TOST (per comparison, not family-wise) puts "
    "the mean difference inside the margin (p < alpha) and divergence does not differ between "
    "the arms; else, if the exact divergence test (McNemar paired, Fisher unpaired; Holm) shows "
    "one arm diverges more, that arm is less stable (hurts / helps), unless the ranks say the "
    "opposite (a trade-off: inconclusive); else helps / hurts if the Holm-adjusted rank test "
    "(Wilcoxon signed-rank with Pratt zeros paired, Mann-Whitney unpaired) p < alpha in the "
    "direction of its ranks, the mean agrees, and the winner is not detectably less stable; "
    "else inconclusive."
)

_HIGHER_IS_BETTER = ("acc", "auc", "precision", "recall", "f1", "iou", "r2")
_LOWER_IS_BETTER = (
    "loss", "error", "mse", "mae", "mape", "msle", "crossentropy", "hinge", "nll", "perplexity",
    "divergence", "huber", "cosh", "poisson",
)  # fmt: skip


def name_says_direction(metric: str) -> bool:
    """Does the metric's name tell whether lower or higher is better (a loss / an error, or
    an accuracy-like score)? Other names ("score", "reward") are a guess (lower)."""
    name = metric.removeprefix("val_").lower()
    return any(tag in name for tag in (*_HIGHER_IS_BETTER, *_LOWER_IS_BETTER))


def lower_is_better(metric: str, override: bool | None = None) -> bool:
    """Losses and errors: lower is better; accuracy-like metrics (name contains acc, auc,
    precision, recall, f1, iou, r2): higher. ``override`` = higher_is_better from the study."""
    if override is not None:
        return not override
    name = metric.removeprefix("val_").lower()
    return not any(tag in name for tag in _HIGHER_IS_BETTER)


@dataclass
class Comparison:
    """One variant vs its baseline on one metric's final values.

    ``n``: seeds compared (pairs; the variant's seeds when unpaired), diverged ones included;
    ``n_finite``: those where both arms converged (the effect estimates and the TOST use them).
    Differences are ``variant - baseline`` in the metric's units.
    """

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
    reason: str = ""
    """One sentence: why this verdict (the rule's branch, in numbers)."""
    paired: bool = True
    test: str = PAIRED_TEST
    n_baseline: int | None = None
    n_finite: int | None = None
    n_min: int | None = None
    """The fewest seeds at which the test can reach alpha after the adjustment."""
    diverged: int = 0
    baseline_diverged: int = 0
    p_diverged: float | None = None
    p_diverged_adjusted: float | None = None
    stability: str | None = None
    """"more stable" / "less stable" where the divergence test is significant."""
    margin_rule: str = ""
    margin_se: float = 0.0
    """Standard error of a margin estimated from the baseline's seeds (0 for a stated one)."""
    seeds_needed_method: str | None = None
    seeds_needed_reason: str | None = None
    metric_note: str = ""
    """Why the compared metric is not Keras' val_loss (``ablab.stats.metric_choice``), or ""."""
    metric_warning: str = ""
    """What makes the compared metric mislead (a penalty, different losses), or ""."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _comparison(row: dict[str, Any]) -> Comparison:
    """A Comparison from a row of computed fields; the estimates that could not be computed
    (too few converged seeds) are None."""
    values = {}
    for f in fields(Comparison):
        if f.name in row:
            values[f.name] = row[f.name]
        elif f.default is MISSING:
            values[f.name] = None
    return Comparison(**values)


@dataclass
class Arm:
    """One arm's final values: ``seeds`` (n,) ids, ``values`` (n,) in metric units, and
    ``diverged`` (n,) -- non-finite values, or seeds the run's divergence rule flagged."""

    seeds: np.ndarray
    values: np.ndarray
    diverged: np.ndarray

    @classmethod
    def of(cls, seeds: np.ndarray, values: np.ndarray, diverged: np.ndarray | None = None) -> Arm:
        values = np.asarray(values, dtype=np.float64)
        flagged = ~np.isfinite(values)
        if diverged is not None:
            flagged = flagged | np.asarray(diverged, dtype=bool)
        return cls(np.asarray(seeds), values, flagged)

    def scores(self, lower: bool) -> np.ndarray:
        """Higher-is-better values, -inf where diverged."""
        s = -self.values if lower else self.values.copy()
        return np.where(self.diverged, -np.inf, s)


def equivalence_margin(spec: VerdictSpec, baseline_values: np.ndarray) -> tuple[float, float, str]:
    """``(margin, its standard error, how it was set)`` (module docstring) from the baseline's
    converged final values (seeds,). A margin estimated from the seeds is itself uncertain:
    SE(s) ~ s / sqrt(2 (n - 1)) for the SD, SE(median) ~ s sqrt(pi / (2 n)) for the median
    (normal approximations); the TOST adds it to the mean's standard error."""
    if spec.margin is not None:
        return float(spec.margin), 0.0, "[verdicts] margin (absolute)"
    finite = baseline_values[np.isfinite(baseline_values)]
    if finite.size < 2:
        return 0.0, 0.0, "0: fewer than 2 converged baseline seeds"
    n, sd = finite.size, float(np.std(finite, ddof=1))
    if spec.margin_pct is not None:
        share = spec.margin_pct / 100.0
        se = share * sd * np.sqrt(np.pi / (2 * n))
        rule = f"{spec.margin_pct:g} % of |baseline median|"
        return share * abs(float(np.median(finite))), se, rule
    return (
        spec.margin_sd * sd,
        spec.margin_sd * sd / np.sqrt(2 * (n - 1)),
        f"{spec.margin_sd:g} × baseline SD ({sd:.3g})",
    )


@dataclass
class _Prepared:
    """One comparison before the family-wide adjustment."""

    row: dict[str, Any]
    evidence: Evidence
    outcomes: Outcomes


def _paired_gain(base: Arm, var: Arm, lower: bool) -> np.ndarray:
    """Per shared seed: improvement (score units); +inf only the baseline diverged, -inf only
    the variant, NaN both (``ablab.stats.rule`` encoding)."""
    sb, sv = base.scores(lower), var.scores(lower)
    with np.errstate(invalid="ignore"):
        gain = sv - sb  # -inf - -inf = NaN (both diverged); finite - -inf = +inf
    return gain


def _prepare(
    name: str,
    base_name: str,
    var: Arm,
    base: Arm,
    spec: VerdictSpec,
    metric: str,
    lower: bool,
    paired: bool | None,
) -> _Prepared:
    margin, margin_se, margin_rule = equivalence_margin(spec, base.values[~base.diverged])
    shared, bi, vi = np.intersect1d(base.seeds, var.seeds, return_indices=True)
    smaller = min(base.seeds.size, var.seeds.size)
    is_paired = paired is not False and shared.size >= max(2, smaller / 2)
    if is_paired:
        base = Arm(base.seeds[bi], base.values[bi], base.diverged[bi])
        var = Arm(var.seeds[vi], var.values[vi], var.diverged[vi])
        gain = _paired_gain(base, var, lower)
        ev = paired_evidence(gain[None, :], margin, margin_se)
        outcomes = Outcomes(paired=True, gain=gain)
    else:
        sv, sb = var.scores(lower), base.scores(lower)
        ev = unpaired_evidence(sv[None, :], sb[None, :], margin, margin_se)
        outcomes = Outcomes(paired=False, variant=sv, baseline=sb)
    finite_b = base.values[~base.diverged]
    base_median = float(np.median(finite_b)) if finite_b.size else float("nan")
    row: dict[str, Any] = {
        "variant": name,
        "baseline": base_name,
        "metric": metric,
        "n": ev.n,
        "n_baseline": ev.n_baseline,
        "margin": margin,
        "margin_se": margin_se,
        "margin_rule": margin_rule,
        "lower_is_better": lower,
        "confidence": spec.confidence,
        "paired": is_paired,
        "test": PAIRED_TEST if is_paired else UNPAIRED_TEST,
        "diverged": int(ev.div_variant[0]),
        "baseline_diverged": int(ev.div_baseline[0]),
        "p_value": float(ev.p_rank[0]),
        "p_tost": float(ev.p_tost[0]),
        "p_diverged": float(ev.p_div[0]),
    }
    rng = np.random.default_rng([spec.random_seed, zlib.crc32(f"{name}|{base_name}".encode())])
    row.update(_effects(base, var, is_paired, lower, base_median, spec, rng))
    return _Prepared(row, ev, outcomes)


def _effects(
    base: Arm,
    var: Arm,
    paired: bool,
    lower: bool,
    base_median: float,
    spec: VerdictSpec,
    rng: np.random.Generator,
) -> dict[str, Any]:
    """Effect estimates with bootstrap intervals: mean / median difference over converged
    seeds (metric units), P(better) and Cliff's delta with divergence as the worst outcome."""
    kw: dict[str, Any] = {"confidence": spec.confidence, "n_resamples": spec.n_resamples}
    ranked = rank_ready(np.concatenate([base.scores(lower), var.scores(lower)]))[0]
    rb, rv = ranked[: base.values.size], ranked[base.values.size :]  # diverged: below all
    out: dict[str, Any] = {"cliffs_delta": cliffs_delta(rb, rv, lower=False)}
    if paired:
        both = ~base.diverged & ~var.diverged
        diff = var.values[both] - base.values[both]
        out["n_finite"] = int(both.sum())
        gain = rv - rb
        out["prob_better"] = prob_better(gain, lower=False)
        if gain.size >= 2:
            out["prob_better_ci_low"], out["prob_better_ci_high"] = prob_better_ci(gain, rng, **kw)
        if diff.size >= 2:
            out["ci_low"], out["ci_high"] = bootstrap_ci(diff, np.mean, rng, **kw)
            out["median_ci_low"], out["median_ci_high"] = bootstrap_ci(diff, np.median, rng, **kw)
        if diff.size:
            out["diff_mean"], out["diff_median"] = float(diff.mean()), float(np.median(diff))
    else:
        fv, fb = var.values[~var.diverged], base.values[~base.diverged]
        out["n_finite"] = int(min(fv.size, fb.size))
        out["prob_better"] = (1.0 + out["cliffs_delta"]) / 2.0
        if fv.size and fb.size:
            out["diff_mean"] = float(fv.mean() - fb.mean())
            out["diff_median"] = float(np.median(fv) - np.median(fb))
        if fv.size >= 2 and fb.size >= 2:
            out["ci_low"], out["ci_high"] = bootstrap_ci_two_sample(fv, fb, np.mean, rng, **kw)
            out["median_ci_low"], out["median_ci_high"] = bootstrap_ci_two_sample(
                fv, fb, np.median, rng, **kw
            )
    if out.get("diff_mean") is not None and base_median:
        out["rel_diff"] = out["diff_mean"] / base_median
    return out


def _reason(row: dict[str, Any], code: int, direction: float, alpha: float) -> str:
    """The verdict's reason in words, with the numbers behind it (``direction``: the rank
    statistic's side, +1 variant better)."""
    side = "better" if direction > 0 else "worse"
    n, nb = row["n"], row["n_baseline"]
    dv, db = row["diverged"], row["baseline_diverged"]
    div = f"diverged on {dv} of {n} seeds vs {db} of {nb} for the baseline"
    if dv == n and db < nb:
        div = f"diverged on every seed ({dv} of {n}) vs {db} of {nb} for the baseline"
    test = "exact McNemar" if row["paired"] else "Fisher exact"
    div_p = f"{test} p (Holm) {row['p_diverged_adjusted']:.2g}"
    ranks = "signed ranks" if row["paired"] else "ranks"
    rank_p = f"p (Holm) {row['p_adjusted']:.2g}"
    if row["paired"]:
        few = f"{n} < {row['n_min']}, the fewest pairs"
    else:
        few = f"{n} and {nb} per arm, fewer than"
    words = {
        R_TOO_FEW: f"too few seeds: {few} at which the test can reach alpha {alpha:g} after Holm",
        R_EQUIVALENT: f"the mean difference is inside ±{row['margin']:.3g} "
        f"(TOST p {row['p_tost']:.2g})",
        R_MORE_STABLE: f"more stable: {div} ({div_p})",
        R_LESS_STABLE: f"less stable: {div} ({div_p})",
        R_TRADE_OFF: f"a trade-off: {div} ({div_p}), but the {ranks} point the other way "
        f"({rank_p})",
        R_RANK: f"the {ranks} say {side} ({rank_p}), and the mean agrees",
        R_RANK_MEAN_DISAGREE: f"the {ranks} say {side} ({rank_p}) but the mean says the "
        "opposite: the typical seed and the average disagree",
        R_DIVERGES_MORE: f"better on {ranks} ({rank_p}) but {div} ({test} p "
        f"{row['p_diverged']:.2g}): not called helps",
        R_DIVERGES_LESS: f"worse on {ranks} ({rank_p}) but {div} ({test} p "
        f"{row['p_diverged']:.2g}): not called hurts",
        R_NOT_SIGNIFICANT: f"no significant difference ({rank_p}) and not shown to be inside "
        f"±{row['margin']:.3g} (TOST p {row['p_tost']:.2g})",
    }
    text = words[code]
    if code in (R_RANK, R_NOT_SIGNIFICANT, R_EQUIVALENT) and (dv or db):
        text += f"; {div}"
    return text


def compare_arms(
    arms: Mapping[str, Arm],
    pairs: list[tuple[str, str]],
    spec: VerdictSpec,
    metric: str,
    *,
    paired: bool | None = None,
    plan_seeds: bool = True,
) -> list[Comparison]:
    """Each ``(variant, baseline)`` in ``pairs`` judged by the rule, with Holm's correction
    across all of them (rank tests, plus the divergence tests that could reject at all).

    ``paired``: None or True pair the arms by seed id when they share at least 2 seeds and at
    least half of the smaller arm's (else they are compared unpaired); False never pairs.
    ``plan_seeds=False`` skips the seed planning simulation (``seeds_needed`` None,
    ``seeds_needed_method`` "not planned").
    """
    lower = lower_is_better(metric, spec.higher_is_better)
    empty = [name for pair in pairs for name in pair if arms[name].values.size == 0]
    if empty:
        msg = f"arms without seeds cannot be compared: {sorted(set(empty))}"
        raise ValueError(msg)
    prepared = [_prepare(v, b, arms[v], arms[b], spec, metric, lower, paired) for v, b in pairs]
    if not prepared:
        return []
    evidence = [p.evidence for p in prepared]
    family = family_size(evidence, spec.alpha)
    labels = [("rank", i) for i in range(len(prepared))]
    labels += [("div", i) for i, ev in enumerate(evidence) if ev.div_testable(spec.alpha)[0]]
    raw = [
        float(evidence[i].p_rank[0]) if kind == "rank" else float(evidence[i].p_div[0])
        for kind, i in labels
    ]
    adjusted = dict(zip(labels, holm(raw), strict=True))
    out = []
    for i, p in enumerate(prepared):
        ev, row = p.evidence, p.row
        p_rank_adj = adjusted[("rank", i)]
        p_div_adj = adjusted.get(("div", i), 1.0)
        codes, reasons = decide(
            ev, np.array([p_rank_adj]), np.array([p_div_adj]), spec.alpha, family
        )
        row.update(
            p_adjusted=p_rank_adj,
            p_diverged_adjusted=p_div_adj,
            verdict=VERDICTS[int(codes[0])],
            n_min=min_seeds(spec.alpha, family, paired=row["paired"]),
        )
        if p_div_adj < spec.alpha:  # as the rule's stability branch sees it
            row["stability"] = "more stable" if ev.div_rate_diff[0] < 0 else "less stable"
        row["reason"] = _reason(row, int(reasons[0]), float(ev.direction[0]), spec.alpha)
        seeds = _plan(p, spec, family, lower) if plan_seeds else SeedPlan(None, "not planned")
        row.update(
            seeds_needed=seeds.n,
            seeds_needed_method=seeds.method,
            seeds_needed_reason=seeds.reason,
        )
        out.append(_comparison(row))
    return out


def _plan(p: _Prepared, spec: VerdictSpec, family: int, lower: bool) -> SeedPlan:
    """Seeds needed for this comparison (``ablab.stats.planning``); with ``[verdicts] effect`` the
    converged outcomes are shifted so that their mean difference is the stated effect."""
    obs = p.outcomes
    if spec.effect is not None:
        target = -spec.effect if lower else spec.effect  # metric units -> improvement
        if obs.paired and obs.gain is not None:
            g = obs.gain.copy()
            fin = np.isfinite(g)
            if fin.any():
                g[fin] = g[fin] - g[fin].mean() + target
            obs = Outcomes(paired=True, gain=g)
        elif obs.variant is not None and obs.baseline is not None:
            v, fv, fb = obs.variant.copy(), np.isfinite(obs.variant), np.isfinite(obs.baseline)
            if fv.any() and fb.any():
                v[fv] += target - (v[fv].mean() - obs.baseline[fb].mean())
            obs = Outcomes(paired=False, variant=v, baseline=obs.baseline)
    name = f"{p.row['variant']}|{p.row['baseline']}|plan"
    rng = np.random.default_rng([spec.random_seed, zlib.crc32(name.encode())])
    return plan(
        obs,
        margin=p.row["margin"],
        margin_se=p.row["margin_se"],
        alpha=spec.alpha,
        family=family,
        power=spec.power,
        rng=rng,
    )


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
    (``ablab.stats.intervals.curve_ci``).
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


def resolve_metric(
    spec: VerdictSpec,
    histories: dict[str, VariantHistory],
    study: Mapping[str, Any] | None = None,
) -> str:
    """The metric compared: the study's choice, else val_loss (loss without validation) --
    or the penalty-free / a shared metric where val_loss would mislead
    (``ablab.stats.metric_choice.choose_metric``; ``study``: the resolved study)."""
    return choose_metric(spec, histories, study).metric


def history_arm(history: VariantHistory, metric: str) -> Arm:
    """An arm from a run's history: final-epoch values; diverged = non-finite there, or any
    non-finite History value at an earlier epoch (the run's divergence rule)."""
    return Arm.of(history.seeds, history.values[metric][:, -1], history.diverged_epoch > 0)


def compare(
    histories: dict[str, VariantHistory],
    baseline: str,
    spec: VerdictSpec,
    *,
    plan_seeds: bool = True,
    study: Mapping[str, Any] | None = None,
) -> list[Comparison]:
    """Every non-baseline variant vs ``baseline`` -- or, when ``spec.pairs`` is set, each
    ``[variant, its baseline]`` pair -- on the verdict metric's final-epoch values, paired by
    seed id (:func:`compare_arms`). The metric is ``spec.metric``, else chosen by
    ``ablab.stats.metric_choice.choose_metric`` (``study``: the resolved study, for the
    variants' loss functions); its note and warning go into every comparison."""
    choice = choose_metric(spec, histories, study)
    metric = choice.metric
    if spec.pairs:
        pairs = [(v, b) for v, b in spec.pairs if v in histories and b in histories]
    else:
        pairs = default_pairs(histories, baseline)
    arms = {name: history_arm(h, metric) for name, h in histories.items()}
    out = compare_arms(arms, pairs, spec, metric, plan_seeds=plan_seeds)
    for c in out:
        c.metric_note, c.metric_warning = choice.note, choice.warning
    return out
