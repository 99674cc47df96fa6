"""Figures only draw what they are given: checked on hand-made bands and rows."""

from __future__ import annotations

import re

import numpy as np
from matplotlib.colors import to_rgba

from ablab.output import figures as figs
from ablab.output.figures import Band


def _band(n: int, offset: float = 0.0) -> Band:
    x = np.arange(1, n + 1, dtype=float)
    return Band(x, 1.0 / x + offset, 1.0 / x + offset - 0.1, 1.0 / x + offset + 0.1)


COLORS = figs.variant_colors(["plain", "bn"])


def test_variant_colors_are_stable_and_distinct() -> None:
    assert figs.variant_colors(["plain", "bn", "x"])["bn"] == COLORS["bn"]
    assert COLORS["plain"] != COLORS["bn"]


def test_curves_draw_the_given_median_and_optimum() -> None:
    bands = {"plain": _band(5), "bn": _band(5, 0.2)}
    opt = {"val_loss": {"plain": 0.3, "bn": 0.3}, "loss": {"plain": 0.2, "bn": 0.1}}
    fig = figs.curves_figure({"val_loss": bands, "loss": bands}, COLORS, opt)
    ax_val, ax_loss = fig.axes
    lines = {line.get_label(): line for line in ax_val.get_lines()}
    np.testing.assert_array_equal(lines["bn"].get_ydata(), bands["bn"].median)
    np.testing.assert_array_equal(lines["optimum"].get_ydata(), [0.3, 0.3])
    assert to_rgba(lines["plain"].get_color()) == to_rgba(COLORS["plain"])
    # different optima per variant: one line each, in the variant's colour
    per_variant = {line.get_label(): line for line in ax_loss.get_lines()}
    assert per_variant["bn optimum"].get_ydata()[0] == 0.1
    assert to_rgba(per_variant["bn optimum"].get_color()) == to_rgba(COLORS["bn"])
    assert len(ax_val.collections) == 2  # one 5-95 % band per variant


def test_ecdf_steps_through_the_given_quantiles() -> None:
    levels = np.linspace(0, 1, 11)
    values = np.linspace(0.5, 1.5, 11)
    fig = figs.ecdf_figure({"plain": (levels, values)}, COLORS, "val_loss")
    (line,) = fig.axes[0].get_lines()
    np.testing.assert_array_equal(line.get_xdata(), values)
    np.testing.assert_array_equal(line.get_ydata(), levels)


def _row(variant: str, verdict: str, mean: float) -> dict:
    return {
        "variant": variant,
        "baseline": "plain",
        "metric": "val_loss",
        "diff_mean": mean,
        "ci_low": mean - 0.01,
        "ci_high": mean + 0.01,
        "margin": 0.02,
        "verdict": verdict,
        "confidence": 0.95,
    }


def test_forest_colours_by_verdict_and_labels_every_row() -> None:
    rows = [
        _row("bn", "helps", -0.05),
        _row("x", "hurts", 0.04),
        {**_row("y", "inconclusive", 0), "diff_mean": None, "n": 4, "n_finite": 1},
    ]
    ax = figs.forest_figure(rows).axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    # top row first; a comparison without an estimate is a labelled row, not left out
    assert labels == [
        "y vs plain — no estimate",
        "x vs plain — hurts",
        "bn vs plain — helps",
    ]
    assert [t.get_text() for t in ax.texts] == ["too few converged seeds (1 of 4)"]
    points = [line for line in ax.get_lines() if line.get_marker() == "o"]
    assert to_rgba(points[0].get_color()) == to_rgba(figs.VERDICT_COLORS["helps"])
    assert points[0].get_xdata()[0] == -0.05


def test_forest_shows_a_fully_diverged_variant_as_a_labelled_row() -> None:
    diverged = {**_row("huge", "hurts", 0), "diff_mean": None, "ci_low": None, "ci_high": None}
    diverged.update(n=4, n_finite=0, diverged=4, baseline_diverged=0)
    ax = figs.forest_figure([_row("bn", "helps", -0.05), diverged]).axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == ["huge vs plain — all seeds diverged", "bn vs plain — helps"]
    assert [t.get_text() for t in ax.texts] == ["all 4 seeds diverged: no estimate"]
    assert ax.get_ylim() == (-0.7, 1.7)  # room for both rows
    low, high = ax.get_xlim()
    assert low > -0.1 and high < 0.1  # the x axis follows the estimates only
    # the baseline diverged on every seed
    both = {**diverged, "diverged": 0, "baseline_diverged": 4}
    ax = figs.forest_figure([both]).axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == [
        "huge vs plain — baseline diverged on every seed"
    ]


def test_curves_and_ecdf_count_diverged_seeds_in_the_legend() -> None:
    empty = Band(np.zeros(0), np.zeros(0), np.zeros(0), np.zeros(0))
    diverged = {"bn": (3, 4), "x": (4, 4)}
    colors = figs.variant_colors(["plain", "bn", "x"])
    bands = {"plain": _band(3), "bn": _band(3), "x": empty}
    ax = figs.curves_figure({"val_loss": bands}, colors, diverged=diverged).axes[0]
    labels = ax.get_legend_handles_labels()[1]
    assert labels == ["plain", "bn (3 of 4 seeds diverged, left out)", "x (all 4 seeds diverged)"]
    one = (np.array([0.0, 1.0]), np.array([1.0, 1.0]))
    ax = figs.ecdf_figure({"plain": one, "bn": one}, colors, "val_loss", diverged=diverged).axes[0]
    labels = ax.get_legend_handles_labels()[1]
    assert labels == ["plain", "bn (3 of 4 seeds diverged, left out)", "x (all 4 seeds diverged)"]
    assert np.size(ax.get_lines()[-1].get_xdata()) == 0  # x: a legend entry, nothing drawn


def test_checks_figure_marks_bit_identical_and_tolerance() -> None:
    checks = [
        {"name": "a ≡ b", "passed": True, "max_rel_dev": 0.0, "tolerance": 1e-5},
        {"name": "a @ torch", "passed": False, "max_rel_dev": 3e-3, "tolerance": 1e-5},
        {"name": "skipped", "passed": None, "max_rel_dev": None, "tolerance": 1e-5},
        # NaN in one arm only: stored as null in summary.json, inf in memory
        {"name": "nan", "passed": False, "max_rel_dev": None, "tolerance": 1e-5},
        {"name": "inf", "passed": False, "max_rel_dev": float("inf"), "tolerance": 1e-5},
    ]
    ax = figs.checks_figure(checks).axes[0]
    texts = [t.get_text() for t in ax.texts]
    assert texts == ["0 (bit-identical)", "3.0e-03", "non-finite", "non-finite"]
    assert ax.get_xscale() == "log"


def test_weights_bn_and_optimum_figures_have_a_panel_per_thing() -> None:
    weights = {
        "dense#0": {"sum": {"plain": _band(9)}, "drift": {"plain": _band(9)}},
        "dense#1": {"sum": {"plain": _band(9), "bn": _band(9, 1.0)}, "drift": {"bn": _band(9)}},
    }
    assert len(figs.weights_figure(weights, COLORS).axes) == 4  # bands apart: a row per layer
    x = np.arange(0, 4, dtype=float)
    bn = {
        "bn": {
            "layers": {"bn#0": {"mean": _band(3), "var": _band(3), "expected": (x, 1 - 0.9**x)}},
            "val_train_mode": _band(3),
            "val_inference": _band(3),
        }
    }
    ax_mean, _, ax_val = figs.bn_figure(bn, COLORS).axes
    expected = [line for line in ax_mean.get_lines() if "1 − m^u" in line.get_label()]
    np.testing.assert_allclose(expected[0].get_ydata(), 1 - 0.9**x)
    assert len(ax_val.get_lines()) == 2
    gap = {"median": 0.5, "q05": 0.4, "q95": 0.7}
    fig = figs.optimum_figure({"plain": {"train_gap": gap, "val_gap": gap}}, COLORS)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["plain"]


def test_weight_sums_whose_bands_overlap_get_a_panel_per_variant() -> None:
    # bands of half-width 0.1 around medians 0.05 apart overlap at every step: small multiples
    near = {"plain": _band(9), "bn": _band(9, 0.05)}
    assert figs.bands_overlap(near) and not figs.bands_overlap({**near, "bn": _band(9, 1.0)})
    fig = figs.weights_figure({"dense#0": {"sum": near, "drift": near}}, COLORS)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == [
        "dense#0: weight sum\nplain",
        "dense#0: weight sum\nbn",
        "dense#0: weight sum − its value after step 1\nplain",
        "dense#0: weight sum − its value after step 1\nbn",
    ]
    for ax in fig.axes:  # one variant per panel: one band, one median line
        assert len(ax.collections) == 1 and len(ax.get_lines()) == 1
    sum_plain, sum_bn = fig.axes[:2]
    assert sum_plain.get_shared_y_axes().joined(sum_plain, sum_bn)
    np.testing.assert_array_equal(sum_bn.get_lines()[0].get_ydata(), near["bn"].median)


def test_every_history_name_gets_a_panel_three_to_a_row() -> None:
    names = ["val_loss", "loss", "accuracy", "val_accuracy"]
    fig = figs.curves_figure({n: {"plain": _band(4)} for n in names}, COLORS)
    assert [ax.get_ylabel() for ax in fig.axes] == names
    assert fig.get_size_inches()[0] == 3 * 5.2  # two rows of at most three panels


def test_svg_is_inline_deterministic_and_self_contained() -> None:
    fig = figs.curves_figure({"val_loss": {"plain": _band(4)}}, COLORS)
    svg = figs.to_svg(fig, salt="curves")
    assert svg.startswith("<svg") and svg.rstrip().endswith("</svg>")
    assert svg == figs.to_svg(fig, salt="curves")
    # no fonts, images or scripts fetched from anywhere: text is drawn as paths
    assert not re.search(r"(href|src)=\"(https?:|//)", svg)
    assert "<text" not in svg and "<image" not in svg
