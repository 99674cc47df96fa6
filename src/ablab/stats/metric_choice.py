"""Which History name the verdicts compare, and when Keras' ``val_loss`` would mislead.

Keras' ``loss`` / ``val_loss`` is the compiled loss plus every penalty the model adds
(``kernel_regularizer``, ``bias_regularizer``, ``activity_regularizer``, ``add_loss``), so it
judges a regularised variant partly on its own penalty: ``l2`` "hurts" by the size of the
penalty. Every run also records the penalty-free loss, ``data_loss`` / ``val_data_loss``
(``ablab.engine.data_loss``). A variant's loss includes a penalty when its ``loss`` and
``data_loss`` differ (:func:`penalties`: measured, so a builder's ``add_loss`` counts too).

Without ``[verdicts] metric``, :func:`choose_metric` compares ``val_loss`` (``loss`` without
validation) unless

* a variant's loss includes a penalty: then ``val_data_loss`` (``data_loss``), and the note
  says so;
* the variants' loss functions differ: no loss compares them, so the first metric every
  variant records (``[train] metrics``) is compared; with none, ``val_loss`` with a warning.

A metric the study names is compared as named, with a warning where it is one of the above.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ablab.stats.summary import headline_metric
from ablab.store.records import VariantHistory
from ablab.study.keras_names import DATA_LOSS, loss_key
from ablab.study.schema import VerdictSpec

PENALTY_RTOL = 1e-5
"""A variant's loss includes a penalty when the median over seeds of the largest
``|loss - data_loss|`` across epochs exceeds this fraction of ``max(1, |loss|)`` (float32
accumulation of the same numbers differs far less)."""

REGULARIZER_KEYS = ("kernel_regularizer", "bias_regularizer", "activity_regularizer")


@dataclass(frozen=True)
class MetricChoice:
    """The compared History name, why it is not ``val_loss`` (``note``) and what makes it
    misleading (``warning``); each note / warning is one sentence or ""."""

    metric: str
    note: str = ""
    warning: str = ""


def penalties(histories: Mapping[str, VariantHistory]) -> dict[str, float]:
    """``{variant: median over seeds of the final loss - data_loss}`` for the variants whose
    Keras loss includes a penalty (histories without ``data_loss``: none)."""
    out = {}
    for name, h in histories.items():
        if "loss" not in h.values or DATA_LOSS not in h.values:
            continue
        loss, data = h.values["loss"], h.values[DATA_LOSS]
        with np.errstate(invalid="ignore", over="ignore"):
            rel = np.abs(loss - data) / np.maximum(1.0, np.abs(loss))
        worst = np.where(np.isfinite(rel), rel, -np.inf).max(axis=1, initial=-np.inf)
        worst = worst[np.isfinite(worst)]  # seeds with a finite epoch
        if worst.size == 0 or float(np.median(worst)) <= PENALTY_RTOL:
            continue
        final = loss[:, -1] - data[:, -1]
        final = final[np.isfinite(final)]
        out[name] = float(np.median(final)) if final.size else float("nan")
    return out


def _variant_table(study: Mapping[str, Any], variant: str) -> Mapping[str, Any]:
    """``variant``'s table in the study; a sweep arm (``v@axis=value``) not among them: its
    declared variant's."""
    variants = study.get("variants") or {}
    if variant not in variants:
        arm = (study.get("arms") or {}).get(variant) or {}
        variant = arm.get("variant", variant)
    return variants.get(variant) or {}


def _loss_spec(study: Mapping[str, Any], variant: str) -> Any:
    arm = (study.get("arms") or {}).get(variant) or {}
    point = arm.get("point") or {}
    if "loss" in point and variant not in (study.get("variants") or {}):
        return point["loss"]  # a sweep over the loss
    own = (_variant_table(study, variant).get("train") or {}).get("loss")
    return own if own is not None else (study.get("train") or {}).get("loss")


def _loss_words(loss: Any, key: bool) -> str:
    """A loss (a name, ``{name, args}`` or one per output) as text; ``key``: the comparable
    form (aliases and class names as one, arguments sorted)."""
    if isinstance(loss, Mapping) and "name" in loss:
        items = sorted(loss.items()) if key else loss.items()
        args = ", ".join(f"{k}={v!r}" for k, v in items if k != "name")
        name = loss_key(str(loss["name"])) if key else str(loss["name"])
        return f"{name}({args})" if args else name
    if isinstance(loss, Mapping):  # one loss per output
        items = sorted(loss.items()) if key else loss.items()
        return "{" + ", ".join(f"{k}: {_loss_words(v, key)}" for k, v in items) + "}"
    return loss_key(str(loss)) if key and isinstance(loss, str) else str(loss)


def loss_of(study: Mapping[str, Any], variant: str) -> str:
    """``variant``'s loss as the resolved study names it (with its arguments, if any)."""
    return _loss_words(_loss_spec(study, variant), key=False)


def loss_identity(study: Mapping[str, Any], variant: str) -> str:
    """``variant``'s loss in a form equal for the same loss however spelled (``mse``,
    ``mean_squared_error``, ``MeanSquaredError``); arguments still tell losses apart."""
    return _loss_words(_loss_spec(study, variant), key=True)


def regularizers_of(study: Mapping[str, Any], variant: str) -> list[str]:
    """The regularizer arguments ``variant``'s layer list sets (``kernel_regularizer``, ...),
    each once; [] for a builder (its penalties are measured, not read)."""
    layers = _variant_table(study, variant).get("layers")
    if layers is None:
        layers = (study.get("model") or {}).get("layers") or []
    found = [k for spec in layers for k in REGULARIZER_KEYS if (spec or {}).get(k) is not None]
    return list(dict.fromkeys(found))


def _penalty_words(
    pen: Mapping[str, float], study: Mapping[str, Any] | None, n_variants: int
) -> str:
    """ "l2: kernel_regularizer, penalty 0.042 at the final epoch; ..." """
    parts = []
    for variant, size in pen.items():
        regs = regularizers_of(study, variant) if study else []
        what = ", ".join(regs) if regs else "a regularizer or add_loss"
        parts.append(f"{variant}: {what}, penalty {size:.3g} at the final epoch")
    if len(pen) == n_variants:
        parts.append("every variant's penalty is its own")
    return "; ".join(parts)


def _differing_losses(
    histories: Mapping[str, VariantHistory], study: Mapping[str, Any] | None
) -> dict[str, str]:
    """``{variant: loss}`` when the variants' loss functions differ, else {}."""
    if not study:
        return {}
    if len({loss_identity(study, v) for v in histories}) <= 1:
        return {}
    return {v: loss_of(study, v) for v in histories}


def _shared_metric(histories: Mapping[str, VariantHistory], validation: bool) -> str | None:
    """The first History name every variant records besides the losses (a ``[train]``
    metric), on the validation split when there is one."""
    first = next(iter(histories.values()))
    losses = ("loss", DATA_LOSS)
    for name in first.values:
        base = name.removeprefix("val_")
        if base in losses or name.startswith("val_") != validation:
            continue
        if all(name in h.values for h in histories.values()):
            return name
    return None


def choose_metric(
    spec: VerdictSpec,
    histories: Mapping[str, VariantHistory],
    study: Mapping[str, Any] | None = None,
) -> MetricChoice:
    """The metric the verdicts compare (module docstring); ``study``: the resolved study (as
    in study.json), for the variants' loss functions and regularizer names -- without it, only
    the measured penalties count."""
    if not histories:
        return MetricChoice(spec.metric or "val_loss")
    first = next(iter(histories.values()))
    headline = headline_metric(first)
    validation = headline == "val_loss"
    data = f"val_{DATA_LOSS}" if validation else DATA_LOSS
    has_data = all(data in h.values for h in histories.values())
    pen = penalties(histories) if has_data else {}
    losses = _differing_losses(histories, study)
    loss_words = ", ".join(f"{v}: {loss}" for v, loss in losses.items())
    if spec.metric is None:
        if losses:
            shared = _shared_metric(histories, validation)
            if shared is not None:
                return MetricChoice(
                    shared,
                    note=f"verdict metric {shared}: the variants differ in their loss function "
                    f"({loss_words}); Keras' {headline} is each variant's own loss",
                )
            return MetricChoice(
                headline,
                warning=f"the variants differ in their loss function ({loss_words}): {headline} "
                "is each variant's own loss and does not compare them; add a metric they share "
                "([train] metrics) and judge on it ([verdicts] metric)",
            )
        if pen:
            return MetricChoice(
                data,
                note=f"verdict metric {data}: the variants differ in regularisation "
                f"({_penalty_words(pen, study, len(histories))}); Keras' {headline} includes "
                "the penalty",
            )
        return MetricChoice(headline)
    metric = spec.metric
    base = metric.removeprefix("val_")
    if losses and base in ("loss", DATA_LOSS):
        return MetricChoice(
            metric,
            warning=f"the variants differ in their loss function ({loss_words}): {metric} is "
            "each variant's own loss and does not compare them",
        )
    if pen and base == "loss":
        better = f"val_{DATA_LOSS}" if metric.startswith("val_") else DATA_LOSS
        return MetricChoice(
            metric,
            warning=f"{metric} includes regularisation penalties "
            f"({_penalty_words(pen, study, len(histories))}): a variant is judged partly on "
            f"its own penalty; {better} compares the fit to the data alone",
        )
    return MetricChoice(metric)
