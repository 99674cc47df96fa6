"""Figures of a run, drawn with matplotlib from results computed elsewhere
(``ablab.output.report``).

Every function here only draws: it takes bands, quantiles and comparison rows that were
computed from the stored run and returns a :class:`matplotlib.figure.Figure` (made without
pyplot, so no global state and no display is touched). :func:`to_svg` turns one into a
self-contained inline SVG (text as paths: no font is fetched when the page opens).
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

VERDICT_COLORS = {
    "helps": "#2a9d4b",
    "hurts": "#d1352b",
    "equivalent": "#2b7bba",
    "inconclusive": "#d99a00",
}
_PALETTE = matplotlib.colormaps["tab10"].colors  # type: ignore[attr-defined]
CURVE_COLUMNS = 3
"""Most history panels side by side (more metrics: more rows)."""


@dataclass(frozen=True)
class Band:
    """A median line with a 5–95 % band over seeds, along ``x`` (epochs or steps)."""

    x: np.ndarray
    median: np.ndarray
    low: np.ndarray
    high: np.ndarray


def variant_colors(variants: Sequence[str]) -> dict[str, Any]:
    """One fixed colour per variant, in study order, used by every figure of a report."""
    return {v: _PALETTE[i % len(_PALETTE)] for i, v in enumerate(variants)}


def _figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained", dpi=100)


def _legend(ax: Any, **kwargs: Any) -> None:
    """A legend only when something on ``ax`` has a label (an empty panel stays quiet)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kwargs)


def _integer_x(ax: Any) -> None:
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


Diverged = Mapping[str, tuple[int, int]]
"""{variant: (seeds that diverged, seeds)} for the variants with a diverged seed: the data
drawn leaves those seeds out (their values before or after the blow-up would set the axes),
and the legend counts them."""


def _label(variant: str, diverged: Diverged | None) -> str:
    """The variant's legend label, with its count of diverged (left out) seeds."""
    d, n = (diverged or {}).get(variant, (0, 0))
    if not d:
        return variant
    if d == n:
        return f"{variant} (all {n} seeds diverged)"
    return f"{variant} ({d} of {n} seeds diverged, left out)"


def _legend_the_rest(
    ax: Any, drawn: Iterable[str], diverged: Diverged | None, colors: Mapping[str, Any]
) -> None:
    """A legend entry (nothing drawn) for each variant with diverged seeds that has no data on
    ``ax`` -- so a variant whose every seed diverged is named, not silently missing."""
    shown = set(drawn)
    for variant in diverged or {}:
        if variant not in shown:
            color = colors.get(variant, "grey")
            ax.plot([], [], color=color, ls=":", lw=1.6, label=_label(variant, diverged))


def _draw_band(ax: Any, band: Band, color: Any, label: str) -> None:
    ax.fill_between(band.x, band.low, band.high, color=color, alpha=0.18, linewidth=0)
    ax.plot(band.x, band.median, color=color, linewidth=1.6, label=label)


def draw_curves(
    ax: Any,
    bands: dict[str, Band],
    colors: dict[str, Any],
    name: str,
    optimum: dict[str, float] | None,
    diverged: Diverged | None = None,
) -> None:
    """Per-epoch median and 5–95 % band of ``name`` for each variant on ``ax``; the analytic
    optimum of each variant that has one (one black line when they all share it); diverged
    seeds counted in the legend (see :data:`Diverged`)."""
    for variant, band in bands.items():
        _draw_band(ax, band, colors[variant], _label(variant, diverged))
    _legend_the_rest(ax, bands, diverged, colors)
    optimum = {v: o for v, o in (optimum or {}).items() if v in bands}
    if len(set(optimum.values())) == 1:
        ax.axhline(next(iter(optimum.values())), color="black", ls="--", lw=1, label="optimum")
    else:
        for variant, value in optimum.items():
            ax.axhline(value, color=colors[variant], ls="--", lw=1, label=f"{variant} optimum")
    ax.set_xlabel("epoch")
    _integer_x(ax)
    ax.set_ylabel(name)
    ax.set_title(f"{name} per epoch (median, 5–95 % of seeds)", fontsize=10)
    ax.grid(alpha=0.3)
    _legend(ax, fontsize=8)


def curves_figure(
    curves: dict[str, dict[str, Band]],
    colors: dict[str, Any],
    optimum: dict[str, dict[str, float]] | None = None,
    diverged: Diverged | None = None,
) -> Figure:
    """One panel per history name (e.g. val_loss, loss, accuracy), CURVE_COLUMNS to a row:
    per-epoch median and 5–95 % band of each variant; ``optimum[name][variant]`` (its analytic
    optimum) as a dashed line."""
    names = list(curves)
    cols = min(len(names), CURVE_COLUMNS)
    rows = -(-len(names) // cols)
    fig = _figure(5.2 * cols, 3.6 * rows)
    axes = list(fig.subplots(rows, cols, squeeze=False).ravel())
    for ax in axes[len(names) :]:
        fig.delaxes(ax)  # the last row's empty places
    for ax, name in zip(axes, names, strict=False):
        draw_curves(ax, curves[name], colors, name, (optimum or {}).get(name), diverged)
    return fig


def paired_figure(
    paired: dict[str, dict[str, np.ndarray]], colors: dict[str, Any], metric: str, level: str
) -> Figure:
    """Per-epoch paired difference (variant − its baseline) with its bootstrap band."""
    fig = _figure(6.4, 3.6)
    ax = fig.subplots()
    for label, c in paired.items():
        color = colors.get(label.split(" vs ")[0], "grey")
        ax.fill_between(c["epoch"], c["ci_low"], c["ci_high"], color=color, alpha=0.18, lw=0)
        ax.plot(c["epoch"], c["diff_mean"], color=color, linewidth=1.6, label=label)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xlabel("epoch")
    _integer_x(ax)
    ax.set_ylabel(f"Δ {metric} (variant − baseline)")
    ax.set_title(f"paired difference per epoch (mean, {level} bootstrap CI)", fontsize=10)
    ax.grid(alpha=0.3)
    _legend(ax, fontsize=8)
    return fig


def draw_ecdf(
    ax: Any,
    finals: dict[str, tuple[np.ndarray, np.ndarray]],
    colors: dict[str, Any],
    metric: str,
    diverged: Diverged | None = None,
) -> None:
    """ECDF of the final metric over seeds; ``finals[v] = (F, x)``: F(x_k) at sorted x_k;
    diverged seeds counted in the legend (see :data:`Diverged`)."""
    for variant, (levels, values) in finals.items():
        label = _label(variant, diverged)
        ax.step(values, levels, where="post", color=colors[variant], linewidth=1.6, label=label)
    _legend_the_rest(ax, finals, diverged, colors)
    ax.set_xlabel(f"final {metric}")
    ax.set_ylabel("fraction of seeds ≤ x")
    ax.set_ylim(0, 1)
    ax.set_title(f"final {metric} over seeds (ECDF)", fontsize=10)
    ax.grid(alpha=0.3)
    _legend(ax, fontsize=8)


def ecdf_figure(
    finals: dict[str, tuple[np.ndarray, np.ndarray]],
    colors: dict[str, Any],
    metric: str,
    diverged: Diverged | None = None,
) -> Figure:
    fig = _figure(6.4, 3.6)
    draw_ecdf(fig.subplots(), finals, colors, metric, diverged)
    return fig


def _no_estimate(c: dict[str, Any]) -> tuple[str, str]:
    """(tick label, note in the row) of a comparison without an estimate: every seed of the
    variant or of its baseline diverged, or too few seeds converged in both arms."""
    n = c.get("n") or 0
    n_base = c.get("n_baseline") or n
    if n and c.get("diverged") == n:
        return "all seeds diverged", f"all {n} seeds diverged: no estimate"
    if n_base and c.get("baseline_diverged") == n_base:
        return (
            "baseline diverged on every seed",
            f"the baseline diverged on all {n_base} seeds: no estimate",
        )
    return "no estimate", f"too few converged seeds ({c.get('n_finite') or 0} of {n})"


def draw_forest(ax: Any, comparisons: list[dict[str, Any]]) -> None:
    """Mean paired difference with its CI per comparison, coloured by verdict; the
    equivalence margin as a shaded band around zero. A comparison without an estimate (every
    seed diverged, say) is a labelled row with a note, not left out; the x axis follows the
    estimates only."""
    rows = comparisons
    margins = [c["margin"] for c in rows if c.get("margin") is not None]
    margins = [m for m in margins if math.isfinite(m)]
    if margins:
        m = max(margins)
        ax.axvspan(-m, m, color="#2b7bba", alpha=0.08, label=f"margin ±{m:.3g}")
    ax.axvline(0.0, color="black", linewidth=0.8)
    labels = []
    for i, c in enumerate(rows):
        color = VERDICT_COLORS.get(c["verdict"], "grey")
        y = len(rows) - 1 - i
        if c.get("diff_mean") is None:
            label, note = _no_estimate(c)
            labels.append(f"{c['variant']} vs {c['baseline']} — {label}")
            where = ax.get_yaxis_transform()  # x in axes fractions: no effect on the x axis
            ax.text(0.02, y, note, transform=where, va="center", fontsize=8, color="#555555")
            continue
        labels.append(f"{c['variant']} vs {c['baseline']} — {c['verdict']}")
        if c.get("ci_low") is not None and c.get("ci_high") is not None:
            ax.plot([c["ci_low"], c["ci_high"]], [y, y], color=color, linewidth=2.5)
        ax.plot([c["diff_mean"]], [y], "o", color=color, markersize=6)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(list(reversed(labels)), fontsize=8)
    if not margins and all(c.get("diff_mean") is None for c in rows):
        ax.set_xlim(-1.0, 1.0)  # nothing to scale to: zero in the middle
    if rows:
        ax.set_ylim(-0.7, len(rows) - 0.3)
        level = f"{100 * rows[0].get('confidence', 0.95):g}%"
        ax.set_xlabel(f"Δ final {rows[0]['metric']} (variant − baseline), mean [{level} CI]")
    ax.set_title("paired differences (forest plot)", fontsize=10)
    ax.grid(alpha=0.3, axis="x")
    if margins:
        _legend(ax, fontsize=8, loc="lower right")


def forest_figure(comparisons: list[dict[str, Any]]) -> Figure:
    fig = _figure(6.4, 0.9 + 0.45 * max(len(comparisons), 1))
    draw_forest(fig.subplots(), comparisons)
    return fig


def _axis_positions(values: list[Any]) -> tuple[list[float], bool, list[str] | None]:
    """x positions for an axis' values: the numbers themselves (log scale when positive and
    spanning >= 8x, as batch sizes and learning rates do), else category indices."""
    numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
    if numeric:
        xs = [float(v) for v in values]
        positive = [x for x in xs if x > 0]
        # log when the values span >= 8x (a 0 among them, e.g. weight_decay: symlog)
        log = len(positive) >= 2 and max(positive) / min(positive) >= 8 and min(xs) >= 0
        return xs, log, None
    return [float(i) for i in range(len(values))], False, [str(v) for v in values]


def sweep_figure(sweep: dict[str, Any]) -> Figure:
    """The paired effect (mean, CI) of each variant vs the baseline along each sweep axis:
    one panel per axis; one line per variant (and per value of the other axes); markers
    coloured by verdict, zero = no effect."""
    axes = list(sweep["axes"])
    fig = _figure(6.4, 3.2 * len(axes) + 0.4)
    panels = fig.subplots(len(axes), 1, squeeze=False)[:, 0]
    rows = [r for r in sweep["rows"] if r["diff_mean"] is not None]
    for ax, axis in zip(panels, axes, strict=True):
        values = list(sweep["axes"][axis])
        xs, log, labels = _axis_positions(values)
        others = [a for a in axes if a != axis]
        groups: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            rest = ", ".join(f"{a}={r['point'][a]}" for a in others)
            label = r["label"] + (f" ({rest})" if rest else "")
            groups.setdefault(label, []).append(r)
        colors = variant_colors(list(groups))
        ax.axhline(0.0, color="black", linewidth=0.8)
        for label, mine in groups.items():
            mine = sorted(mine, key=lambda r: values.index(r["point"][axis]))
            x = [xs[values.index(r["point"][axis])] for r in mine]
            y = [r["diff_mean"] for r in mine]
            lo = [r["diff_mean"] - r["ci_low"] for r in mine]
            hi = [r["ci_high"] - r["diff_mean"] for r in mine]
            ax.errorbar(x, y, yerr=[lo, hi], color=colors[label], capsize=3, label=label)
            for xi, yi, r in zip(x, y, mine, strict=True):
                ax.plot([xi], [yi], "o", color=VERDICT_COLORS.get(r["verdict"], "grey"), zorder=3)
        if log and min(xs) > 0:
            ax.set_xscale("log", base=2 if all(float(v).is_integer() for v in xs) else 10)
        elif log:  # a 0 among positive values: linear around 0, log beyond the smallest
            ax.set_xscale("symlog", linthresh=min(x for x in xs if x > 0))
        ax.set_xticks(xs)
        ax.set_xticklabels(labels if labels is not None else [f"{v:g}" for v in xs])
        ax.minorticks_off()
        ax.set_xlabel(axis)
        ax.set_ylabel(f"Δ final {sweep['metric']}")
        ax.grid(alpha=0.3)
        _legend(ax, fontsize=7)
    panels[0].set_title("effect along the sweep (mean paired difference, CI)", fontsize=10)
    return fig


def bands_overlap(bands: Mapping[str, Band]) -> bool:
    """Do two variants' 5–95 % bands overlap at more than half of their common x (so that, on
    one panel, they read as one band)?"""
    items = [b for b in bands.values() if b.x.size]
    for i, a in enumerate(items):
        for b in items[i + 1 :]:
            _, ia, ib = np.intersect1d(a.x, b.x, return_indices=True)
            if ia.size == 0:
                continue
            inside = np.maximum(a.low[ia], b.low[ib]) <= np.minimum(a.high[ia], b.high[ib])
            if inside.mean() > 0.5:
                return True
    return False


_WEIGHT_PANELS = (("sum", "weight sum"), ("drift", "weight sum − its value after step 1"))


def _weights_panel(ax: Any, layer: str, title: str) -> None:
    ax.set_title(f"{layer}: {title}", fontsize=9)
    ax.set_xlabel("optimizer step")
    _integer_x(ax)
    ax.grid(alpha=0.3)


def weights_figure(
    weights: dict[str, dict[str, dict[str, Band]]],
    colors: dict[str, Any],
    diverged: Diverged | None = None,
) -> Figure:
    """Per layer, the sum of its kernel (or first weight) per optimizer step and its change
    since the first step; median and 5–95 % band over seeds per variant. One row per layer
    with both on a panel each -- or, when the variants' weight-sum bands overlap
    (:func:`bands_overlap`), small multiples: a row per quantity with one panel per variant,
    sharing the y axis. Diverged seeds are counted in the legend or title (see
    :data:`Diverged`); a variant whose every seed diverged still has its panel, saying so."""
    rows: list[tuple[str, str | None]] = []  # (layer, quantity of a small-multiples row)
    for layer, kinds in weights.items():
        if bands_overlap(kinds.get("sum", {})):
            rows += [(layer, which) for which, _ in _WEIGHT_PANELS]
        else:
            rows.append((layer, None))
    fig = _figure(11.0, 2.9 * len(rows))
    grid = fig.add_gridspec(len(rows), 1)
    for r, (layer, which) in enumerate(rows):
        if which is None:
            pair = grid[r].subgridspec(1, 2).subplots(squeeze=False)[0]
            for ax, (kind, title) in zip(pair, _WEIGHT_PANELS, strict=True):
                bands = weights[layer].get(kind, {})
                for variant, band in bands.items():
                    _draw_band(ax, band, colors[variant], _label(variant, diverged))
                _legend_the_rest(ax, bands, diverged, colors)
                _weights_panel(ax, layer, title)
                _legend(ax, fontsize=7)
            continue
        bands = weights[layer].get(which, {})
        every = [*bands, *(v for v in diverged or {} if v not in bands)]
        axes = grid[r].subgridspec(1, len(every)).subplots(sharey=True, squeeze=False)[0]
        title = dict(_WEIGHT_PANELS)[which]
        for ax, variant in zip(axes, every, strict=True):
            if variant in bands:
                _draw_band(ax, bands[variant], colors.get(variant, "grey"), variant)
            else:
                ax.text(0.5, 0.5, "no seed left", transform=ax.transAxes, ha="center",
                        fontsize=8, color="#555555")  # fmt: skip
            _weights_panel(ax, layer, f"{title}\n{_label(variant, diverged)}")
    return fig


def bn_figure(bn: dict[str, dict[str, Any]], colors: dict[str, Any]) -> Figure:
    """BatchNormalization moving statistics: progress of the moving mean / variance towards
    the training set's statistics per epoch against the expected ``1 − momentum^updates``, and
    validation loss with batch statistics (train mode) vs moving statistics (inference).

    ``bn[variant] = {"layers": {layer: {"mean": Band, "var": Band, "expected": (x, y)}},
    "val_train_mode": Band | None, "val_inference": Band | None}``.
    """
    fig = _figure(12.0, 3.6)
    ax_mean, ax_var, ax_val = fig.subplots(1, 3)
    expected_drawn: set[tuple[float, ...]] = set()
    for variant, d in bn.items():
        color = colors[variant]
        for i, (layer, stats) in enumerate(d["layers"].items()):
            style = ["-", "--", ":", "-."][i % 4]
            for ax, key in ((ax_mean, "mean"), (ax_var, "var")):
                band = stats[key]
                ax.fill_between(band.x, band.low, band.high, color=color, alpha=0.15, lw=0)
                ax.plot(band.x, band.median, style, color=color, lw=1.6, label=f"{variant} {layer}")
            x, y = stats["expected"]
            if tuple(y) not in expected_drawn:  # one line per momentum / schedule
                expected_drawn.add(tuple(y))
                for ax in (ax_mean, ax_var):
                    ax.plot(x, y, color=color, lw=1, ls=(0, (2, 2)), label=f"{variant}: 1 − m^u")
        if d.get("val_train_mode") is not None:
            _draw_band(ax_val, d["val_train_mode"], color, f"{variant}: batch stats")
        if d.get("val_inference") is not None:
            b = d["val_inference"]
            ax_val.plot(b.x, b.median, ":", color=color, lw=1.6, label=f"{variant}: moving stats")
    for ax, what in ((ax_mean, "moving mean"), (ax_var, "moving variance")):
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("epoch")
        _integer_x(ax)
        ax.set_ylabel("progress to training-set statistic")
        ax.set_title(f"{what} progress (median, 5–95 %)", fontsize=10)
        ax.grid(alpha=0.3)
        _legend(ax, fontsize=7)
    ax_val.set_xlabel("epoch")
    _integer_x(ax_val)
    ax_val.set_ylabel("val_loss")
    ax_val.set_title("validation loss: batch vs moving statistics", fontsize=10)
    ax_val.grid(alpha=0.3)
    _legend(ax_val, fontsize=7)
    return fig


def checks_figure(checks: list[dict[str, Any]]) -> Figure:
    """Largest relative deviation of each check against its tolerance (log scale); a
    deviation of exactly 0 (bit-identical) is drawn at the floor and labelled."""
    rows = [c for c in checks if c.get("passed") is not None]
    fig = _figure(6.4, 0.9 + 0.42 * max(len(rows), 1))
    ax = fig.subplots()
    floor = 1e-12
    for i, c in enumerate(rows):
        y = len(rows) - 1 - i
        dev = c.get("max_rel_dev")
        color = "#2a9d4b" if c["passed"] else "#d1352b"
        finite = dev is not None and math.isfinite(dev)
        if not finite:  # NaN in one arm only, or no deviation recorded: off the scale
            shown, label = 1.0, "non-finite"
        else:
            assert dev is not None
            shown = floor if dev == 0 else max(float(dev), floor)
            label = "0 (bit-identical)" if dev == 0 else f"{dev:.1e}"
        ax.barh(y, shown, left=floor / 10, color=color, height=0.6)
        ax.plot([c["tolerance"]], [y], "|", color="black", markersize=14, mew=2)
        ax.annotate(label, (shown, y), xytext=(4, 0), textcoords="offset points", fontsize=7,
                    va="center")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlim(floor / 10, 10)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([c["name"] for c in reversed(rows)], fontsize=8)
    ax.set_xlabel("max relative deviation (| = tolerance)")
    ax.set_title("checks: deviation vs tolerance", fontsize=10)
    ax.grid(alpha=0.3, axis="x")
    return fig


def optimum_figure(gaps: dict[str, dict[str, Any]], colors: dict[str, Any]) -> Figure:
    """Gap of each variant's final train / val MSE to the analytic optimum: median with the
    5–95 % range over seeds; ``gaps[v] = {"train_gap": {...}, "val_gap": {...} | None}``."""
    variants = list(gaps)
    fig = _figure(6.4, 0.9 + 0.5 * max(len(variants), 1))
    ax = fig.subplots()
    for i, v in enumerate(variants):
        y = len(variants) - 1 - i
        for key, dy, marker in (("train_gap", 0.15, "s"), ("val_gap", -0.15, "o")):
            g = gaps[v].get(key)
            if not g or g.get("median") is None:
                continue
            ax.plot([g["q05"], g["q95"]], [y + dy, y + dy], color=colors[v], lw=2)
            ax.plot([g["median"]], [y + dy], marker, color=colors[v], markersize=6)
    ax.plot([], [], "s", color="grey", label="train MSE gap")
    ax.plot([], [], "o", color="grey", label="val MSE gap")
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(variants)))
    ax.set_yticklabels(list(reversed(variants)), fontsize=8)
    ax.set_xlabel("final MSE − analytic optimum's MSE (median, 5–95 % of seeds)")
    ax.set_title("gap to the analytic optimum", fontsize=10)
    ax.grid(alpha=0.3, axis="x")
    _legend(ax, fontsize=8)
    return fig


def to_svg(fig: Figure, salt: str) -> str:
    """``fig`` as an inline ``<svg>`` element (no XML prolog), deterministic for a given salt."""
    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "path", "svg.hashsalt": salt}):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    text = buf.getvalue()
    return text[text.index("<svg") :]
