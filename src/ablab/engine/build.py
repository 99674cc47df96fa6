"""Study + variant -> a ready VariantProgram (data loaded, split like fit, model prepared)."""

from __future__ import annotations

import functools
import json
import math

import keras

from ablab._keras import early_stopping_minimizes
from ablab.engine import memory
from ablab.engine.data import (
    Dataset,
    Split,
    class_weighted,
    is_structured,
    load_dataset,
    row_shape,
    split,
    standardized,
    tree_map,
    with_validation_data,
)
from ablab.engine.memory import Footprint, human_bytes, optimizer_slots, trainable_elements
from ablab.engine.model import check_loss_target, prepare_model
from ablab.engine.probes import count_params, probes_enabled
from ablab.engine.program import VariantProgram, steps_limit
from ablab.errors import StudyError
from ablab.study.schema import Study


def check_memory(
    study: Study,
    variant: str,
    parts: Split,
    model: keras.Model,
    footprint: Footprint | None = None,
    *,
    slots: float | None = None,
) -> None:
    """Refuse (StudyError, exit 2) a variant whose single seed does not fit ``[engine]
    memory_budget_mb`` -- from the model's shapes, before any weight is allocated (or from
    ``footprint``, the built program's own estimate, probes included). slots: the
    optimizer's state per weight (``optimizer_slots``; computed here when not given)."""
    train = study.variant_train(variant)
    if footprint is None:
        if slots is None:
            slots = optimizer_slots(train.optimizer_config())
        footprint = memory.footprint(
            model,
            optimizer_elements=math.ceil(slots * trainable_elements(model)),
            x_row=row_shape(parts.x_train),
            y_row=row_shape(parts.y_train),
            n_train=parts.n_train,
            batch_size=train.batch_size,
            val_batch_size=train.validation_batch_size or train.batch_size,
            shuffle=train.shuffle,
            steps=train.epochs * math.ceil(parts.n_train / train.batch_size),
            weighted=parts.sw_train is not None,
        )
    budget = study.engine.memory_budget_mb * 2**20
    if footprint.bytes <= budget:
        return
    need_mb = math.ceil(footprint.bytes / 2**20)
    raise StudyError(
        where=study.source,
        key="engine.memory_budget_mb",
        expected=f"room for one seed of variant {variant!r}: ~{human_bytes(footprint.bytes)} "
        f"({footprint.describe()})",
        got=f"memory_budget_mb = {study.engine.memory_budget_mb:g}",
        fix=f"raise [engine] memory_budget_mb to at least {need_mb} if the machine has that "
        "memory, or make the model / batch_size smaller"
        + (" (or turn [probes] off)" if footprint.probes else ""),
    )


def _refuse(study: Study, key: str, expected: str, got: str, fix: str) -> StudyError:
    return StudyError(where=study.source, key=key, expected=expected, got=got, fix=fix)


def _train_key(study: Study, variant: str, key: str) -> str:
    """Where ``key`` of ``variant``'s train spec is set: its override, else ``[train]``."""
    own = key in study.variants[variant].train
    return f"variants.{variant}.train.{key}" if own else f"train.{key}"


def fit_split(study: Study, variant: str, data: Dataset) -> Split:
    """The training and validation rows (and their sample weights) ``fit`` would use for
    ``variant``: ``validation_data`` ([data.validation]) or the ``validation_split`` cut;
    ``class_weight`` turned into the training rows' sample weights, as ``fit`` does."""
    train = study.variant_train(variant)
    if study.data.validation is not None:
        if train.validation_split:
            raise _refuse(
                study,
                _train_key(study, variant, "validation_split"),
                "no validation_split beside [data.validation] (fit would ignore it)",
                f"validation_split = {train.validation_split}",
                "drop validation_split, or the [data.validation] table",
            )
        val_study = study.model_copy(update={"data": study.data.validation})
        parts = with_validation_data(data, load_dataset(val_study))
    else:
        parts = split(data, train.validation_split, where=study.source)
    if train.class_weight is not None:
        if study.data.sample_weight is not None:
            raise _refuse(
                study,
                _train_key(study, variant, "class_weight"),
                "class_weight or [data] sample_weight, not both (fit refuses both)",
                "both",
                "fold the class weights into the sample_weight column, or drop one",
            )
        parts = class_weighted(parts, train.class_weight)
    limit = steps_limit(train.steps_per_epoch, parts.n_train, train.batch_size)
    batches = math.ceil(parts.n_train / train.batch_size)
    if limit is not None and (parts.n_train % train.batch_size or batches % limit):
        raise _refuse(
            study,
            _train_key(study, variant, "steps_per_epoch"),
            f"a divisor of the {batches} batches per pass, with no partial last batch "
            f"({parts.n_train} training rows, batch_size {train.batch_size}), or at least "
            f"{batches}",
            f"steps_per_epoch = {train.steps_per_epoch}",
            "pick a batch_size that divides the training rows and a steps_per_epoch that "
            "divides the batches (epochs of unequal length are not vectorized), or use "
            '[engine] kind = "reference"',
        )
    return parts


def history_names(model: keras.Model, validation: bool) -> list[str]:
    """The names ``fit`` puts in ``model``'s History (compiled and symbolically built):
    ``loss``, per-output losses, metrics, ``data_loss`` -- and their ``val_`` twins."""
    names = list(model.get_metrics_result())
    return names + [f"val_{n}" for n in names] if validation else names


def check_monitor(study: Study, variant: str, parts: Split, model: keras.Model) -> None:
    """Refuse early stopping (or ReduceLROnPlateau) on a quantity the History does not have
    (fit would only warn and never act), or one whose direction Keras cannot tell with
    ``mode = "auto"``."""
    train = study.variant_train(variant)
    for name in ("early_stopping", "reduce_lr_on_plateau"):
        spec = getattr(train, name)
        if spec is None:
            continue
        key = _train_key(study, variant, name)
        names = history_names(model, bool(parts.n_val))
        if spec.monitor not in names:
            raise _refuse(
                study,
                key + ".monitor",
                f"a quantity of the History: {names}",
                repr(spec.monitor),
                "monitor one of them"
                + ("" if parts.n_val else " (val_* needs validation_split or [data.validation])"),
            )
        try:
            early_stopping_minimizes(model, spec.monitor, spec.mode)
        except ValueError as exc:
            raise _refuse(
                study,
                key + ".mode",
                f"a mode saying whether {spec.monitor!r} should fall or rise",
                f"mode = {spec.mode!r} (Keras cannot tell this metric's direction)",
                'set mode = "min" (lower is better) or mode = "max" (higher is better)',
            ) from exc


def build_program(
    study: Study, variant: str, data: Dataset | None = None, *, probes: bool | None = None
) -> VariantProgram:
    """Validate and build ``variant``'s program; ``data`` saves reloading the rows.

    probes: record probes (``ablab.engine.probes``); None = the study's ``[probes]`` setting.
    """
    data = load_dataset(study) if data is None else data
    train = study.variant_train(variant)
    parts = fit_split(study, variant, data)
    if study.data.standardize:
        parts = standardized(parts, target_too=study.data.target_is_input())
    n = min(train.batch_size, parts.n_train)  # a few rows: shapes and dtypes only
    # the optimizer's slots per weight first: building it makes variables, not allowed while
    # the model's weights are still shapes only
    slots = optimizer_slots(train.optimizer_config())
    preflight = functools.partial(check_memory, study, variant, parts, slots=slots)
    x_example = tree_map(lambda a: a[:n], parts.x_train)
    y_example = tree_map(lambda a: a[:n], parts.y_train)
    prepared = prepare_model(study, variant, x_example, y_example, preflight)
    if not is_structured(data.y):  # several outputs: Keras checks each target's shape
        check_loss_target(study, variant, prepared.output_width, data.y)
    if probes is None:
        setting = study.probes
        probes = probes_enabled(setting.enabled, count_params(prepared), setting.max_params)
    if is_structured(data.x) or is_structured(data.y):
        probes = False  # the probes read one input array; not recorded for these models
    check_monitor(study, variant, parts, prepared.model)
    program = VariantProgram(prepared, parts, probes=probes)
    layers = study.variant_layers(variant)
    if layers is not None and study.variants[variant].builder is None:
        # the model is its layer list (with the data's shapes): what keys its kept traces
        description = {"variant": variant, "layers": layers}
        try:  # strict: a Python object in the list (not TOML / JSON) has no faithful text
            program.model_description = json.dumps(description, sort_keys=True)
        except (TypeError, ValueError):
            program.model_description = None
    if probes:  # the probes' own memory, now that the program knows it
        check_memory(study, variant, parts, prepared.model, program.footprint())
    return program
