"""Per-variant summaries of a run: final-epoch distribution over seeds and divergence counts."""

from __future__ import annotations

from typing import Any

import numpy as np

from ablab.store.records import VariantHistory


def headline_metric(history: VariantHistory) -> str:
    """The metric a summary leads with: ``val_loss`` when there is validation, else ``loss``."""
    return "val_loss" if "val_loss" in history.values else "loss"


QUANTILES = (0.05, 0.5, 0.95)
"""The spread every summary, band and export shows: 5 %, median, 95 % over seeds."""


def spread(values: np.ndarray, axis: int | None = None) -> np.ndarray:
    """The 5 %, 50 % and 95 % quantiles over seeds, ignoring NaN (numpy's default linear
    interpolation): (3, ...) -- one row per quantile -- for ``values`` (seeds, ...) and axis 0."""
    return np.nanquantile(values, QUANTILES, axis=axis)


def final_distribution(values: np.ndarray) -> dict[str, float | None]:
    """Mean, median, 5 % and 95 % quantiles (numpy's default linear interpolation).

    values: (seeds,) final-epoch values; non-finite seeds are left out (counted as
    diverged elsewhere). All None when no seed is finite.
    """
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return {"mean": None, "median": None, "q05": None, "q95": None}
    q05, q50, q95 = spread(finite)
    return {
        "mean": float(finite.mean()),
        "median": float(q50),
        "q05": float(q05),
        "q95": float(q95),
    }


def summarize_variant(history: VariantHistory) -> dict[str, Any]:
    """``{"n_seeds", "diverged", "metric", "final_<metric>": {...}, "finals": {...}}`` for
    one variant: ``metric`` is the headline one (val_loss, else loss); ``finals[name]`` the
    final-epoch distribution of every recorded History name."""
    metric = headline_metric(history)
    diverged = int((history.diverged_epoch > 0).sum())
    final = history.values[metric][:, -1]
    out: dict[str, Any] = {"n_seeds": history.n_seeds, "diverged": diverged, "metric": metric}
    out[f"final_{metric}"] = final_distribution(final)
    out["finals"] = {name: final_distribution(v[:, -1]) for name, v in history.values.items()}
    if metric != "val_loss":
        # Keep the documented key present: without validation data it is null.
        out["final_val_loss"] = {"mean": None, "median": None, "q05": None, "q95": None}
    return out


def summarize(histories: dict[str, VariantHistory]) -> dict[str, dict[str, Any]]:
    """Summaries of every variant, in the order given."""
    return {name: summarize_variant(h) for name, h in histories.items()}
