"""The penalty-free loss as a compiled metric: ``data_loss`` / ``val_data_loss`` in every History.

Keras' ``loss`` / ``val_loss`` is the compiled loss *plus* every penalty the model adds
(``kernel_regularizer``, ``bias_regularizer``, ``activity_regularizer``, ``add_loss``), so it
does not compare a regularised variant with a plain one: the penalty alone can make ``l2``
"hurt". :class:`DataLoss` is the compiled loss alone, computed exactly as
``Trainer.compute_loss`` computes it (the same loss object on the same ``y_pred`` and sample
weights, cast to the metric's dtype) and averaged over batches exactly as Keras' loss tracker
averages ``loss`` (a mean weighted by each batch's row count). Without a penalty
``data_loss == loss`` to float tolerance (tested against Keras' own History).

It is compiled as a *weighted* metric (``compile(weighted_metrics=[...])``) so it receives the
sample weights (and ``class_weight`` turned into sample weights) as the loss does. This module
imports only public Keras and nothing of ablab: the ``model.fit`` workers load it from its file
under any backend, in an interpreter that has not imported ablab.
"""

from __future__ import annotations

from typing import Any

import keras

DATA_LOSS = "data_loss"
"""``ablab.study.keras_names.DATA_LOSS``, repeated: this module must not import ablab (the
model.fit workers run without it; tests/test_metric_choice.py checks the two agree)."""


def _resolve(identifier: Any, y_true: Any, y_pred: Any) -> keras.losses.Loss:
    """The loss object ``compile`` builds for ``identifier`` (Keras' ``get_loss``: a name or
    function is wrapped in ``LossFunctionWrapper``; "crossentropy" / "ce" picks binary,
    sparse or categorical cross-entropy from the shapes)."""
    if isinstance(identifier, keras.losses.Loss):
        return identifier
    if isinstance(identifier, dict):
        return keras.losses.get(identifier)
    if isinstance(identifier, str) and identifier.lower() in ("crossentropy", "ce"):
        binary = y_pred.shape[-1] == 1
        sparse = (len(y_true.shape) < len(y_pred.shape) or y_true.shape[-1] == 1) and not binary
        fn: Any = (
            keras.losses.binary_crossentropy
            if binary
            else keras.losses.sparse_categorical_crossentropy
            if sparse
            else keras.losses.categorical_crossentropy
        )
    else:
        fn = keras.losses.get(identifier)
    if isinstance(fn, keras.losses.Loss):
        return fn
    name = identifier if isinstance(identifier, str) else getattr(fn, "__name__", "loss")
    return _FunctionLoss(fn, name=name)


def _same_rank(a: Any, b: Any) -> tuple[Any, Any]:
    """Keras' ``squeeze_or_expand_to_same_rank``: where the ranks differ by one and the longer
    one ends in 1, expand a rank-1 partner or squeeze that trailing 1."""
    ra, rb = len(a.shape), len(b.shape)
    if ra == rb + 1 and a.shape[-1] == 1:
        return (a, keras.ops.expand_dims(b, -1)) if rb == 1 else (keras.ops.squeeze(a, -1), b)
    if rb == ra + 1 and b.shape[-1] == 1:
        return (keras.ops.expand_dims(a, -1), b) if ra == 1 else (a, keras.ops.squeeze(b, -1))
    return a, b


class _FunctionLoss(keras.losses.Loss):
    """A loss function as ``compile`` wraps it (Keras' ``LossFunctionWrapper``, not public):
    targets and predictions brought to one rank, the function, then ``Loss``'s reduction."""

    def __init__(self, fn: Any, name: str) -> None:
        super().__init__(name=name)
        self.fn = fn

    def call(self, y_true: Any, y_pred: Any) -> Any:
        return self.fn(*_same_rank(y_true, y_pred))


@keras.saving.register_keras_serializable(package="ablab")
class DataLoss(keras.metrics.Mean):
    """The compiled loss without regularisation penalties, as a metric named ``data_loss``.

    ``loss``: what ``compile(loss=...)`` was given -- a name, a ``keras.losses.Loss`` or its
    config dict.
    """

    def __init__(self, loss: Any, name: str = DATA_LOSS, dtype: Any = None) -> None:
        super().__init__(name=name, dtype=dtype)
        self._direction = "down"  # a loss: EarlyStopping's mode "auto" minimizes it
        self._identifier = loss
        self._loss: keras.losses.Loss | None = None

    def update_state(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> None:
        """Add one batch: the loss of ``y_pred`` (its own reduction, with the sample weights),
        weighted by the batch's rows like Keras' loss tracker."""
        if self._loss is None:
            self._loss = _resolve(self._identifier, y_true, y_pred)
        value = keras.ops.cast(self._loss(y_true, y_pred, sample_weight), self.dtype)
        super().update_state(value, sample_weight=keras.ops.shape(y_pred)[0])

    def get_config(self) -> dict[str, Any]:
        """Serializable: the loss as a name or a Keras loss config."""
        loss = self._identifier
        if isinstance(loss, keras.losses.Loss):
            loss = keras.losses.serialize(loss)
        return {"loss": loss, "name": self.name, "dtype": self.dtype}
