"""Functional model builders for the layer-breadth tests (``[model] builder`` targets)."""

from __future__ import annotations

import jax
import keras
import numpy as np


@keras.saving.register_keras_serializable(package="ablab_tests")
class Threshold(keras.layers.Layer):
    """``keras.activations.threshold`` needs arguments an ``Activation`` layer cannot pass."""

    def call(self, x: keras.KerasTensor) -> keras.KerasTensor:
        return keras.activations.threshold(x, threshold=0.0, default_value=0.0)


@keras.saving.register_keras_serializable(package="ablab_tests")
class GLU(keras.layers.Layer):
    """``keras.activations.glu`` halves the last axis; ``Activation`` declares the same shape
    (Keras 3.15), so a functional model needs this wrapper to know its real output shape."""

    def call(self, x: keras.KerasTensor) -> keras.KerasTensor:
        return keras.activations.glu(x)

    def compute_output_shape(self, shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        return (*shape[:-1], shape[-1] // 2)


def activation_names() -> list[str]:
    """Every activation ``keras.activations`` exports (Keras 3.15: 32)."""
    skip = {"get", "serialize", "deserialize"}
    return sorted(
        n
        for n in dir(keras.activations)
        if not n.startswith("_") and n not in skip and callable(getattr(keras.activations, n))
    )


def all_activations(features: int = 12, outputs: int = 12) -> keras.Model:
    """Dense(4), then every Keras activation as a parallel branch, concatenated, Dense."""
    x = keras.Input(shape=(features,))
    h = keras.layers.Dense(4)(x)
    special = {"threshold": Threshold, "glu": GLU}
    branches = [
        special[name]()(h) if name in special else keras.layers.Activation(name)(h)
        for name in activation_names()
    ]
    out = keras.layers.Dense(outputs)(keras.layers.Concatenate()(branches))
    return keras.Model(x, out)


def add_concat(features: int = 12, outputs: int = 12) -> keras.Model:
    """Two Dense branches added, concatenated with the input (a skip), Dense."""
    x = keras.Input(shape=(features,))
    a = keras.layers.Dense(8)(x)
    b = keras.layers.Dense(8, activation="tanh")(x)
    s = keras.layers.Add()([a, b])
    out = keras.layers.Dense(outputs)(keras.layers.Concatenate()([s, x]))
    return keras.Model(x, out)


class HostScale(keras.layers.Layer):
    """Doubles its input on the host through ``jax.pure_callback`` without a vmap rule: fine
    under ``jit`` (so ``model.fit`` runs it), not under ``vmap`` (the vectorized engine)."""

    def call(self, x: keras.KerasTensor) -> keras.KerasTensor:
        return _host_double(x)


@jax.custom_jvp
def _host_double(x: jax.Array) -> jax.Array:
    shape = jax.ShapeDtypeStruct(x.shape, x.dtype)
    return jax.pure_callback(lambda a: np.asarray(a) * 2, shape, x)


@_host_double.defjvp
def _host_double_jvp(primals: tuple, tangents: tuple) -> tuple:
    return _host_double(primals[0]), 2 * tangents[0]
