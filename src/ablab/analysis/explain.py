"""Explain: the analytic optimum of linear variants, and BatchNormalization in plain words.

Analytic baseline. A variant made only of Dense layers with linear activations,
``Activation('linear')``, Flatten/Reshape and BatchNormalization (affine at inference) is an
affine map of rank at most ``r`` = its narrowest width. The best affine rank-r map under
MSE is reduced-rank regression on centred data (Izenman, 1975): the least-squares fit
projected onto the top-r principal directions of its fitted values. For an autoencoder
(target = input) that is the rank-r PCA reconstruction (Baldi & Hornik, 1989); with
``r`` >= min(inputs, outputs) it is ordinary least squares. Every trained linear variant's
inference-mode training MSE is at or above the optimum's; the gap says how far training got.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

from ablab._keras import flatten_layers
from ablab.engine.data import Split
from ablab.engine.program import VariantProgram
from ablab.stats.summary import final_distribution

_SHAPE_ONLY = (keras.layers.InputLayer, keras.layers.Flatten, keras.layers.Reshape)
_MSE = ("mse", "mean_squared_error", "meansquarederror")


def _is_linear_activation(fn: Any) -> bool:
    return getattr(fn, "__name__", None) == "linear"


def linear_rank(program: VariantProgram) -> int | None:
    """The rank bound of an affine-at-inference model (its narrowest width), else None."""
    model = program.prepared.model
    if program.prepared.train.loss_name.replace("_", "") not in {m.replace("_", "") for m in _MSE}:
        return None
    widths = [int(np.prod(program.split.x_train.shape[1:]))]
    for layer in flatten_layers(model, include_self=False):
        linear_dense = isinstance(layer, keras.layers.Dense) and _is_linear_activation(
            layer.activation
        )
        identity = isinstance(layer, keras.layers.Activation) and _is_linear_activation(
            layer.activation
        )
        affine = isinstance(layer, (keras.Model, keras.layers.BatchNormalization, *_SHAPE_ONLY))
        if linear_dense:
            widths.append(int(layer.units))
        elif not (identity or affine):
            return None
    return min(widths)


def linear_optimum(split: Split, rank: int) -> dict[str, Any]:
    """Best affine rank-``rank`` map from inputs to targets (MSE), fitted on the training rows.

    Returns ``{"kind", "rank", "train_mse", "val_mse"}``; MSE = mean over rows and outputs
    (Keras' mean_squared_error averaged over the batch). val_mse is None without validation.
    """
    x = split.x_train.reshape(split.n_train, -1).astype(np.float64)
    y = split.y_train.reshape(split.n_train, -1).astype(np.float64)
    mx, my = x.mean(axis=0), y.mean(axis=0)
    xc, yc = x - mx, y - my
    b_ols, *_ = np.linalg.lstsq(xc, yc, rcond=None)
    full = min(x.shape[1], y.shape[1])
    if rank >= full:
        b, kind = b_ols, "least_squares"
    else:
        _, _, vt = np.linalg.svd(xc @ b_ols, full_matrices=False)
        v = vt[:rank].T
        b = b_ols @ v @ v.T
        autoencoder = split.y_train.shape == split.x_train.shape and np.array_equal(
            split.y_train, split.x_train
        )
        kind = "pca" if autoencoder else "reduced_rank_regression"
    train_mse = float(np.mean((yc - xc @ b) ** 2))
    val_mse = None
    if split.x_val is not None and split.y_val is not None:
        xv = split.x_val.reshape(split.n_val, -1).astype(np.float64)
        yv = split.y_val.reshape(split.n_val, -1).astype(np.float64)
        val_mse = float(np.mean((yv - (my + (xv - mx) @ b)) ** 2))
    return {"kind": kind, "rank": rank, "train_mse": train_mse, "val_mse": val_mse}


def optimum_gaps(
    program: VariantProgram,
    history: dict[str, np.ndarray],
    epoch_probes: dict[str, np.ndarray] | None,
) -> dict[str, Any] | None:
    """The variant's analytic optimum and its seeds' final gaps to it (None if not linear).

    history: {name: (seeds, epochs)}; epoch_probes: {name: (seeds, epochs)} (needs
    ``train_loss_inference``, the final model's training MSE in inference mode).
    """
    rank = linear_rank(program)
    if rank is None:
        return None
    opt = linear_optimum(program.split, rank)
    out: dict[str, Any] = {**opt}
    if epoch_probes is not None and "train_loss_inference" in epoch_probes:
        out["train_gap"] = final_distribution(
            epoch_probes["train_loss_inference"][:, -1] - opt["train_mse"]
        )
    if opt["val_mse"] is not None and "val_loss" in history:
        out["val_gap"] = final_distribution(history["val_loss"][:, -1] - opt["val_mse"])
    return out


def _nanmedian(values: np.ndarray) -> float | None:
    finite = values[np.isfinite(values)]
    return float(np.median(finite)) if finite.size else None


def _pct(progress: float | None) -> str:
    return "n/a (already at its initial value)" if progress is None else f"{100 * progress:.0f} %"


def bn_diagnosis(
    program: VariantProgram,
    history: dict[str, np.ndarray],
    epoch_probes: dict[str, np.ndarray] | None,
) -> list[dict[str, Any]]:
    """For each BatchNormalization layer: how far its moving statistics got, and what
    inference on them costs (train-mode vs inference-mode validation loss), with a sentence.

    Medians over seeds at the final epoch. The theoretical figure for constant batch
    statistics after ``u`` updates with momentum ``m`` is ``1 - m**u``.
    """
    if epoch_probes is None or program._probe_spec is None:
        return []
    updates = program.layout.steps_per_epoch * program.layout.epochs
    out = []
    for bn in program._probe_spec.bn:
        mean_p, var_p = (
            _nanmedian(epoch_probes[f"{bn.layer_id}/moving_{s}_progress"][:, -1])
            for s in ("mean", "var")
        )
        theory = 1.0 - bn.momentum**updates
        entry: dict[str, Any] = {
            "layer": bn.layer_id,
            "momentum": bn.momentum,
            "updates": updates,
            "expected_progress": theory,
            "moving_mean_progress": mean_p,
            "moving_var_progress": var_p,
        }
        only = "only " if theory < 0.99 else ""
        text = (
            f"after {updates} updates with momentum {bn.momentum:g} the moving statistics "
            f"of {bn.layer_id} are {only}~{100 * theory:.0f} % of the way from their initial "
            f"values (1 - momentum^updates; measured against the full training set's "
            f"statistics: mean {_pct(mean_p)}, variance {_pct(var_p)})"
        )
        if "val_loss_train_mode" in epoch_probes and "val_loss" in history:
            train_mode = float(np.nanmedian(epoch_probes["val_loss_train_mode"][:, -1]))
            inference = float(np.nanmedian(history["val_loss"][:, -1]))
            entry.update(val_loss_train_mode=train_mode, val_loss_inference=inference)
            if inference > train_mode:
                text += (
                    f"; inference uses stale statistics (train-mode val {train_mode:.3g} vs "
                    f"inference-mode {inference:.3g})"
                )
            else:
                text += (
                    f"; inference on them costs nothing here (train-mode val "
                    f"{train_mode:.3g} vs inference-mode {inference:.3g})"
                )
        entry["text"] = text
        out.append(entry)
    return out
