"""Study + variant -> a ready VariantProgram (data loaded, split like fit, model prepared)."""

from __future__ import annotations

from ablab.engine.data import Dataset, load_dataset, split, standardized
from ablab.engine.model import prepare_model
from ablab.engine.probes import count_params, probes_enabled
from ablab.engine.program import VariantProgram
from ablab.study.schema import Study


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
    prepared = prepare_model(study, variant, parts.x_train[:n], parts.y_train[:n])
    if probes is None:
        setting = study.probes
        probes = probes_enabled(setting.enabled, count_params(prepared), setting.max_params)
    return VariantProgram(prepared, parts, probes=probes)
