"""Keras losses and metrics by name: how a study's names become what ``keras.losses.get`` /
``keras.metrics.get`` take, and the History column each metric records."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ablab.study.schema import ObjectSpec

DATA_LOSS = "data_loss"
"""History name of the penalty-free loss every run records beside Keras' ``loss`` (and
``val_data_loss`` beside ``val_loss``): the compiled loss without regularisation penalties
(``ablab.engine.data_loss``). A user metric may not take this name."""

_ALIASES = {
    "mse": "MeanSquaredError",
    "mae": "MeanAbsoluteError",
    "mape": "MeanAbsolutePercentageError",
    "msle": "MeanSquaredLogarithmicError",
    "auc": "AUC",
    "acc": "Accuracy",
}


def _class_name(name: str) -> str:
    """``sparse_categorical_crossentropy`` -> ``SparseCategoricalCrossentropy`` (class names
    pass through)."""
    if name.lower() in _ALIASES:
        return _ALIASES[name.lower()]
    if name[:1].isupper():
        return name
    return "".join(part.capitalize() for part in name.split("_"))


_LOSS_ALIASES = {
    "bce": "binarycrossentropy",
    "kld": "kldivergence",
    "kullback_leibler_divergence": "kldivergence",
    "huber_loss": "huber",
}


def loss_key(name: str) -> str:
    """One spelling of a Keras loss name, for comparing: its aliases, snake_case name and
    class name alike (``mse``, ``mean_squared_error``, ``MeanSquaredError`` ->
    ``meansquarederror``)."""
    lowered = name.lower()
    if lowered in _LOSS_ALIASES:
        return _LOSS_ALIASES[lowered]
    return _class_name(name).lower().replace("_", "")


def snake_case(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z][a-z])", "_", name).lower()


def keras_object_config(value: str | ObjectSpec, *, metric: bool = False) -> str | dict[str, Any]:
    """A loss / metric as ``keras.losses.get`` / ``keras.metrics.get`` take it: the name
    itself when it has no arguments (so Keras resolves it as compile does, e.g. "accuracy"
    by the target's shape), else ``{"class_name", "config"}``; a metric object gets its
    History name fixed (``metric_name``), so every instance records the same column."""
    if isinstance(value, str):
        return value
    config = dict(value.model_extra or {})
    if not config:
        return value.name
    if metric:
        config["name"] = metric_name(value)
    return {"class_name": _class_name(value.name), "config": config}


def metric_name(value: str | ObjectSpec) -> str:
    """The History name of a metric: its name as given, or for one with arguments the
    snake_case of its class (``BinaryAccuracy`` -> ``binary_accuracy``)."""
    if isinstance(value, str) or not value.model_extra:
        return value if isinstance(value, str) else value.name
    return snake_case(_class_name(value.name))
