"""``ablab.compare``: verdicts for per-seed results made anywhere.

A PyTorch user, or anyone with a W&B / MLflow export, has one number per (variant, seed).
This module validates such results and judges them with exactly the rule and output of
``ablab run`` (``ablab.stats.verdicts.compare_arms``): the same ``comparisons`` rows, the same
summary per variant, the same JSON keys.

Input layouts:

* a mapping ``{variant: values}`` of 1-D arrays; seed i of every variant is element i when all
  arrays have one length (paired by position), otherwise the variants are unpaired;
* a long table (``pyarrow.Table``, ``pandas.DataFrame``, or a .csv / .parquet file for the
  CLI) with columns ``variant``, ``seed`` and the metric; seeds pair by id. Arms that share
  fewer than two seed ids are compared unpaired (Mann-Whitney, Fisher), which the output says.

Non-finite values (nan, inf, and an empty metric cell or null, which is how pandas writes NaN)
mean "diverged" -- the worst outcome, not missing data. Drop the rows of runs that are missing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import ValidationError

from ablab.errors import InputError, short_repr
from ablab.stats.summary import final_distribution
from ablab.stats.verdicts import RULE, Arm, Comparison, compare_arms, name_says_direction
from ablab.stats.verdicts import lower_is_better as _lower_is_better
from ablab.study.loading import to_study_error
from ablab.study.schema import VerdictSpec

UNPAIRED_NOTE = (
    "unpaired: the arms were not paired by seed (they share too few seeds, or pairing was "
    "turned off), so seed-to-seed variation is not cancelled out; a paired design (the same "
    "seeds in every arm) usually needs several times fewer seeds"
)


@dataclass
class CompareResult:
    """Verdicts for per-seed results: ``comparisons`` as in ``RunResult.comparisons``;
    ``summary[variant]`` as in ``RunResult.summary``."""

    metric: str
    baseline: str
    lower_is_better: bool
    comparisons: list[Comparison]
    summary: dict[str, dict[str, Any]]
    source: str = "<in code>"
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The document ``ablab compare --json`` prints (keys as in ``ablab run --json``)."""
        return {
            "source": self.source,
            "metric": self.metric,
            "baseline": self.baseline,
            "variants": self.summary,
            "comparisons": [c.to_json() for c in self.comparisons],
            "verdict_rule": RULE,
            "notes": self.notes,
        }


def _bad(where: str, key: str, expected: str, got: str, fix: str) -> InputError:
    return InputError(where=where, key=key, expected=expected, got=got, fix=fix)


def _as_table(results: Any, where: str) -> pa.Table | None:
    if isinstance(results, pa.Table):
        return results
    if hasattr(results, "to_dict") and hasattr(results, "columns"):  # a pandas DataFrame
        try:
            return pa.Table.from_pandas(results, preserve_index=False)  # NaN -> null -> diverged
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise _bad(
                where,
                "results",
                "columns of one type each (variant: text, seed: ids, metric: numbers)",
                str(exc).splitlines()[0],
                "convert each column to one type, e.g. df['seed'] = df['seed'].astype(str)",
            ) from exc
    return None


def _arms_from_mapping(results: Mapping[str, Any], where: str) -> dict[str, Arm]:
    arms = {}
    for name, values in results.items():
        try:
            arr = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise _bad(
                where,
                str(name),
                "numbers (one final value per seed)",
                short_repr(values),
                "pass a 1-D array of floats per variant",
            ) from exc
        if arr.ndim != 1:
            raise _bad(
                where,
                str(name),
                "a 1-D array (one value per seed)",
                f"shape {arr.shape}",
                "pass the final metric of each seed, e.g. x[:, -1]",
            )
        arms[str(name)] = Arm.of(np.arange(arr.size), arr)
    return arms


def _arms_from_table(
    table: pa.Table, metric: str | None, where: str, variant_col: str, seed_col: str
) -> tuple[dict[str, Arm], str]:
    names = table.column_names

    def missing(col: str) -> InputError:
        return _bad(
            where,
            col,
            f"a column {col!r} (long format: {variant_col}, {seed_col} and the metric)",
            f"the columns {names}",
            "add or rename the column (the metric column is chosen with --metric)",
        )

    for col in (variant_col, seed_col):
        if col not in names:
            raise missing(col)
    candidates = [c for c in names if c not in (variant_col, seed_col)]
    if metric is None:
        if len(candidates) != 1:
            raise _bad(
                where,
                "metric",
                "the name of the metric column",
                f"none given, and the columns are {names}",
                "name it, e.g. --metric val_loss",
            )
        metric = candidates[0]
    if metric not in names:
        raise missing(metric)
    for col in (variant_col, seed_col):
        nulls = table.column(col).is_null()
        if pc.any(nulls).as_py():
            row = int(pc.index(nulls, True).as_py())
            raise _bad(
                where,
                f"{col}, row {row + 1}",
                "a value in every row",
                "an empty value",
                "fill it in, or drop the row",
            )
    values_col = table.column(metric)
    if not (pa.types.is_floating(values_col.type) or pa.types.is_integer(values_col.type)):
        texts = values_col.cast(pa.string()).to_pylist()
        row, bad = next(((i, t) for i, t in enumerate(texts) if not _is_number(t)), (0, texts[0]))
        raise _bad(
            where,
            f"{metric}, row {row + 1}",
            "a number (nan or inf for a diverged seed)",
            repr(bad),
            f"keep only numbers in {metric!r}, or pick another column with --metric",
        )
    variants = [str(v) for v in table.column(variant_col).to_pylist()]
    seeds = table.column(seed_col).to_pylist()
    # an empty metric is NaN -- diverged: pandas writes NaN as an empty CSV cell / a null
    values = np.asarray(
        pc.fill_null(values_col.cast(pa.float64()), float("nan")).to_numpy(zero_copy_only=False),
        dtype=np.float64,
    )
    seen: dict[tuple[str, Any], int] = {}
    for i, key in enumerate(zip(variants, seeds, strict=True)):
        if key in seen:
            raise _bad(
                where,
                f"{variant_col}, {seed_col}",
                "one row per (variant, seed)",
                f"rows {seen[key] + 1} and {i + 1} both for {key[0]!r}, seed {key[1]!r}",
                "remove the duplicate, or aggregate repeats before comparing",
            )
        seen[key] = i
    order = list(dict.fromkeys(variants))
    ids = {s: k for k, s in enumerate(dict.fromkeys(seeds))}  # any hashable seed label
    seed_ids = np.array([ids[s] for s in seeds], dtype=np.int64)
    variant_arr = np.array(variants, dtype=object)
    arms = {v: Arm.of(seed_ids[variant_arr == v], values[variant_arr == v]) for v in order}
    return arms, metric


def _is_number(text: str | None) -> bool:
    try:
        float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return True


def compare(
    results: Mapping[str, Any] | pa.Table | Any,
    *,
    metric: str | None = None,
    baseline: str | None = None,
    lower_is_better: bool | None = None,
    pairs: Sequence[tuple[str, str]] | None = None,
    margin: float | None = None,
    margin_pct: float | None = None,
    alpha: float | None = None,
    paired: bool | None = None,
    spec: VerdictSpec | None = None,
    source: str = "<in code>",
    variant_column: str = "variant",
    seed_column: str = "seed",
) -> CompareResult:
    """Judge per-seed results with ablab's verdict rule (module docstring for the layouts).

    ``metric``: the column to compare (tables; for a mapping only its name); ``baseline``:
    default the first variant; ``lower_is_better``: default from the metric's name (losses
    lower, accuracy-like higher); ``pairs``: explicit ``(variant, baseline)`` comparisons;
    ``margin`` / ``margin_pct``: the equivalence margin (default 0.1 x the baseline's SD);
    ``paired``: None = decide from the seeds; ``spec``: a full ``[verdicts]`` specification
    (its metric, pairs, alpha, margins and direction are used unless the keyword arguments
    above are given). Raises ``ablab.InputError`` on bad input.
    """
    base_spec = spec if spec is not None else VerdictSpec()
    metric = metric if metric is not None else base_spec.metric
    unnamed = metric is None and lower_is_better is None and base_spec.higher_is_better is None
    pairs = pairs if pairs else base_spec.pairs
    table = _as_table(results, source)
    if table is not None:
        arms, metric = _arms_from_table(table, metric, source, variant_column, seed_column)
    elif isinstance(results, Mapping):
        arms = _arms_from_mapping(results, source)
        metric = metric or "metric"
        if paired is None and len({a.values.size for a in arms.values()}) > 1:
            paired = False  # arrays of different lengths cannot be paired by position
    else:
        raise _bad(
            source,
            "results",
            "a mapping {variant: values}, a pyarrow Table or a pandas DataFrame",
            type(results).__name__,
            "pass per-seed final values, e.g. {'plain': [...], 'bn': [...]}",
        )
    if len(arms) < 2:
        raise _bad(
            source,
            variant_column,
            "at least two variants",
            f"{list(arms)}",
            "add the baseline's and the variant's per-seed values",
        )
    for name, arm in arms.items():
        if arm.values.size < 2:
            raise _bad(
                source,
                f"{variant_column} {name!r}",
                "at least 2 seeds per variant",
                f"{arm.values.size}",
                "add seeds: one run is not a distribution",
            )
    if table is None and unnamed:
        raise _bad(
            source,
            "lower_is_better",
            "the direction of the values: lower_is_better=True (a loss) or False "
            "(accuracy), or a metric name that says it",
            "neither",
            "pass lower_is_better=..., or metric='val_loss' / 'val_accuracy'",
        )
    base = baseline if baseline is not None else next(iter(arms))
    updates: dict[str, Any] = {"metric": metric}
    if alpha is not None:
        updates["alpha"] = alpha
    if margin is not None or margin_pct is not None:
        updates.update(margin=margin, margin_pct=margin_pct)
    if lower_is_better is not None:
        updates["higher_is_better"] = not lower_is_better
    try:
        spec = VerdictSpec.model_validate({**base_spec.model_dump(), **updates})
    except ValidationError as exc:
        raise to_study_error(exc, source, prefix="verdicts") from exc
    comparisons_of = list(pairs) if pairs else [(v, base) for v in arms if v != base]
    for v, b in comparisons_of:
        for name in (v, b):
            if name not in arms:
                raise _bad(
                    source,
                    "baseline" if name == base else "pairs",
                    f"a variant of the results, one of {list(arms)}",
                    repr(name),
                    "use one of the variant names in the results",
                )
    comparisons = compare_arms(arms, comparisons_of, spec, metric, paired=paired)
    lower = _lower_is_better(metric, spec.higher_is_better)
    summary = {
        name: {
            "n_seeds": int(arm.values.size),
            "diverged": int(arm.diverged.sum()),
            "metric": metric,
            f"final_{metric}": final_distribution(arm.values),
        }
        for name, arm in arms.items()
    }
    notes = [UNPAIRED_NOTE] if any(not c.paired for c in comparisons) else []
    if spec.higher_is_better is None and not name_says_direction(metric):
        better = "lower" if lower else "higher"
        notes.append(
            f"the direction was guessed from the name {metric!r}: {better} is better; say so "
            "with --higher-is-better / --lower-is-better (lower_is_better=...) if not"
        )
    for c in comparisons:
        left_out = arms[c.variant].values.size + arms[c.baseline].values.size - 2 * c.n
        if c.paired and left_out:
            notes.append(
                f"{c.variant} vs {c.baseline}: paired on the {c.n} seeds both have; "
                f"{left_out} seed(s) without a partner were left out"
            )
    return CompareResult(metric, base, lower, comparisons, summary, source, notes)
