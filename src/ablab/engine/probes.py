"""Probes: what the engine records besides the History, to explain *why* a variant differs.

Per optimizer step (every seed): for every layer with trainable weights, the sum of its
kernel (the seed answer's "Sum of weights" figure), the L2 norm of its weights and their L2
distance from the initial weights; and the global gradient norm. Per epoch, each where an
explanation uses it (each is an extra pass over rows, up to ~1.5x the training's cost on a
small CNN, bench/cnn_vs_fit.py):

* a model with BatchNormalization: the validation loss in training mode (BN using the
  batch's own statistics) beside fit's inference-mode val_loss, and for every BN layer how
  far its moving statistics have travelled towards the batch statistics of the full training
  set: ``progress = 1 - |moving - full| / |initial - full|`` (L2 over channels; NaN where
  ``|initial - full|`` is under 2 % of the statistic's own scale: nothing to travel), which
  for constant batches equals ``1 - momentum ** updates`` exactly
  (``ablab.analysis.explain.bn_diagnosis``, the report's BN figures);
* a model with an analytic optimum (affine under MSE: ``ablab.engine.model.linear_rank``):
  the training-set loss in inference mode, the final model's real train error that the
  optimum is compared with (``ablab.analysis.explain.optimum_gaps``).

Everything here runs inside the engine's traced program; arrays are one seed's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import keras

from ablab._keras import data_adapter_utils, flatten_layers, update_metrics_variables
from ablab.engine.model import PreparedModel, linear_rank

# The BN statistics probe runs the training rows through the layers before each BN layer
# in chunks of this many rows (memory per seed stays bounded however large the data).
BN_PROBE_ROWS = 4096


@dataclass
class _BNProbe:
    layer_id: str
    momentum: float
    submodel: keras.Model  # model input -> this BN layer's input
    sub_tv: list[int]
    sub_ntv: list[int]
    mean_index: int  # in model.non_trainable_variables
    var_index: int
    axis: int


@dataclass
class ProbeSpec:
    """Static facts about a model that the traced probe functions need."""

    layers: list[tuple[str, list[int], int]] = field(default_factory=list)
    """(layer stable id, indices of its trainable variables, index of its kernel)."""
    bn: list[_BNProbe] = field(default_factory=list)
    train_loss: bool = False
    """Record the training-set loss in inference mode (the model has an analytic optimum)."""


def make_probe_spec(prepared: PreparedModel, x_train: Any, y_train: Any) -> ProbeSpec:
    """Group trainable variables by layer, prepare BatchNormalization sub-models, and say
    whether the model has an analytic optimum (its training rows ``x_train`` / ``y_train``)."""
    model = prepared.model
    spec = ProbeSpec(train_loss=linear_rank(prepared, x_train, y_train) is not None)
    groups: dict[str, list[int]] = {}
    for i, vid in enumerate(prepared.trainable_ids):
        groups.setdefault(vid.rsplit("/", 1)[0], []).append(i)
    for layer_id, idx in groups.items():
        names = [prepared.trainable_ids[i].rsplit("/", 1)[1] for i in idx]
        kernel = idx[names.index("kernel")] if "kernel" in names else idx[0]
        spec.layers.append((layer_id, idx, kernel))
    tv_pos = {id(v): i for i, v in enumerate(model.trainable_variables)}
    ntv_pos = {id(v): i for i, v in enumerate(model.non_trainable_variables)}
    layer_ids = {}
    for vid, v in zip(prepared.non_trainable_ids, model.non_trainable_variables, strict=True):
        layer_ids[id(v)] = vid.rsplit("/", 1)[0]
    for layer in flatten_layers(model, include_self=False):
        if not isinstance(layer, keras.layers.BatchNormalization):
            continue
        try:
            sub = keras.Model(model.inputs, layer.input)
        except Exception:  # subclassed models have no graph to cut: no BN statistics probe
            continue
        spec.bn.append(
            _BNProbe(
                layer_id=layer_ids[id(layer.moving_mean)],
                momentum=float(layer.momentum),
                submodel=sub,
                sub_tv=[tv_pos[id(v)] for v in sub.trainable_variables],
                sub_ntv=[ntv_pos[id(v)] for v in sub.non_trainable_variables],
                mean_index=ntv_pos[id(layer.moving_mean)],
                var_index=ntv_pos[id(layer.moving_variance)],
                axis=int(layer.axis),
            )
        )
    return spec


def train_step_with_grads(
    model: keras.Model, state: tuple, data: tuple
) -> tuple[dict, tuple, list]:
    """``JAXTrainer.train_step`` (Keras 3.15) that also returns the gradients.

    The same calls in the same order as Keras' own train_step, so the trained weights are
    identical (tests assert the History with and without probes is bit-equal).
    """
    tv, ntv, ov, mv = state
    x, y, sample_weight = data_adapter_utils.unpack_x_y_sample_weight(data)
    grad_fn = jax.value_and_grad(model.compute_loss_and_updates, has_aux=True)
    (_, aux), grads = grad_fn(
        tv, ntv, mv, x, y, sample_weight, training=True, optimizer_variables=ov
    )
    unscaled_loss, y_pred, ntv, mv = aux
    tv, ov = model.optimizer.stateless_apply(ov, grads, tv)
    logs, mv = update_metrics_variables(model, mv, unscaled_loss, x, y, y_pred, sample_weight)
    return logs, (tv, ntv, ov, mv), grads


def train_mode_test_step(
    model: keras.Model, state: tuple, data: tuple, optimizer_variables: list
) -> tuple[dict, tuple]:
    """``JAXTrainer.test_step`` with ``training=True``: BN normalizes with the batch's own
    statistics (moving statistics are not kept), Dropout is active."""
    tv, ntv, mv = state
    x, y, sample_weight = data_adapter_utils.unpack_x_y_sample_weight(data)
    _, aux = model.compute_loss_and_updates(
        tv, ntv, mv, x, y, sample_weight, training=True, optimizer_variables=optimizer_variables
    )
    unscaled_loss, y_pred, _, mv = aux
    logs, mv = update_metrics_variables(model, mv, unscaled_loss, x, y, y_pred, sample_weight)
    return logs, (tv, ntv, mv)


def step_probes(spec: ProbeSpec, tv: list, tv0: list, grads: list) -> dict[str, jax.Array]:
    """Scalars after one optimizer step: per layer kernel_sum / norm / dist_init, grad_norm."""
    out = {}
    for layer_id, idx, kernel in spec.layers:
        out[f"{layer_id}/kernel_sum"] = jnp.sum(tv[kernel])
        out[f"{layer_id}/norm"] = jnp.sqrt(sum(jnp.sum(jnp.square(tv[i])) for i in idx))
        out[f"{layer_id}/dist_init"] = jnp.sqrt(
            sum(jnp.sum(jnp.square(tv[i] - tv0[i])) for i in idx)
        )
    out["grad_norm"] = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in grads))
    return out


def bn_probes(
    spec: ProbeSpec, tv: list, ntv: list, ntv0: list, x_train: jax.Array
) -> dict[str, jax.Array]:
    """Per BN layer: progress of moving mean / variance towards the full training set's batch
    statistics, and the ratio moving variance / full variance (median over channels)."""
    out = {}
    for bn in spec.bn:
        full_mean, full_var = _input_moments(bn, tv, ntv, x_train)
        for name, index, target in (
            ("mean", bn.mean_index, full_mean),
            ("var", bn.var_index, full_var),
        ):
            now, start = ntv[index], ntv0[index]
            dist = jnp.linalg.norm(now - target)
            travel = jnp.linalg.norm(start - target)
            # Where the data's statistic already sits at the initial value (e.g. standardized
            # inputs: mean 0, variance 1), there is no way to travel: progress is undefined
            # (NaN) rather than batch noise divided by almost nothing.
            scale = jnp.linalg.norm(jnp.sqrt(full_var) if name == "mean" else full_var)
            out[f"{bn.layer_id}/moving_{name}_progress"] = jnp.where(
                travel > 0.02 * scale, 1.0 - dist / jnp.maximum(travel, 1e-12), jnp.nan
            )
        out[f"{bn.layer_id}/moving_var_ratio"] = jnp.median(
            ntv[bn.var_index] / jnp.maximum(full_var, 1e-12)
        )
    return out


def _input_moments(bn: _BNProbe, tv: list, ntv: list, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean and (biased) variance per channel of ``bn``'s input over all rows of ``x``,
    in chunks of at most BN_PROBE_ROWS rows so memory does not grow with the data."""

    def moments(rows: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        acts, _ = bn.submodel.stateless_call(
            [tv[i] for i in bn.sub_tv], [ntv[i] for i in bn.sub_ntv], rows, training=False
        )
        axis = bn.axis % acts.ndim
        axes = tuple(a for a in range(acts.ndim) if a != axis)
        count = jnp.asarray(acts.size // acts.shape[axis], acts.dtype)
        return jnp.sum(acts, axis=axes), jnp.sum(jnp.square(acts), axis=axes), count

    n = x.shape[0]
    if n <= BN_PROBE_ROWS:
        total, squares, count = moments(x)
    else:
        full = n // BN_PROBE_ROWS
        chunks = x[: full * BN_PROBE_ROWS].reshape(full, BN_PROBE_ROWS, *x.shape[1:])
        sums, sqs, counts = jax.lax.map(moments, chunks)
        total, squares, count = sums.sum(0), sqs.sum(0), counts.sum(0)
        if n % BN_PROBE_ROWS:
            t, s, c = moments(x[full * BN_PROBE_ROWS :])
            total, squares, count = total + t, squares + s, count + c
    mean = total / count
    return mean, jnp.maximum(squares / count - jnp.square(mean), 0.0)


def probes_enabled(setting: bool | str, n_params: int, max_params: int) -> bool:
    """``[probes] enabled``: true, false, or "auto" (on up to ``max_params`` parameters)."""
    if setting == "auto":
        return n_params <= max_params
    return bool(setting)


def count_params(prepared: PreparedModel) -> int:
    return sum(int(v.size) if hasattr(v, "size") else 0 for v in prepared.model.variables)
