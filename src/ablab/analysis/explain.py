"""Explain: divergence in plain words, the analytic optimum of linear variants, and
BatchNormalization in plain words.

Divergence. A seed diverges when its loss or a metric becomes non-finite
(``ablab.store.records.first_non_finite_epoch``). :func:`divergence_summary` says, per variant,
how many seeds diverged, at which epoch, with which value (inf / nan), and -- where a setting
stands out -- its likely cause: only a setting that differs from the variant's baseline in the
direction that destabilises training (a larger learning rate, while the baseline diverged less
often), or one outside its usual range (a learning rate >= 1, a momentum >= 1).

Analytic baseline. A variant made only of Dense layers with linear activations,
``Activation('linear')``, Flatten/Reshape and BatchNormalization (affine at inference) is an
affine map of rank at most ``r`` = its narrowest width. The best affine rank-r map under
MSE is reduced-rank regression on centred data (Izenman, 1975): the least-squares fit
projected onto the top-r principal directions of its fitted values. For an autoencoder
(target = input) that is the rank-r PCA reconstruction (Baldi & Hornik, 1989); with
``r`` >= min(inputs, outputs) it is ordinary least squares. Every trained linear variant's
inference-mode training MSE is at or above the optimum's; the gap says how far training got.

Keras is imported only by the functions that inspect a model, so the run document
(``ablab show RUN``, the report) uses this module without loading it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from ablab.stats.summary import final_distribution
from ablab.store.records import VariantHistory

if TYPE_CHECKING:
    from ablab.engine.data import Split
    from ablab.engine.program import VariantProgram


def linear_rank(program: VariantProgram) -> int | None:
    """The rank bound of an affine-at-inference model under MSE (its narrowest width), else
    None (``ablab.engine.model.linear_rank``)."""
    from ablab.engine.model import linear_rank as model_linear_rank

    split = program.split
    return model_linear_rank(program.prepared, split.x_train, split.y_train)


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
    if "loss" in history and not np.isfinite(history["loss"][:, -1]).any():
        return []  # every seed diverged: the divergence line says so; no statistics to judge
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
            train_mode = _nanmedian(epoch_probes["val_loss_train_mode"][:, -1])
            inference = _nanmedian(history["val_loss"][:, -1])
            entry.update(val_loss_train_mode=train_mode, val_loss_inference=inference)
            if train_mode is None or inference is None:
                pass  # no seed with a finite validation loss in one of the modes
            elif inference > train_mode:
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


# -- divergence ----------------------------------------------------------------------------

_DEFAULT_LEARNING_RATE = {
    **dict.fromkeys(("adadelta", "adafactor", "adagrad", "adam", "adamax", "adamw"), 0.001),
    **dict.fromkeys(("ftrl", "lamb", "lion", "muon", "nadam", "rmsprop"), 0.001),
    "sgd": 0.01,
    "schedulefreeadamw": 0.0025,
}
"""Keras 3's default learning rate per optimizer (lower-cased name without underscores)."""
LARGE_LEARNING_RATE = 1.0
"""A learning rate at or above this is outside the usual range of every Keras optimizer."""
_UNIT_INTERVAL = ("momentum", "beta_1", "beta_2", "rho", "ema_momentum")
"""Optimizer arguments whose usual range is [0, 1)."""


def _train_of(study: Mapping[str, Any], variant: str) -> dict[str, Any]:
    """The variant's train settings in a resolved study dict: ``[train]`` updated with its
    overrides (as ``Study.variant_train`` merges them)."""
    spec = (study.get("variants") or {}).get(variant) or {}
    return {**(study.get("train") or {}), **(spec.get("train") or {})}


def _learning_rate(train: Mapping[str, Any]) -> tuple[float | None, str]:
    """(learning rate, how it is named): the optimizer's ``learning_rate`` (a schedule's
    ``initial_learning_rate``), else its Keras default; None when unknown."""
    opt = train.get("optimizer", "rmsprop")
    if not isinstance(opt, str | Mapping):
        return None, ""
    name, args = (opt, {}) if isinstance(opt, str) else (str(opt.get("name", "")), dict(opt))
    lr = args.get("learning_rate")
    if isinstance(lr, Mapping):
        lr = lr.get("initial_learning_rate")
    if lr is None:
        default = _DEFAULT_LEARNING_RATE.get(name.lower().replace("_", ""))
        return default, f"{name.lower()}'s default"
    if isinstance(lr, bool) or not isinstance(lr, int | float):
        return None, ""
    return float(lr), ""


def _lr_words(lr: float, note: str) -> str:
    return f"{lr:g}" + (f", {note}" if note else "")


def _likely_cause(
    study: Mapping[str, Any], variant: str, baseline: str | None, baseline_steadier: bool
) -> dict[str, Any] | None:
    """The setting that likely made ``variant`` diverge, or None when none stands out.

    Named only when it differs from the baseline's in the destabilising direction (a larger
    learning rate) while the baseline diverged less often (``baseline_steadier``), or when it is
    outside its usual range (a learning rate >= 1, a momentum-like argument >= 1)."""
    train = _train_of(study, variant)
    lr, note = _learning_rate(train)
    if lr is not None and baseline is not None and baseline_steadier:
        base_lr, base_note = _learning_rate(_train_of(study, baseline))
        if base_lr is not None and lr > base_lr:
            words = [note] if note else []
            words.append(f"{baseline}: {_lr_words(base_lr, base_note)}")
            return {
                "setting": "learning_rate",
                "value": lr,
                "baseline_value": base_lr,
                "text": f"learning_rate {lr:g} ({'; '.join(words)}) is the likely cause",
            }
    if lr is not None and lr >= LARGE_LEARNING_RATE:
        return {
            "setting": "learning_rate",
            "value": lr,
            "baseline_value": None,
            "text": f"learning_rate {lr:g} (above the usual range, < {LARGE_LEARNING_RATE:g}) "
            "is the likely cause",
        }
    opt = train.get("optimizer")
    args: Mapping[str, Any] = opt if isinstance(opt, Mapping) else {}
    for arg in _UNIT_INTERVAL:
        value = args.get(arg)
        if isinstance(value, int | float) and not isinstance(value, bool) and value >= 1:
            return {
                "setting": arg,
                "value": float(value),
                "baseline_value": None,
                "text": f"{arg} {value:g} (outside its usual range [0, 1)) is the likely cause",
            }
    return None


def _baselines(study: Mapping[str, Any]) -> tuple[dict[str, str], set[str]]:
    """({variant: its baseline}, every baseline): ``[verdicts] pairs``, else the study's
    baseline for every other variant."""
    pairs = [tuple(p) for p in ((study.get("verdicts") or {}).get("pairs") or [])]
    baseline = study.get("baseline")
    own = {str(v): str(b) for v, b in pairs}
    return own, {b for b in own.values()} | ({str(baseline)} if baseline else set())


def _when(first: int, last: int, median: float) -> tuple[str, list[str]]:
    """("at epoch 1", []), or ("at epochs 2–5", ["median 3"])."""
    if first == last:
        return f"at epoch {first}", []
    return f"at epochs {first}–{last}", [f"median {median:g}"]


def _what(values: Mapping[str, int]) -> str:
    """ "loss inf", or "loss inf on 3, loss nan on 1"."""
    if len(values) == 1:
        return next(iter(values))
    return ", ".join(f"{k} on {n}" for k, n in values.items())


def _first_values(history: VariantHistory, bad: np.ndarray) -> dict[str, int]:
    """{"<name> nan" | "<name> inf" | "<name> -inf": seeds}: the first non-finite History value
    of each diverged seed (``loss`` first where it is non-finite too), most common first."""
    epoch = history.diverged_epoch
    names = sorted(history.values, key=lambda n: n != "loss")  # stable: loss, then in order
    values: Counter[str] = Counter()
    for seed in bad:
        at = epoch[seed] - 1
        name = next(n for n in names if not np.isfinite(history.values[n][seed, at]))
        x = history.values[name][seed, at]
        values[f"{name} {'nan' if np.isnan(x) else 'inf' if x > 0 else '-inf'}"] += 1
    return dict(values.most_common())


def divergence_summary(
    histories: Mapping[str, VariantHistory], study: Mapping[str, Any]
) -> dict[str, dict[str, Any]]:
    """Per variant with a diverged seed, in the order given: how many seeds diverged, at
    which (1-based) epoch, with which non-finite value, and the setting that likely caused it.

    ``study``: the resolved study dict (as stored in study.json). Each entry: ``n_seeds``,
    ``diverged``, ``first_epoch``, ``last_epoch``, ``median_epoch`` (of the diverged seeds'
    first non-finite epochs), ``values`` (see :func:`_first_values`), ``baseline`` (the
    variant's baseline; None for a baseline), ``is_baseline``, ``cause`` (``{"setting",
    "value", "baseline_value", "text"}`` or None) and ``text``, the sentence.
    """
    own, baselines = _baselines(study)
    fraction = {v: float(np.mean(h.diverged_epoch > 0)) for v, h in histories.items()}
    out: dict[str, dict[str, Any]] = {}
    for variant, history in histories.items():
        epochs = history.diverged_epoch
        bad = np.flatnonzero(epochs > 0)
        if bad.size == 0:
            continue
        is_baseline = variant in baselines
        baseline = own.get(variant) or (None if is_baseline else study.get("baseline"))
        steadier = baseline in fraction and fraction[str(baseline)] < fraction[variant]
        cause = _likely_cause(study, variant, baseline, steadier)
        d: dict[str, Any] = {
            "n_seeds": history.n_seeds,
            "diverged": int(bad.size),
            "first_epoch": int(epochs[bad].min()),
            "last_epoch": int(epochs[bad].max()),
            "median_epoch": float(np.median(epochs[bad])),
            "values": _first_values(history, bad),
            "baseline": baseline,
            "is_baseline": is_baseline,
            "cause": cause,
        }
        when, notes = _when(d["first_epoch"], d["last_epoch"], d["median_epoch"])
        detail = "; ".join([*notes, _what(d["values"])])
        d["text"] = f"{variant}: {bad.size} of {history.n_seeds} seeds diverged {when} ({detail})"
        d["text"] += f"; {cause['text']}" if cause else ""
        out[variant] = d
    return out


def diverged_baselines(divergence: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """One sentence per baseline that diverged on every seed (nothing can be judged against
    it), from :func:`divergence_summary`'s entries; [] when there is none."""
    out = []
    for variant, d in divergence.items():
        if not d["is_baseline"] or d["diverged"] < d["n_seeds"]:
            continue
        when, notes = _when(d["first_epoch"], d["last_epoch"], d["median_epoch"])
        detail = ", ".join(
            [f"{d['diverged']} of {d['n_seeds']} {when}", *notes, _what(d["values"])]
        )
        cause = f"; {d['cause']['text']}" if d.get("cause") else ""
        out.append(
            f"the baseline {variant} diverged on every seed ({detail}){cause}: no variant can "
            "be judged against it"
        )
    return out
