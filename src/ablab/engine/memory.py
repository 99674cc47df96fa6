"""What one seed costs in memory, known from shapes alone -- so that a study whose single seed
does not fit ``[engine] memory_budget_mb`` is refused before its first allocation, and chunks
are cut to the budget.

The estimate counts, per seed, float32 elements of: the weights (x4: weights, gradients, the
updated copy and the initial weights the engine keeps), the optimizer state (its real slots per
weight: Adam 2, RMSprop 1, plain SGD 0), the activations of one batch (x4: forward values,
their gradients and the fusions' temporaries), the per-seed shuffled copy of the training rows,
the logs of every step, and the probes. Measured against XLA's buffer assignment of the
compiled program (``tests/test_memory.py``): 1.4-1.9x on MLP, CNN and Dropout models, ~4x
on the seed study's 244-weight autoencoder, where per-batch activations dominate a tiny total;
never below it. Conservative on purpose: the budget is a promise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

BYTES = 4  # float32


@dataclass(frozen=True)
class Footprint:
    """Elements (float32) one seed holds inside the compiled program, by kind."""

    weights: int
    optimizer: int
    activations: int
    data: int
    logs: int
    probes: int = 0

    @property
    def bytes(self) -> int:
        return BYTES * (
            self.weights + self.optimizer + self.activations + self.data + self.logs + self.probes
        )

    def describe(self) -> str:
        """``weights 9.6 GB, optimizer state 19 GB, ...`` (the non-zero parts)."""
        parts = {
            "weights and gradients": self.weights,
            "optimizer state": self.optimizer,
            "activations": self.activations,
            "shuffled rows": self.data,
            "logs": self.logs,
            "probes": self.probes,
        }
        return ", ".join(f"{k} {human_bytes(BYTES * v)}" for k, v in parts.items() if v)


def human_bytes(n: float) -> str:
    """``1.5 GiB``, ``820 KiB``: binary units, 2 significant digits at least."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError  # pragma: no cover


def _elements(shape: Any) -> int:
    return math.prod(int(d) for d in shape if d is not None)


def activation_elements(model: keras.Model, x_row: tuple[int, ...]) -> int:
    """Output elements per row of every layer of ``model`` (at least the input's), plus the
    im2col patches of each convolution the engine lowers (``ablab.engine.lowering``)."""
    from ablab.engine import lowering

    patches = "conv" in lowering.enabled()
    acts = 0
    for layer in model.layers:
        try:
            shape = layer.output.shape
        except (AttributeError, ValueError):
            continue
        acts += _elements(shape[1:])
        if patches:
            acts += conv_patch_elements(layer)
    return max(acts, _elements(x_row))


def conv_patch_elements(layer: keras.Layer) -> int:
    """Per row, the im2col patch matrix of a convolution layer lowered as im2col + matmul:
    output positions x kernel window x input channels (kept for the kernel gradient); 0 for
    other layers."""
    kernel = getattr(layer, "kernel", None)
    size = getattr(layer, "kernel_size", None)
    if kernel is None or size is None or not isinstance(layer, keras.layers.Layer):
        return 0
    try:
        out = layer.output.shape
    except (AttributeError, ValueError):
        return 0
    n = len(size)
    if len(out) != n + 2 or len(kernel.shape) != n + 2:
        return 0
    channels_last = getattr(layer, "data_format", "channels_last") == "channels_last"
    spatial = out[1:-1] if channels_last else out[2:]
    return _elements(spatial) * _elements(kernel.shape[:-1])


def optimizer_slots(config: dict[str, Any]) -> float:
    """Optimizer state elements per weight element (Adam 2, RMSprop 1, SGD 0 or 1 with
    momentum), found by building the optimizer on a 7-element probe variable; 2 when the
    optimizer cannot be built here (the study's own check reports that error)."""
    try:  # not inside a StatelessScope: an optimizer makes its step counter with a value
        probe = keras.Variable(np.zeros((7,), "float32"))
        optimizer = keras.optimizers.get(config)
        optimizer.build([probe])
        elements = sum(_elements(v.shape) for v in optimizer.variables if v.shape == (7,))
    except Exception:
        return 2.0
    return elements / 7


def footprint(
    model: keras.Model,
    *,
    optimizer_elements: int,
    x_row: tuple[int, ...],
    y_row: tuple[int, ...],
    n_train: int,
    batch_size: int,
    val_batch_size: int,
    shuffle: bool,
    steps: int,
    probe_elements: int = 0,
    weighted: bool = False,
) -> Footprint:
    """One seed's :class:`Footprint` from shapes (the variables need not hold values yet).

    steps: optimizer steps of the whole run (epochs x steps per epoch). weighted: the rows
    carry sample weights (shuffled with them).
    """
    weights = sum(_elements(v.shape) for v in model.variables)
    acts = activation_elements(model, x_row)
    row = _elements(x_row) + _elements(y_row) + int(weighted)
    data = 2 * n_train * row if shuffle else 0
    return Footprint(
        weights=4 * weights,
        optimizer=optimizer_elements,
        activations=4 * acts * max(batch_size, val_batch_size),
        data=data,
        logs=16 * steps,
        probes=probe_elements,
    )


def trainable_elements(model: keras.Model) -> int:
    return sum(_elements(v.shape) for v in model.trainable_variables)
