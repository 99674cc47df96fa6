"""Deliberately faulty pieces (fault injection): checks that cannot fail are worthless."""

from __future__ import annotations

from typing import Any

import keras
from keras import ops


class GradScale(keras.layers.Layer):
    """The identity going forward, but the gradient flowing back is scaled by ``scale``.

    The same class of bug as the seed question's TF 1.14 Activation('linear'): a layer that
    should change nothing changes training.
    """

    def __init__(self, scale: float = 1.01, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.scale = scale

    def call(self, x: Any) -> Any:
        scale = self.scale

        @ops.custom_gradient
        def forward(t: Any) -> tuple[Any, Any]:
            def grad(*args: Any, upstream: Any = None) -> Any:
                upstream = args[0] if upstream is None else upstream
                return upstream * scale

            return t, grad

        return forward(x)

    def get_config(self) -> dict:
        return {**super().get_config(), "scale": self.scale}


class PerturbAfter(keras.callbacks.Callback):
    """Multiplies the first layer's kernel by (1 + eps) once, after ``step`` optimizer steps.

    Run inside a backend worker (tests pass it for one backend only) it makes that backend's
    training deviate from the engine's, as a backend bug would.
    """

    def __init__(self, step: int = 5, eps: float = 1e-3) -> None:
        super().__init__()
        self.step, self.eps, self.seen = step, eps, 0

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.seen += 1
        if self.seen == self.step:
            kernel = self.model.layers[0].kernel
            kernel.assign(kernel * (1.0 + self.eps))
