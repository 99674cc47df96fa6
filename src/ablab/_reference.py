"""The reference engine: plain Keras ``model.fit`` for one seed, from the engine's initial weights.

Used to check the vectorized engine (fidelity) and, later, other backends. With
``shuffle=False`` it is literally ``model.fit``; with ``shuffle=True`` it feeds the
engine's own per-epoch permutation to a ``train_on_batch`` loop (Keras draws its
shuffle order from numpy's global RNG, which cannot be shared), aggregating the
epoch loss the way ``fit``'s loss tracker does (batch-size-weighted mean of the
pre-update batch losses) and validating with ``evaluate`` at each epoch end.
"""

from __future__ import annotations

import keras
import numpy as np

from ablab._data import Split
from ablab._engine import VariantProgram, epoch_permutation


def fresh_model(program: VariantProgram, seed_id: int) -> keras.Model:
    """A new, compiled copy of the program's model holding seed ``seed_id``'s initial weights."""
    prepared = program.prepared
    model = keras.models.clone_model(prepared.model)
    train = prepared.train
    model.compile(
        optimizer=keras.optimizers.get(train.optimizer_config()),
        loss=train.loss,
        metrics=list(train.metrics),
    )
    tv, ntv = program.initial_weights(np.asarray([seed_id]))
    for var, value in zip(model.trainable_variables, tv, strict=True):
        var.assign(value[0])
    for var, value in zip(model.non_trainable_variables, ntv, strict=True):
        var.assign(value[0])
    return model


def _weighted_epoch(batch_logs: list[dict[str, float]], sizes: list[int]) -> dict[str, float]:
    w = np.asarray(sizes, dtype=np.float64)
    return {k: float(np.dot([b[k] for b in batch_logs], w) / w.sum()) for k in batch_logs[0]}


def reference_history(program: VariantProgram, seed_id: int) -> dict[str, np.ndarray]:
    """``model.fit``'s History for seed ``seed_id``: {name: (epochs,)} like the engine's rows."""
    model = fresh_model(program, seed_id)
    lay = program.layout
    sp: Split = program.split
    if not lay.shuffle:
        # Literally fit on all rows with the study's validation_split: Keras cuts it itself.
        x_all = sp.x_train if sp.x_val is None else np.concatenate([sp.x_train, sp.x_val])
        y_all = sp.y_train if sp.y_val is None else np.concatenate([sp.y_train, sp.y_val])
        hist = model.fit(
            x_all,
            y_all,
            epochs=lay.epochs,
            batch_size=lay.batch_size,
            validation_split=program.prepared.train.validation_split,
            validation_batch_size=lay.val_batch_size,
            shuffle=False,
            verbose=0,
        )
        return {k: np.asarray(v, dtype=np.float64) for k, v in hist.history.items()}

    rows: dict[str, list[float]] = {}
    for epoch in range(lay.epochs):
        perm = np.asarray(epoch_permutation(seed_id, epoch, lay.n_train))
        x, y = sp.x_train[perm], sp.y_train[perm]
        logs, sizes = [], []
        for start in range(0, lay.n_train, lay.batch_size):
            xb, yb = x[start : start + lay.batch_size], y[start : start + lay.batch_size]
            logs.append(model.train_on_batch(xb, yb, return_dict=True))
            sizes.append(len(xb))
        epoch_logs = _weighted_epoch(logs, sizes)
        if sp.x_val is not None:
            val = model.evaluate(
                sp.x_val, sp.y_val, batch_size=lay.val_batch_size, verbose=0, return_dict=True
            )
            epoch_logs.update({f"val_{k}": float(v) for k, v in val.items()})
        for k, v in epoch_logs.items():
            rows.setdefault(k, []).append(v)
    return {k: np.asarray(v, dtype=np.float64) for k, v in rows.items()}
