"""The reference engine: plain Keras ``model.fit`` for one seed, from the engine's initial weights.

Used to check the vectorized engine (fidelity). With ``shuffle=False`` it is literally
``model.fit(validation_split=...)``; with ``shuffle=True`` the engine's own per-epoch
permutations drive one ``fit`` call per epoch (``ablab.engine.fit_worker.fit_history``).
"""

from __future__ import annotations

import keras
import numpy as np

from ablab._keras import flatten_layers, seed_generators
from ablab.engine.fit_worker import fit_history
from ablab.engine.model import compile_losses
from ablab.engine.program import VariantProgram, epoch_permutation


def fit_arguments(program: VariantProgram) -> dict[str, object]:
    """The ``fit`` arguments of a program's variant."""
    lay = program.layout
    return {
        "epochs": lay.epochs,
        "batch_size": lay.batch_size,
        "validation_split": program.prepared.train.validation_split,
        "validation_batch_size": lay.val_batch_size,
        "shuffle": lay.shuffle,
    }


def all_rows(program: VariantProgram) -> tuple[np.ndarray, np.ndarray]:
    """Training rows then validation rows: what ``fit(validation_split=...)`` is given."""
    sp = program.split
    if sp.x_val is None:
        return sp.x_train, sp.y_train
    return np.concatenate([sp.x_train, sp.x_val]), np.concatenate([sp.y_train, sp.y_val])


def permutations(program: VariantProgram, seed_id: int) -> np.ndarray | None:
    """(epochs, n_train) training-row orders of ``seed_id`` (None without shuffling)."""
    lay = program.layout
    if not lay.shuffle:
        return None
    return np.stack(
        [np.asarray(epoch_permutation(seed_id, e, lay.n_train)) for e in range(lay.epochs)]
    )


def initial_weights_for_keras(program: VariantProgram, seed_id: int) -> list[np.ndarray]:
    """Seed ``seed_id``'s initial values in ``model.weights`` order (what ``set_weights`` takes)."""
    tv, ntv = program.initial_weights(np.asarray([seed_id]))
    return _in_weights_order(program, tv, ntv)


def _in_weights_order(
    program: VariantProgram, tv: list[np.ndarray], ntv: list[np.ndarray]
) -> list[np.ndarray]:
    """One seed's (trainable, non-trainable) initial values, each (1, *shape), in
    ``model.weights`` order."""
    model = program.prepared.model
    by_id = {id(v): a[0] for v, a in zip(model.trainable_variables, tv, strict=True)}
    by_id.update({id(v): a[0] for v, a in zip(model.non_trainable_variables, ntv, strict=True)})
    return [by_id[id(v)] for v in model.weights]


def fresh_model(program: VariantProgram, seed_id: int) -> keras.Model:
    """A new, compiled copy of the program's model holding seed ``seed_id``'s initial weights."""
    train = program.prepared.train
    model = keras.models.clone_model(program.prepared.model)
    model.compile(optimizer=keras.optimizers.get(train.optimizer_config()), **compile_losses(train))
    tv, ntv = program.initial_weights(np.asarray([seed_id]))
    model.set_weights(_in_weights_order(program, tv, ntv))
    _set_seed_states(program, model, ntv)
    return model


def _set_seed_states(program: VariantProgram, clone: keras.Model, ntv: list[np.ndarray]) -> None:
    """Give the clone's RNG states (Dropout, noise layers) the seed's values from the engine's
    non-trainable initial values ``ntv`` -- they are not among ``model.weights`` -- so its
    masks are the engine's."""
    model = program.prepared.model
    index = {id(v): i for i, v in enumerate(model.non_trainable_variables)}
    ours = [sg.state for layer in flatten_layers(model) for sg in seed_generators(layer)]
    theirs = [sg.state for layer in flatten_layers(clone) for sg in seed_generators(layer)]
    for mine, other in zip(ours, theirs, strict=True):
        if id(mine) in index:
            other.assign(ntv[index[id(mine)]][0])


def reference_history(program: VariantProgram, seed_id: int) -> dict[str, np.ndarray]:
    """``model.fit``'s History for seed ``seed_id``: {name: (epochs,)} like the engine's rows."""
    x, y = all_rows(program)
    hist = fit_history(
        fresh_model(program, seed_id), x, y, fit_arguments(program), permutations(program, seed_id)
    )
    return {k: np.asarray(v, dtype=np.float64) for k, v in hist.items()}
