"""Keras behind one door: the backend check, and every private Keras attribute or ``keras.src``
import ablab relies on. A Keras upgrade is an audit of this file (and its test,
tests/test_architecture.py), not of the engine.

Tested range: ``keras>=3.15.1,<3.16`` (pinned in pyproject.toml). What is used and why:

* ``Model._flatten_layers`` -- every layer, nested ones included, in a stable order (the
  engine keys initial weights and probes by it);
* ``Layer._trainable_variables`` / ``_non_trainable_variables`` -- a layer's *own* variables,
  without those of nested layers;
* ``Layer._seed_generators`` -- the RNG state of Dropout-like layers (per-seed keys);
* ``Variable._initializer`` -- the initializer a variable was built with (initial weights
  drawn vectorized for many seeds without rebuilding the model);
* ``Model._symbolic_build`` -- builds a subclassed model from example data as ``fit`` does;
* ``Trainer._update_metrics_variables`` -- the stateless metric update of ``train_step``;
* ``EarlyStopping._set_monitor_op`` / ``monitor_op`` -- whether early stopping minimizes its
  monitored value (Keras' own rule, from the metric's direction);
* ``Adam._get_variable_index`` / ``_momentums`` / ``_velocities`` -- a variable's moment
  slots; ``ablab.engine.lowering`` re-states ``Adam.update_step`` (Keras 3.15's, without
  amsgrad) with its elementwise update on the engine's kernel;
* ``keras.src.backend.jax.nn`` (``conv``, ``max_pool``, ``average_pool``, ``moments`` --
  the last with the signature ``moments(x, axes, keepdims, synchronized)``, which
  BatchNormalization's ``_moments`` calls through ``keras.ops.moments``) and
  ``keras.src.backend.jax.numpy`` (``matmul``) -- the functions ``keras.ops`` dispatches to
  at call time; ``ablab.engine.lowering`` wraps them (the wrapper
  calls Keras' own unless the engine is tracing with its lowerings);
* ``keras.src.backend.common`` (``global_state``'s list of uninitialized variables,
  ``initialize_all_variables``) and ``Variable._initialize`` -- variables built in a
  ``StatelessScope`` stay unallocated until we say so (a model too big for the memory budget
  is refused from its shapes), and then hold zeros instead of running their initializers;
* ``keras.src.trainers.data_adapters`` (``array_slicing`` -- ``fit``'s validation split;
  ``data_adapter_utils`` -- ``fit``'s unpacking of ``(x, y, sample_weight)``),
  ``keras.src.initializers.random_initializers.RandomInitializer``,
  ``keras.src.backend`` and ``keras.src.utils.naming.to_snake_case``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax
import jax.numpy as jnp
import keras
import numpy as np

if keras.backend.backend() != "jax":  # pragma: no cover - depends on the caller's process
    msg = (
        f"ablab's engine runs Keras on the JAX backend, but Keras was already loaded with "
        f"the {keras.backend.backend()!r} backend. Set KERAS_BACKEND=jax before importing "
        f"keras (or import ablab first)."
    )
    raise ImportError(msg)

from keras.src import backend as keras_backend
from keras.src.backend.common import global_state
from keras.src.backend.common.stateless_scope import in_stateless_scope
from keras.src.backend.common.variables import initialize_all_variables
from keras.src.initializers.random_initializers import RandomInitializer
from keras.src.trainers.data_adapters import array_slicing, data_adapter_utils
from keras.src.utils.naming import to_snake_case

TESTED_RANGE = ">=3.15.1,<3.16"

__all__ = [
    "TESTED_RANGE",
    "RandomInitializer",
    "array_slicing",
    "data_adapter_utils",
    "deferred_variables",
    "early_stopping_minimizes",
    "flatten_layers",
    "initializer_of",
    "keras",
    "keras_backend",
    "keras_backend_nn",
    "keras_backend_numpy",
    "own_variables",
    "seed_generators",
    "symbolic_build",
    "to_snake_case",
    "update_metrics_variables",
]


def flatten_layers(
    model: keras.Layer, *, include_self: bool = True, recursive: bool = True
) -> Iterator[keras.Layer]:
    """Every layer of ``model`` (nested ones when ``recursive``), in Keras' own stable order."""
    return model._flatten_layers(include_self=include_self, recursive=recursive)


def own_variables(layer: keras.Layer) -> list[keras.Variable]:
    """The variables ``layer`` itself creates (trainable, then not), not its sublayers'."""
    return list(layer._trainable_variables) + list(layer._non_trainable_variables)


def seed_generators(layer: keras.Layer) -> list[Any]:
    """The layer's ``keras.random.SeedGenerator`` objects (their ``.state`` is the RNG state)."""
    return list(layer._seed_generators)


def initializer_of(variable: keras.Variable) -> Any:
    """The initializer ``variable`` was created with (None once it holds a value)."""
    return variable._initializer


def keras_backend_nn() -> Any:
    """The module ``keras.ops.conv`` / ``max_pool`` / ``average_pool`` / ``moments`` call
    into at call time (``keras.src.backend.nn``: the JAX backend's ``nn``)."""
    return keras_backend.nn


def keras_backend_numpy() -> Any:
    """The module ``keras.ops.matmul`` calls into at call time (the JAX backend's ``numpy``)."""
    return keras_backend.numpy


def adam_slots(optimizer: keras.optimizers.Adam, variable: keras.Variable) -> tuple[Any, Any]:
    """Adam's first and second moment variables for ``variable`` (``_momentums`` /
    ``_velocities`` at ``_get_variable_index``, as ``Adam.update_step`` finds them)."""
    index = optimizer._get_variable_index(variable)
    return optimizer._momentums[index], optimizer._velocities[index]


def symbolic_build(model: keras.Model, data_batch: tuple[Any, Any]) -> None:
    """Build ``model`` (and its compiled metrics) from one example batch, as ``fit`` does."""
    model._symbolic_build(data_batch=data_batch)


def early_stopping_minimizes(model: keras.Model, monitor: str, mode: str) -> bool:
    """Does ``keras.callbacks.EarlyStopping(monitor, mode=mode)`` on ``model`` (compiled and
    built) look for a lower value? Keras' own rule (``EarlyStopping._set_monitor_op``: ``loss``
    and metrics whose direction is down minimize); ValueError where Keras cannot tell."""
    callback = keras.callbacks.EarlyStopping(monitor=monitor, mode=mode)
    callback.set_model(model)
    callback._set_monitor_op()
    return bool(callback.monitor_op is keras.ops.less)


def update_metrics_variables(model: keras.Model, *args: Any) -> tuple[Any, Any]:
    """``Trainer._update_metrics_variables(metrics_variables, unscaled_loss, x, y, y_pred,
    sample_weight)``: the stateless metric update -> ``(logs, new metrics variables)``."""
    return model._update_metrics_variables(*args)


_UNINITIALIZED = "uninitialized_variables"


@contextmanager
def deferred_variables() -> Iterator[set[int]]:
    """A ``keras.StatelessScope`` whose variables are allocated only on a clean exit, and are
    dropped, never allocated, on an exception. Inside, every variable has its shape and its
    initializer but no value.

    Yields a set for the ``id`` of every variable whose value the engine draws itself (the
    model's, ``ablab.engine.initial_state``): on exit those hold zeros, not their
    initializers' draws -- drawing them ran one small JAX program per initializer and shape,
    ~0.2 s per variant compiled on a cold start (bench/latency.py). Any other variable
    created inside (one a layer holds without tracking it) is initialized Keras' way."""
    outer = in_stateless_scope()
    pending = global_state.get_global_attribute(_UNINITIALIZED, [], set_to_default=True)
    before = len(pending)
    redrawn: set[int] = set()
    try:
        with keras.StatelessScope(initialize_variables=False):
            yield redrawn
    except BaseException:
        if not outer:
            del global_state.get_global_attribute(_UNINITIALIZED)[before:]
        raise
    if not outer:
        collection = global_state.get_global_attribute(_UNINITIALIZED)
        ours = [v for v in collection[before:] if id(v) in redrawn]
        collection[before:] = [v for v in collection[before:] if id(v) not in redrawn]
        for v in ours:  # zeros put on the device: no program to compile, whatever the shape
            v._initialize(jax.device_put(np.zeros(v.shape, dtype=jnp.dtype(v.dtype))))
            v._initializer = None  # as Keras leaves a variable that holds its value
        initialize_all_variables()  # the others: Keras' own way
