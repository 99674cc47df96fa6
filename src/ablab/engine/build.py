"""Study + variant -> a ready VariantProgram (data loaded, split like fit, model prepared)."""

from __future__ import annotations

import functools
import math

import keras

from ablab.engine import memory
from ablab.engine.data import Dataset, Split, load_dataset, split, standardized
from ablab.engine.memory import Footprint, human_bytes, optimizer_slots, trainable_elements
from ablab.engine.model import check_loss_target, prepare_model
from ablab.engine.probes import count_params, probes_enabled
from ablab.engine.program import VariantProgram
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
            x_row=parts.x_train.shape[1:],
            y_row=parts.y_train.shape[1:],
            n_train=parts.n_train,
            batch_size=train.batch_size,
            val_batch_size=train.validation_batch_size or train.batch_size,
            shuffle=train.shuffle,
            steps=train.epochs * math.ceil(parts.n_train / train.batch_size),
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


def build_program(
    study: Study, variant: str, data: Dataset | None = None, *, probes: bool | None = None
) -> VariantProgram:
    """Validate and build ``variant``'s program; ``data`` saves reloading the rows.

    probes: record probes (``ablab.engine.probes``); None = the study's ``[probes]`` setting.
    """
    data = load_dataset(study) if data is None else data
    train = study.variant_train(variant)
    parts = split(data, train.validation_split, where=study.source)
    if study.data.standardize:
        parts = standardized(parts, target_too=study.data.target_is_input())
    n = min(train.batch_size, parts.n_train)  # a few rows: shapes and dtypes only
    # the optimizer's slots per weight first: building it makes variables, not allowed while
    # the model's weights are still shapes only
    slots = optimizer_slots(train.optimizer_config())
    preflight = functools.partial(check_memory, study, variant, parts, slots=slots)
    prepared = prepare_model(study, variant, parts.x_train[:n], parts.y_train[:n], preflight)
    check_loss_target(study, variant, prepared.output_width, data.y)
    if probes is None:
        setting = study.probes
        probes = probes_enabled(setting.enabled, count_params(prepared), setting.max_params)
    program = VariantProgram(prepared, parts, probes=probes)
    if probes:  # the probes' own memory, now that the program knows it
        check_memory(study, variant, parts, prepared.model, program.footprint())
    return program
