"""Per-variant summaries."""

from __future__ import annotations

import numpy as np

from ablab.stats.summary import final_distribution, summarize_variant
from ablab.store.records import VariantHistory


def test_final_distribution_by_hand() -> None:
    # 0..100: mean 50, median 50, numpy linear quantiles q05 = 5, q95 = 95
    d = final_distribution(np.arange(101, dtype=float))
    assert d == {"mean": 50.0, "median": 50.0, "q05": 5.0, "q95": 95.0}


def test_non_finite_seeds_are_left_out_and_counted() -> None:
    h = VariantHistory(
        seeds=np.arange(4),
        values={
            "loss": np.array([[1.0, 1.0], [1.0, 2.0], [np.nan, np.nan], [1.0, 4.0]]),
            "val_loss": np.array([[1.0, 1.0], [1.0, 2.0], [np.nan, np.nan], [1.0, 3.0]]),
        },
    )
    s = summarize_variant(h)
    assert s["n_seeds"] == 4 and s["diverged"] == 1 and s["metric"] == "val_loss"
    assert s["final_val_loss"]["mean"] == 2.0 and s["final_val_loss"]["median"] == 2.0


def test_without_validation_the_summary_leads_with_loss() -> None:
    h = VariantHistory(seeds=np.arange(2), values={"loss": np.array([[3.0], [1.0]])})
    s = summarize_variant(h)
    assert s["metric"] == "loss" and s["final_loss"]["mean"] == 2.0
    assert s["final_val_loss"]["mean"] is None


def test_all_diverged_gives_nulls() -> None:
    h = VariantHistory(seeds=np.arange(2), values={"loss": np.full((2, 3), np.inf)})
    s = summarize_variant(h)
    assert s["diverged"] == 2 and s["final_loss"]["median"] is None
