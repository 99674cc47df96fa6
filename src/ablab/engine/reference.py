"""The reference engine: plain Keras ``model.fit`` for one seed, from the engine's initial weights.

Used to check the vectorized engine (fidelity). With ``shuffle=False`` it is literally
``model.fit(validation_split=...)``; with ``shuffle=True`` the engine's own per-epoch
permutations drive one ``fit`` call per epoch (``ablab.engine.fit_worker.fit_history``).
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import keras
import numpy as np

from ablab._keras import flatten_layers, seed_generators
from ablab.engine.fit_worker import fit_history
from ablab.engine.model import USER_MODULE_PREFIX, compile_losses, dtype_policy
from ablab.engine.program import VariantProgram, epoch_permutation

# Top-level packages whose objects need no help to deserialize (Keras' own), or that the
# model.fit worker must not import (ablab: its engine runs on JAX only). Their functions a
# layer holds are not the user's either (numpy, jax, ...).
_NOT_USER = {"builtins", "keras", "ablab", "numpy", "jax", "jaxlib", "torch", "tensorflow"}


@dataclass(frozen=True)
class UserObject:
    """One of the user's classes or functions a model's config names, and where a fresh
    interpreter (the ``model.fit`` worker, another Keras backend) imports it from."""

    obj: Any
    module: str
    attr: str
    """Its ``__qualname__`` within ``module``."""
    file: str | None
    """A study's own file (``"file.py:Class"``), loaded as ``module`` like the engine does;
    None: ``module`` is imported by name."""
    sys_path: str | None
    """The folder ``module``'s top-level package is imported from, here (None: unknown)."""
    problem: str | None = None
    """Why a fresh interpreter cannot import it (defined in ``__main__`` or in a function)."""

    def to_job(self) -> dict[str, Any]:
        """What the worker needs to load it (``fit_worker.load_user_objects``)."""
        return {
            "module": self.module,
            "attr": self.attr,
            "file": self.file,
            "sys_path": self.sys_path,
        }


def _is_user(module: str | None) -> bool:
    top = (module or "builtins").split(".")[0]
    return top not in _NOT_USER and top not in sys.stdlib_module_names


def _user_object(obj: Any) -> UserObject:
    module_name, attr = obj.__module__, obj.__qualname__
    module = sys.modules.get(module_name)
    file = getattr(module, "__file__", None)
    found: Any = module
    for part in attr.split("."):
        found = getattr(found, part, None)
    problem = None
    if module_name == "__main__":
        problem = "it is defined in __main__ (a script or notebook)"
    elif found is not obj:
        problem = f"{module_name}.{attr} does not name it (defined inside a function?)"
    if file is not None and module_name.startswith(USER_MODULE_PREFIX):
        return UserObject(obj, module_name, attr, str(file), None, problem)
    root = None
    if file is not None:  # a.b.c in ROOT/a/b/c.py (or ROOT/a/b/c/__init__.py)
        path = Path(file)
        path = path.parent if path.stem == "__init__" else path
        depth = len(module_name.split("."))
        root = str(path.parents[depth - 1]) if len(path.parents) >= depth else None
    return UserObject(obj, module_name, attr, None, root, problem)


def _held(values: Any) -> list[Any]:
    """A layer's attribute values, those in lists, tuples and dicts included."""
    out: list[Any] = []
    for value in values:
        if isinstance(value, dict):
            out += value.values()
        elif isinstance(value, (list, tuple)):
            out += value
        else:
            out.append(value)
    return out


def user_objects(model: keras.Model) -> list[UserObject]:
    """The user's classes and functions ``model``'s config names: every layer class (nested
    ones and the model's own class included) that is not Keras', and the functions and
    objects with a config (activations, initializers, regularizers, ...) its layers hold.

    In this process they are all loaded (the engine built the model); a fresh interpreter
    deserializing the model's JSON must load them first -- see ``fit_worker``.
    """
    found: dict[int, UserObject] = {}
    for layer in flatten_layers(model, include_self=True):
        if _is_user(type(layer).__module__):
            found.setdefault(id(type(layer)), _user_object(type(layer)))
        for item in _held(vars(layer).values()):
            if inspect.isfunction(item) and _is_user(item.__module__):
                ref = _user_object(item)
            elif (
                not isinstance(item, (type, keras.Layer))
                and hasattr(item, "get_config")
                and _is_user(type(item).__module__)
            ):
                ref = _user_object(type(item))
            else:
                continue
            if ref.problem is None:  # maybe not in the config at all: not worth a skip
                found.setdefault(id(ref.obj), ref)
    return list(found.values())


def worker_problem(model: keras.Model) -> str | None:
    """Why a fresh interpreter cannot deserialize ``model`` (None: it can, as far as ablab
    can tell)."""
    for ref in user_objects(model):
        if ref.problem is not None:
            name = getattr(ref.obj, "__name__", repr(ref.obj))
            return (
                f"the model.fit worker (a fresh interpreter) cannot import class {name}: "
                f"{ref.problem}; define it at the top level of a file beside the study "
                f'(layer = "file.py:{name}") or of an importable module'
            )
    return None


def custom_objects(model: keras.Model) -> dict[str, Any]:
    """``{registered name: class or function}`` of the user's objects ``model`` names (for
    ``keras.saving.custom_object_scope``)."""
    return {keras.saving.get_registered_name(r.obj): r.obj for r in user_objects(model)}


def fit_arguments(program: VariantProgram) -> dict[str, object]:
    """The ``fit`` arguments of a program's variant."""
    lay = program.layout
    train = program.prepared.train
    out: dict[str, object] = {
        "epochs": lay.epochs,
        "batch_size": lay.batch_size,
        "validation_split": train.validation_split,
        "validation_batch_size": lay.val_batch_size,
        "shuffle": lay.shuffle,
    }
    if train.steps_per_epoch is not None:
        out["steps_per_epoch"] = train.steps_per_epoch
    if train.class_weight is not None:  # fit turns them into the training rows' weights
        out["class_weight"] = dict(train.class_weight)
    if train.early_stopping is not None:
        spec = train.early_stopping.model_dump()
        spec.pop("verbose")
        out["early_stopping"] = spec
    if train.reduce_lr_on_plateau is not None:
        spec = train.reduce_lr_on_plateau.model_dump()
        spec.pop("verbose")
        out["reduce_lr_on_plateau"] = spec
    if train.dtype_policy != "float32":
        out["dtype_policy"] = train.dtype_policy
    return out


def validation_data(program: VariantProgram) -> bool:
    """Are the validation rows a source of their own (``fit(validation_data=...)``), not the
    ``validation_split`` cut of the rows ``all_rows`` gives?"""
    return program.split.x_val is not None and not program.prepared.train.validation_split


def fit_inputs(program: VariantProgram) -> dict[str, np.ndarray | None]:
    """What ``fit`` is given besides the History's arguments: ``x``, ``y`` (``all_rows``),
    ``sw`` (their sample weights unless they come from ``class_weight``, which fit derives
    itself), and with ``validation_data`` the separate ``x_val``, ``y_val``, ``sw_val``."""
    sp = program.split
    own = program.prepared.train.class_weight is None
    if validation_data(program):
        return {
            "x": sp.x_train,
            "y": sp.y_train,
            "sw": sp.sw_train if own else None,
            "x_val": sp.x_val,
            "y_val": sp.y_val,
            "sw_val": sp.sw_val,
        }
    x, y = all_rows(program)
    sw = None
    if own and sp.sw_train is not None:
        sw = sp.sw_train if sp.sw_val is None else np.concatenate([sp.sw_train, sp.sw_val])
    return {"x": x, "y": y, "sw": sw}


def all_rows(program: VariantProgram) -> tuple[np.ndarray, np.ndarray]:
    """Training rows then validation rows: what ``fit(validation_split=...)`` is given."""
    sp = program.split
    if sp.x_val is None:
        return sp.x_train, sp.y_train
    both = lambda a, b: jax.tree.map(lambda u, v: np.concatenate([u, v]), a, b)  # noqa: E731
    return both(sp.x_train, sp.x_val), both(sp.y_train, sp.y_val)


def permutations(program: VariantProgram, seed_id: int) -> np.ndarray | None:
    """(epochs, n_train) training-row orders of ``seed_id`` (None without shuffling)."""
    lay = program.layout
    if not lay.shuffle:
        return None
    out = []
    for e in range(lay.epochs):  # with steps_per_epoch: the epoch's window of its pass
        pass_index, first = lay.epoch_window(e)
        perm = np.asarray(epoch_permutation(seed_id, pass_index, lay.n_train))
        size = lay.steps_per_epoch * lay.batch_size
        out.append(perm[first * lay.batch_size :][:size])
    return np.stack(out)


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
    original = program.prepared.model
    with (
        keras.saving.custom_object_scope(custom_objects(original)),  # custom activations, ...
        dtype_policy(train.dtype_policy),
    ):
        model = keras.models.clone_model(original)
    model.compile(
        optimizer=keras.optimizers.get(train.optimizer_config()), **compile_losses(train, model)
    )
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
    inputs = fit_inputs(program)
    validation = None
    if "x_val" in inputs:
        validation = (inputs["x_val"], inputs["y_val"], inputs["sw_val"])
    fit = fit_arguments(program)
    x, y = inputs["x"], inputs["y"]
    assert x is not None and y is not None
    hist = fit_history(
        fresh_model(program, seed_id),
        x,
        y,
        fit,
        permutations(program, seed_id),
        sample_weight=inputs["sw"],
        validation=validation,  # type: ignore[arg-type]
    )
    out = {k: np.asarray(v, dtype=np.float64) for k, v in hist.items()}
    if "stopped_epoch" in fit:  # as the engine reports it (ablab.engine.program.STOPPED_EPOCH)
        out["stopped_epoch"] = np.asarray(fit["stopped_epoch"], dtype=np.int32)
    return out
