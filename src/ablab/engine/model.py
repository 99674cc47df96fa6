"""Build a variant's real Keras model once, keeping each variable's initializer and a stable id.

The model is built inside ``keras.StatelessScope`` so every variable still
holds its own initializer when we look (Keras drops it once a variable is
initialized). Each variable gets a *stable id* that does not depend on Keras'
process-global layer-name counter (the second model built in a process gets
``dense_2``): an explicitly named layer keeps its name, an auto-named one
becomes ``<class>#<ordinal among layers of that class>``. Initial weights are
keyed by (seed, stable id), so inserting an ``Activation`` or a
``BatchNormalization`` leaves every other layer's initial weights unchanged --
the variants of a study are paired.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from ablab._keras import (
    deferred_variables,
    flatten_layers,
    initializer_of,
    keras_backend,
    own_variables,
    seed_generators,
    symbolic_build,
    to_snake_case,
)
from ablab.engine.data import is_structured, tree_map
from ablab.engine.data_loss import DataLoss
from ablab.errors import StudyError, short_repr
from ablab.study.schema import Study, TrainSpec


@dataclass
class PreparedModel:
    """A compiled, symbolically built Keras model and what the engine needs to know about it.

    ``initializers`` and ``stable_ids`` are indexed like ``model.variables``
    order of ``trainable_variables`` then ``non_trainable_variables``.
    """

    model: keras.Model
    train: TrainSpec
    trainable_ids: list[str]
    non_trainable_ids: list[str]
    trainable_inits: list[Callable[..., Any]]
    non_trainable_inits: list[Callable[..., Any]]
    seed_state: list[bool]
    """Per non-trainable variable: is it a SeedGenerator state (per-seed RNG, e.g. Dropout)?"""
    output_shape: tuple[int, ...] = ()
    """The model's output shape without the batch dimension."""

    @property
    def output_width(self) -> int:
        """Outputs per row (the last dimension: classes for a classifier)."""
        return int(self.output_shape[-1]) if self.output_shape else 1


def _auto_named(layer: keras.Layer) -> bool:
    base = to_snake_case(type(layer).__name__)
    return re.fullmatch(rf"{re.escape(base)}(_\d+)?", layer.name) is not None


def stable_layer_ids(model: keras.Model) -> dict[int, str]:
    """``id(layer) -> stable id`` for every layer inside ``model`` (recursively)."""
    counts: dict[str, int] = {}
    ids: dict[int, str] = {}
    for layer in flatten_layers(model, include_self=False):
        cls = to_snake_case(type(layer).__name__)
        ordinal = counts.get(cls, 0)
        counts[cls] = ordinal + 1
        ids[id(layer)] = f"{cls}#{ordinal}" if _auto_named(layer) else layer.name
    return ids


def stable_variable_ids(model: keras.Model) -> dict[int, str]:
    """``id(variable) -> "<stable layer id>/<variable name>"`` for every variable of ``model``."""
    layer_ids = stable_layer_ids(model)
    out: dict[int, str] = {}
    for layer in flatten_layers(model, include_self=False):
        own = own_variables(layer)
        own += [sg.state for sg in seed_generators(layer)]
        for v in own:
            out.setdefault(id(v), f"{layer_ids[id(layer)]}/{v.name}")
    for v in model.variables:  # variables owned by the model itself
        out.setdefault(id(v), f"model/{v.name}")
    return out


@contextmanager
def dtype_policy(name: str) -> Iterator[None]:
    """Keras' global dtype policy set to ``name`` inside (layers take it when constructed;
    ``compile`` wraps the optimizer in a ``LossScaleOptimizer`` for ``mixed_float16``), and
    restored after -- other models in the process keep theirs."""
    before = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(before)


def several_outputs(model: keras.Model) -> bool:
    """Does ``model`` have several outputs (a dict / list of them, as a functional model may)?"""
    try:
        return len(model.outputs) > 1
    except (AttributeError, ValueError):  # a subclassed model: no symbolic outputs
        return False


def compile_losses(train: TrainSpec, model: keras.Model | None = None) -> dict[str, Any]:
    """``loss``, ``metrics`` and ``weighted_metrics`` keyword arguments of ``model.compile``
    for ``train``. Names stay strings, so Keras resolves them as compile does (e.g.
    "accuracy" by target shape). ``weighted_metrics`` is the penalty-free loss,
    :class:`ablab.engine.data_loss.DataLoss` (History ``data_loss`` / ``val_data_loss``) --
    not for a ``model`` with several outputs (Keras takes a metric list per output there;
    their History has ``loss``, ``<output>_loss`` and their ``val_`` twins)."""
    loss = train.loss_config()
    metrics = [keras.metrics.get(m) if isinstance(m, dict) else m for m in train.metric_configs()]
    get = lambda c: keras.losses.get(c) if isinstance(c, dict) else c  # noqa: E731
    if isinstance(train.loss, dict):  # one loss per output
        assert isinstance(loss, dict)
        return {
            "loss": {k: get(c) for k, c in loss.items()},
            "metrics": metrics,
            "weighted_metrics": None,
        }
    out: dict[str, Any] = {
        "loss": get(loss),
        "metrics": metrics,
        "weighted_metrics": [DataLoss(loss)],
    }
    if model is not None and several_outputs(model):
        out["weighted_metrics"] = None
    return out


def _layer_from_spec(study: Study, key: str, spec: dict[str, Any]) -> keras.Layer:
    spec = dict(spec)
    name = spec.pop("layer", None)
    if isinstance(name, type) and issubclass(name, keras.layers.Layer):  # a class, in code
        cls: Any = name
        name = cls.__name__
    elif isinstance(name, str) and ":" in name:  # "file.py:Class" or "module:Class"
        cls = _import_object(study, f"{key}.layer", name)
    elif not isinstance(name, str):
        raise StudyError(
            where=study.source,
            key=key,
            expected='a table naming its class, e.g. {layer = "Dense", units = 8}',
            got=short_repr(spec),
            fix='add `layer = "ClassName"`',
        )
    else:
        cls = getattr(keras.layers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, keras.layers.Layer)):
        import difflib

        known = [n for n in dir(keras.layers) if isinstance(getattr(keras.layers, n), type)]
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"did you mean {', '.join(close)}?" if close else "see keras.io/api/layers"
        raise StudyError(
            where=study.source,
            key=f"{key}.layer",
            expected="a keras.layers class name (or 'file.py:Class' for your own layer)",
            got=repr(name),
            fix=f"use a class from keras.layers ({hint})",
        )
    try:
        return cls(**spec)
    except Exception as exc:
        raise StudyError(
            where=study.source,
            key=key,
            expected=f"keyword arguments that keras.layers.{name} accepts",
            got=f"{short_repr(spec)} -> {type(exc).__name__}: {exc}",
            fix=f"check the arguments of keras.layers.{name}",
        ) from exc


USER_MODULE_PREFIX = "ablab_user_"
"""Module names of the study files ``_import_object`` loads (``"file.py:name"``): not
importable by name, a fresh interpreter loads them from their ``__file__``
(``ablab.engine.reference.user_objects``)."""


def _import_object(study: Study, key: str, ref: str) -> Any:
    """``file.py:name`` (relative to the study's folder) or ``package.module:name``."""
    fix = 'write "models.py:name" (a file beside the study) or "package.module:name"'
    if ":" not in ref:
        raise StudyError(
            where=study.source, key=key, expected="'file.py:name'", got=repr(ref), fix=fix
        )
    target, attr = ref.rsplit(":", 1)
    try:
        if target.endswith(".py"):
            path = (Path(study.root) / target).resolve()
            if not path.is_file():
                raise FileNotFoundError(f"no such file {path}")
            mod_name = f"{USER_MODULE_PREFIX}{abs(hash(str(path)))}"
            module = sys.modules.get(mod_name)
            if module is None:  # load each file once, so its classes stay the same objects
                spec = importlib.util.spec_from_file_location(mod_name, path)
                assert spec is not None and spec.loader is not None
                module = importlib.util.module_from_spec(spec)
                sys.modules[mod_name] = module
                try:
                    spec.loader.exec_module(module)
                except BaseException:  # no half-loaded module for the next caller
                    del sys.modules[mod_name]
                    raise
        else:
            module = importlib.import_module(target)
        return getattr(module, attr)
    except Exception as exc:
        raise StudyError(
            where=study.source,
            key=key,
            expected="an importable name",
            got=f"{ref!r} -> {type(exc).__name__}: {exc}",
            fix=fix,
        ) from exc


def _weighted(layer: keras.Layer) -> bool:
    """A layer (not a model) owning variables of its own: the ones a dtype policy computes in."""
    return not isinstance(layer, keras.Model) and bool(layer.weights)


def _takes_policy(model: keras.Model, policy: str) -> bool:
    """Should a copy of ``model`` take the global ``policy``: it differs from float32 and no
    layer with weights has it yet (a model built without any policy -- one built under it,
    keeping some layers float32 on purpose, stays as built)."""
    if policy == "float32":
        return False
    layers = [la for la in flatten_layers(model, include_self=False) if _weighted(la)]
    return not any(la.dtype_policy.name == policy for la in layers)


def _policy_names(node: Any, policy: str) -> Iterator[bool]:
    """For each serialized ``DTypePolicy`` in ``node`` (a ``to_json`` tree): is it ``policy``?"""
    if isinstance(node, dict):
        if node.get("class_name") == "DTypePolicy" and isinstance(node.get("config"), dict):
            yield node["config"].get("name") == policy
            return
        for value in node.values():
            yield from _policy_names(value, policy)
    elif isinstance(node, list):
        for value in node:
            yield from _policy_names(value, policy)


def _set_float32_policies(node: Any, policy: str) -> None:
    """Every serialized float32 ``DTypePolicy`` in ``node`` set to ``policy`` (the layers'
    ``dtype``; an ``InputLayer``'s plain "float32" string is the input's dtype, kept)."""
    if isinstance(node, dict):
        conf = node.get("config")
        if node.get("class_name") == "DTypePolicy" and isinstance(conf, dict):
            if conf.get("name") == "float32":
                conf["name"] = policy
            return
        for value in node.values():
            _set_float32_policies(value, policy)
    elif isinstance(node, list):
        for value in node:
            _set_float32_policies(value, policy)


def _clone_of(model: keras.Model) -> Callable[..., Any]:
    """A builder giving a fresh copy of ``model``'s architecture (new variables, each with its
    own initializer; the object's weights are not used) -- it takes no parameters."""

    def build(**params: Any) -> keras.Model:
        if params:
            raise TypeError(f"a model object takes no builder parameters, got {sorted(params)}")
        policy = keras.config.dtype_policy().name
        if not _takes_policy(model, policy):
            return keras.models.clone_model(model)

        def clone_layer(layer: keras.Layer) -> keras.Layer:
            config = layer.get_config()
            if _weighted(layer) and layer.dtype_policy.name == "float32":
                config["dtype"] = policy
            return layer.__class__.from_config(config)

        try:
            return keras.models.clone_model(model, clone_function=clone_layer, recursive=True)
        except ValueError:  # a subclassed model: cloned as is (prepare_model checks it)
            return keras.models.clone_model(model)

    return build


def _architecture_file(study: Study, key: str, ref: str) -> Callable[..., Any]:
    """A builder rebuilding the architecture saved by ``model.to_json()`` in ``ref`` (relative
    to the study's root), fresh: no weights (ablab draws them per seed)."""
    path = Path(study.root) / ref
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise StudyError(
            where=study.source,
            key=key,
            expected="a readable model architecture file (model.to_json())",
            got=f"{str(path)!r} -> {type(exc).__name__}: {exc}",
            fix="check the path; relative paths resolve against the study's folder",
        ) from exc

    def build(**params: Any) -> keras.Model:
        if params:
            raise TypeError(f"a saved architecture takes no builder parameters, got {params}")
        policy = keras.config.dtype_policy().name
        if policy == "float32":
            return keras.models.model_from_json(text)
        config = json.loads(text)
        if not any(_policy_names(config, policy)):  # saved without a policy: apply this one
            _set_float32_policies(config, policy)
        return keras.models.model_from_json(json.dumps(config))

    return build


def resolve_builder(study: Study, variant: str | None = None) -> Callable[..., Any]:
    """The builder of ``variant`` (its own, else ``[model]``'s): a callable, a
    ``keras.Model`` object (cloned), ``file.py:function`` (beside the study), ``module:fn``
    or ``file.json`` (a saved architecture)."""
    own = study.variants[variant].builder if variant is not None else None
    builder = own if own is not None else study.model.builder
    key = f"variants.{variant}.builder" if own is not None else "model.builder"
    if isinstance(builder, keras.Model):
        return _clone_of(builder)
    if callable(builder):
        return builder
    assert isinstance(builder, str)
    if builder.lower().endswith(".json") and ":" not in builder:
        return _architecture_file(study, key, builder)
    fn = _import_object(study, key, builder)
    if not callable(fn):
        raise StudyError(
            where=study.source,
            key=key,
            expected="a callable",
            got=short_repr(fn),
            fix="point builder at a function",
        )
    return fn


def _construct(study: Study, variant: str, input_shape: tuple[int, ...]) -> keras.Model:
    layers = study.variant_layers(variant)
    key_root = (
        f"variants.{variant}.layers"
        if study.variants[variant].layers is not None
        else "model.layers"
    )
    own = study.variants[variant].builder is not None
    if layers is not None and not own:
        built = [_layer_from_spec(study, f"{key_root}[{i}]", s) for i, s in enumerate(layers)]
        return keras.Sequential([keras.Input(shape=input_shape), *built], name=variant)
    fn = resolve_builder(study, variant)
    builder_key = f"variants.{variant}.builder" if own else "model.builder"
    params = study.variant_params(variant)
    try:
        model = fn(**params)
    except Exception as exc:
        raise StudyError(
            where=study.source,
            key=f"variants.{variant}.params",
            expected="builder parameters the builder accepts without raising",
            got=f"{short_repr(params)} -> {type(exc).__name__}: {exc}",
            fix="fix the builder or the parameters passed to it",
        ) from exc
    if not isinstance(model, keras.Model):
        raise StudyError(
            where=study.source,
            key=builder_key,
            expected="a builder returning an uncompiled keras.Model",
            got=f"{type(model).__name__}",
            fix="return a keras.Model from the builder",
        )
    if not model.built:
        model.build((None, *input_shape))
    return model


def _check_dtype_policy(study: Study, variant: str, model: keras.Model, policy: str) -> None:
    """Refuse a model none of whose layers with weights took the requested ``policy`` (a
    builder passing explicit float32 dtypes, a subclassed model object): the policy would
    be silently ignored. Some layers kept float32 (e.g. the output) is a deliberate mix."""
    if policy == "float32":
        return
    layers = [la for la in flatten_layers(model, include_self=False) if _weighted(la)]
    if not layers or any(la.dtype_policy.name == policy for la in layers):
        return
    got = sorted({la.dtype_policy.name for la in layers})
    raise StudyError(
        where=study.source,
        key="train.dtype_policy",
        expected=f"a model of variant {variant!r} whose layers compute in {policy!r}",
        got=f"every layer with weights has dtype policy {', '.join(got)}",
        fix=(
            f"build the model under keras.mixed_precision.set_global_policy({policy!r}) "
            "(give a function that builds it, without explicit dtype=), or set dtype per "
            "layer"
        ),
    )


def prepare_model(
    study: Study,
    variant: str,
    x_example: Any,
    y_example: Any,
    preflight: Callable[[keras.Model], None] | None = None,
) -> PreparedModel:
    """Build, compile and symbolically build ``variant``'s model; check it fits the target.

    x_example / y_example: a few rows (rows, ...) used only for shapes and dtypes -- or dicts /
    lists of such arrays (a multi-input / multi-output model, which its builder builds).
    preflight(model) runs on the built model before its variables hold values (are
    allocated): it may refuse the model from its shapes (a memory pre-flight).
    """
    input_shape = () if is_structured(x_example) else tuple(int(d) for d in x_example.shape[1:])
    train = study.variant_train(variant)
    with dtype_policy(train.dtype_policy), deferred_variables() as redrawn:
        model = _construct(study, variant, input_shape)
        inits = {id(v): initializer_of(v) for v in model.variables}
        redrawn.update(inits)  # the engine draws these per seed: zeros meanwhile
        if preflight is not None:  # shapes only: nothing is allocated yet
            preflight(model)
    # Leaving the scope gave every variable a (throw-away) value; the engine draws its own.
    _check_dtype_policy(study, variant, model, train.dtype_policy)
    out_shape = _check_output_shape(study, variant, model, x_example, y_example)
    try:
        optimizer = keras.optimizers.get(train.optimizer_config())
    except Exception as exc:
        raise StudyError(
            where=study.source,
            key="train.optimizer",
            expected="a keras.optimizers name and its keyword arguments",
            got=f"{short_repr(train.optimizer)} -> {type(exc).__name__}: {exc}",
            fix='e.g. optimizer = "adam" or {name = "sgd", momentum = 0.9}',
        ) from exc
    try:
        model.compile(optimizer=optimizer, **compile_losses(train, model))
        symbolic_build(model, (x_example, y_example))
    except Exception as exc:
        raise StudyError(
            where=study.source,
            key="train",
            expected="a loss and metrics Keras knows, that fit the model's output",
            got=f"loss={train.loss!r}, metrics={train.metrics!r} -> {type(exc).__name__}: {exc}",
            fix='use keras loss / metric names, e.g. loss = "mse"',
        ) from exc
    ids = stable_variable_ids(model)
    seed_states = {id(sg.state) for layer in flatten_layers(model) for sg in seed_generators(layer)}
    tv, ntv = model.trainable_variables, model.non_trainable_variables
    for v in (*tv, *ntv):
        if inits.get(id(v)) is None:
            raise StudyError(
                where=study.source,
                key=f"variants.{variant}",
                expected="every model variable created when the model is built",
                got=f"variable {v.path} without an initializer",
                fix="create weights in build() via add_weight(initializer=...)",
            )
    return PreparedModel(
        model=model,
        train=train,
        trainable_ids=[ids[id(v)] for v in tv],
        non_trainable_ids=[ids[id(v)] for v in ntv],
        trainable_inits=[inits[id(v)] for v in tv],
        non_trainable_inits=[inits[id(v)] for v in ntv],
        seed_state=[id(v) in seed_states for v in ntv],
        output_shape=out_shape,
    )


_MSE = ("mse", "mean_squared_error", "meansquarederror")


def _is_linear_activation(fn: Any) -> bool:
    return getattr(fn, "__name__", None) == "linear"


def linear_rank(prepared: PreparedModel, x_train: Any, y_train: Any) -> int | None:
    """The rank bound of a model that is affine at inference and trained under MSE (its
    narrowest width), else None: such a model has an analytic optimum
    (``ablab.analysis.explain.linear_optimum``). Affine: Dense layers with linear
    activations, ``Activation('linear')``, BatchNormalization, Flatten / Reshape."""
    if prepared.train.loss_name.replace("_", "") not in {m.replace("_", "") for m in _MSE}:
        return None
    if not hasattr(x_train, "shape") or not hasattr(y_train, "shape"):
        return None  # several inputs / outputs: no single linear map to compare with
    shape_only = (keras.layers.InputLayer, keras.layers.Flatten, keras.layers.Reshape)
    widths = [int(np.prod(x_train.shape[1:]))]
    for layer in flatten_layers(prepared.model, include_self=False):
        linear_dense = isinstance(layer, keras.layers.Dense) and _is_linear_activation(
            layer.activation
        )
        identity = isinstance(layer, keras.layers.Activation) and _is_linear_activation(
            layer.activation
        )
        affine = isinstance(layer, (keras.Model, keras.layers.BatchNormalization, *shape_only))
        if linear_dense:
            widths.append(int(layer.units))
        elif not (identity or affine):
            return None
    return min(widths)


SPARSE_CE = ("sparse_categorical_crossentropy",)
CATEGORICAL_CE = ("categorical_crossentropy", "categorical_focal_crossentropy")
BINARY_CE = ("binary_crossentropy", "binary_focal_crossentropy", "bce")  # bce: Keras' alias


def check_loss_target(study: Study, variant: str, output_width: int, y: np.ndarray) -> None:
    """Refuse a cross-entropy whose targets it cannot mean (before any training): sparse
    categorical CE needs integer class labels in ``[0, output width)``; categorical CE needs
    one-hot / probability rows; binary CE needs targets in ``[0, 1]``. Regression losses take
    any finite target. (Keras itself trains on such targets and reports nonsense: sparse CE
    on a regression target gathers out of range and reports a loss of 0.)"""
    train = study.variant_train(variant)
    loss = train.loss_name
    own = "loss" in study.variants[variant].train
    key = f"variants.{variant}.train.loss" if own else "train.loss"
    if isinstance(train.loss, dict):
        return  # one loss per output: Keras matches each to its target
    name = train.loss if isinstance(train.loss, str) else train.loss.name
    y = np.asarray(y, dtype=np.float64)
    if loss in SPARSE_CE:
        ignore = (
            (train.loss.model_extra or {}).get("ignore_class")
            if not isinstance(train.loss, str)
            else None
        )
        labels = y if ignore is None else y[y != ignore]
        whole = bool(np.all(labels == np.round(labels)))
        lo, hi = (float(labels.min()), float(labels.max())) if labels.size else (0.0, 0.0)
        if not whole or lo < 0 or hi >= output_width:
            got = (
                f"non-integer targets (e.g. {labels[labels != np.round(labels)][0]:g})"
                if not whole
                else f"labels from {lo:g} to {hi:g} for a model with {output_width} output(s)"
            )
            raise StudyError(
                where=study.source,
                key=key,
                expected=f"{name!r}: integer class labels in [0, {output_width}) -- one "
                "output per class",
                got=got,
                fix='for a regression target use a regression loss (e.g. loss = "mse"); '
                f"for classes, give the last layer one unit per class (labels up to {hi:g} "
                f"need {int(hi) + 1} units)",
            )
    elif loss in CATEGORICAL_CE:
        sums = y.sum(axis=-1) if y.size else y  # per row, time step or pixel: classes last
        if y.size and (y.min() < 0 or y.max() > 1 or np.abs(sums - 1).max() > 1e-3):
            raise StudyError(
                where=study.source,
                key=key,
                expected=f"{name!r}: one-hot or probability rows (values in [0, 1] summing to 1)",
                got=f"targets from {y.min():g} to {y.max():g}, row sums from {sums.min():g} to "
                f"{sums.max():g}",
                fix="one-hot encode class labels, or use sparse_categorical_crossentropy for "
                'integer labels, or a regression loss (e.g. "mse") for values',
            )
    elif loss in BINARY_CE and y.size and (y.min() < 0 or y.max() > 1):
        raise StudyError(
            where=study.source,
            key=key,
            expected=f"{name!r}: targets in [0, 1] (0/1 labels or probabilities)",
            got=f"targets from {y.min():g} to {y.max():g}",
            fix='use 0/1 labels, or a regression loss (e.g. "mse") for values',
        )


def _check_output_shape(
    study: Study, variant: str, model: keras.Model, x: Any, y: Any
) -> tuple[int, ...]:
    try:
        spec = keras_backend.compute_output_spec(
            model, tree_map(lambda a: keras.KerasTensor(a.shape, "float32"), x), training=False
        )
    except Exception as exc:
        shapes = tree_map(lambda a: tuple(a.shape[1:]), x)
        raise StudyError(
            where=study.source,
            key=f"variants.{variant}",
            expected=f"a model that accepts inputs of shape {shapes}",
            got=f"{type(exc).__name__}: {exc}",
            fix="make the first layer match the data's features",
        ) from exc
    if not hasattr(spec, "shape") and is_structured(y):
        return ()  # several outputs: compile checks each target against its output
    if not hasattr(spec, "shape"):
        raise StudyError(
            where=study.source,
            key=f"variants.{variant}",
            expected="a model with a single output",
            got=short_repr(spec),
            fix="return one output tensor",
        )
    out_shape = tuple(spec.shape[1:])
    if is_structured(y):  # one output, targets by name: compile matches them
        return tuple(int(d) for d in out_shape)
    target_shape = tuple(y.shape[1:])
    loss = study.variant_train(variant).loss_name
    # sparse categorical targets are class indices: (batch,) or (batch, 1)
    ok = target_shape in ((), (1,)) if "sparse" in loss else out_shape == target_shape
    if not ok:
        raise StudyError(
            where=study.source,
            key=f"variants.{variant}",
            expected=f"model output shape (batch, {', '.join(map(str, target_shape))})"
            f" matching the target",
            got=f"(batch, {', '.join(map(str, out_shape))})",
            fix="make the last layer's units equal the target's width",
        )
    return tuple(int(d) for d in out_shape)
