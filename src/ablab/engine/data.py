"""Load a study's rows and split them exactly like ``keras.Model.fit(validation_split=...)``."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ablab.errors import StudyError
from ablab.study.schema import Study

Arrays = Any
"""An array, or -- for a multi-input / multi-output model -- a dict (input / output name ->
array) or a list of arrays, all with the same rows: what ``fit`` takes as ``x`` or ``y``."""


def tree_map(fn: Callable[[np.ndarray], Any], arrays: Arrays) -> Any:
    """``fn`` applied to each array of ``arrays`` (one array, a dict or a list of them)."""
    if isinstance(arrays, dict):
        return {k: fn(v) for k, v in arrays.items()}
    if isinstance(arrays, list | tuple):
        return [fn(v) for v in arrays]
    return fn(arrays)


def named_arrays(arrays: Arrays, name: str) -> list[tuple[str, np.ndarray]]:
    """``(name, array)`` of each array of ``arrays``: ``x``, ``x.<key>`` or ``x[<i>]``."""
    if isinstance(arrays, dict):
        return [(f"{name}.{k}", v) for k, v in arrays.items()]
    if isinstance(arrays, list | tuple):
        return [(f"{name}[{i}]", v) for i, v in enumerate(arrays)]
    return [(name, arrays)]


def is_structured(arrays: Arrays) -> bool:
    """Several arrays (a multi-input / multi-output model's), not one?"""
    return isinstance(arrays, dict | list | tuple)


def rows_of(arrays: Arrays) -> int:
    """The row count of ``arrays`` (its first array's; all share it)."""
    return int(named_arrays(arrays, "")[0][1].shape[0])


def row_shape(arrays: Arrays) -> tuple[int, ...]:
    """One row's shape; several arrays: ``(their elements per row, summed,)`` (memory)."""
    if not is_structured(arrays):
        return tuple(arrays.shape[1:])
    return (sum(math.prod(a.shape[1:]) for _, a in named_arrays(arrays, "")),)


@dataclass(frozen=True)
class Dataset:
    """All rows of a study, float32, before any split.

    x: (rows, *features); y: (rows, *targets) -- or dicts / lists of such arrays (several
    inputs or outputs).
    """

    x: Arrays
    y: Arrays
    sample_weight: np.ndarray | None = None
    """(rows,) per-row loss weights (``[data] sample_weight``), or None."""

    @property
    def rows(self) -> int:
        return rows_of(self.x)


@dataclass(frozen=True)
class Split:
    """Train and validation rows, as ``fit`` cuts them (validation = the last fraction)."""

    x_train: Arrays
    y_train: Arrays
    x_val: Arrays | None
    y_val: Arrays | None
    sw_train: np.ndarray | None = None
    """(n_train,) sample weights of the training rows (``fit(sample_weight=...)`` or the
    class weights ``fit(class_weight=...)`` turns into), or None: unweighted."""
    sw_val: np.ndarray | None = None
    """(n_val,) sample weights of the validation rows, or None."""

    @property
    def n_train(self) -> int:
        return rows_of(self.x_train)

    @property
    def n_val(self) -> int:
        return 0 if self.x_val is None else rows_of(self.x_val)


def _err(study: Study, key: str, expected: str, got: str, fix: str) -> StudyError:
    return StudyError(where=study.source, key=key, expected=expected, got=got, fix=fix)


def physical_memory_bytes() -> int | None:
    """This machine's physical memory, where the OS says (None elsewhere)."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, OSError, ValueError):
        return None


def _synthetic(study: Study) -> np.ndarray:
    syn = study.data.synthetic
    assert syn is not None
    need = 12 * math.prod(syn.shape)  # numpy draws float64, then the float32 copy
    memory = physical_memory_bytes()
    if memory is not None and need > memory // 2:
        raise _err(
            study,
            "data.synthetic.shape",
            f"data that fits in half of this machine's memory ({memory / 2**30:.1f} GiB)",
            f"{list(syn.shape)}: ~{need / 2**30:.1f} GiB to draw",
            "use fewer rows or features",
        )
    # RandomState(seed) draws the same stream as the legacy `np.random.seed(seed)`.
    rng = np.random.RandomState(syn.seed)
    if syn.kind == "normal":
        return rng.normal(syn.mean, syn.std, syn.shape)
    return rng.uniform(syn.low, syn.high, syn.shape)


def _read_table(path: Path) -> dict[str, np.ndarray]:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    table = pq.read_table(path) if path.suffix == ".parquet" else pacsv.read_csv(path)
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}


def _read_file(study: Study, key: str, path_text: str) -> np.ndarray | dict[str, np.ndarray]:
    path = Path(study.root) / path_text
    if not path.is_file():
        raise _err(
            study,
            key,
            "an existing data file",
            f"{str(path)!r} (no such file)",
            "check the path; relative paths resolve against the study file's folder",
        )
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            return np.load(path, allow_pickle=False)
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                return {k: npz[k] for k in npz.files}
        if suffix in (".csv", ".parquet"):
            return _read_table(path)
    except Exception as exc:  # the reader's own message is the 'got'
        raise _err(
            study,
            key,
            f"a readable {suffix} file",
            f"{type(exc).__name__}: {exc}",
            "check the file's format",
        ) from exc
    raise _err(
        study,
        key,
        "a .npy, .npz, .csv or .parquet file",
        repr(path.name),
        "convert the data to one of those formats",
    )


def _numeric(study: Study, key: str, cols: dict[str, np.ndarray], names: list[str]) -> None:
    """Refuse text (or other non-numeric) columns by name, before any conversion."""
    text = [
        n
        for n in names
        if not (
            np.issubdtype(np.asarray(cols[n]).dtype, np.number)
            or np.asarray(cols[n]).dtype == np.bool_
        )
    ]
    if text:
        sample = np.asarray(cols[text[0]])[:1]
        raise _err(
            study,
            key,
            "numeric columns",
            f"non-numeric column(s) {text} (e.g. {text[0]} = {sample[0]!r})"
            if sample.size
            else f"non-numeric column(s) {text}",
            "drop them (list the columns to use in `features = [...]`) or encode them as "
            "numbers first (e.g. one-hot or integer codes)",
        )


def _columns(study: Study, key: str, cols: dict[str, np.ndarray], names: list[str]) -> np.ndarray:
    missing = [n for n in names if n not in cols]
    if missing:
        raise _err(
            study,
            key,
            f"columns among {sorted(cols)}",
            f"missing {missing}",
            "name existing columns",
        )
    _numeric(study, key, cols, names)
    return np.stack([np.asarray(cols[n], dtype=np.float64) for n in names], axis=1)


def _from_path(study: Study) -> tuple[np.ndarray, np.ndarray]:
    spec = study.data
    assert spec.path is not None
    loaded = _read_file(study, "data.path", spec.path)
    target_loaded = None
    if spec.target_path is not None:
        target_loaded = _read_file(study, "data.target_path", spec.target_path)
    if spec.x_keys is not None or spec.targets is not None:
        return _named_npz(study, loaded)

    if spec.target is None and spec.target_path is None and isinstance(loaded, dict):
        # a table or an .npz has named columns / arrays: which one is the target?
        raise _err(
            study,
            "data.target",
            'the target named: a column / array name, or "input" for an autoencoder',
            f"no `target` (the file has {sorted(loaded)})",
            'set `target` to the column to predict, e.g. target = "label" (or target = '
            '"input" to reconstruct the features, or target_path = "y.npy")',
        )
    x: Arrays
    if isinstance(loaded, np.ndarray):
        x = loaded
    elif spec.path.lower().endswith(".npz"):
        if spec.x_key not in loaded:
            raise _err(
                study,
                "data.x_key",
                f"an array name among {sorted(loaded)}",
                repr(spec.x_key),
                "set x_key to the features array's name",
            )
        x = loaded[spec.x_key]
    else:  # table
        feature_names = spec.features
        if feature_names is None:  # None: every column but the target and the weights
            feature_names = [c for c in loaded if c not in (spec.target, spec.sample_weight)]
        x = _columns(study, "data.features", loaded, feature_names)

    if target_loaded is not None:
        if isinstance(target_loaded, np.ndarray):
            y = target_loaded
        else:
            name = spec.target if spec.target in target_loaded else next(iter(target_loaded))
            y = np.asarray(target_loaded[name])
    elif spec.target in (None, "input"):
        y = x
    elif isinstance(loaded, dict) and spec.target in loaded:
        if not spec.path.lower().endswith(".npz"):
            _numeric(study, "data.target", loaded, [spec.target])
        y = np.asarray(loaded[spec.target])
        if not spec.path.lower().endswith(".npz") and y.ndim == 1:
            y = y[:, None]
    else:
        available = sorted(loaded) if isinstance(loaded, dict) else []
        raise _err(
            study,
            "data.target",
            f'"input", or a column / array name among {available}, or a target_path',
            repr(spec.target),
            'set target = "input" for an autoencoder, or name the target',
        )
    return x, y


def _named_npz(study: Study, loaded: np.ndarray | dict[str, np.ndarray]) -> tuple[Arrays, Arrays]:
    """``x_keys`` / ``targets``: the inputs / targets of a multi-input / multi-output model,
    arrays of an .npz file by name (``x_key`` / ``target`` for the one not given)."""
    spec = study.data
    if not isinstance(loaded, dict) or spec.target_path is not None:
        raise _err(
            study,
            "data.x_keys" if spec.x_keys is not None else "data.targets",
            "an .npz data file (path) holding the named arrays, and no target_path",
            f"path = {spec.path!r}" + (", a target_path" if spec.target_path else ""),
            "store every input and target array in one .npz file",
        )

    def pick(key: str, name: str) -> np.ndarray:
        if name not in loaded:
            raise _err(
                study,
                key,
                f"an array name among {sorted(loaded)}",
                repr(name),
                "name the arrays the .npz file holds",
            )
        return np.asarray(loaded[name])

    def of(key: str, names: dict[str, str] | list[str]) -> Arrays:
        if isinstance(names, dict):
            return {k: pick(f"{key}.{k}", v) for k, v in names.items()}
        return [pick(f"{key}[{i}]", v) for i, v in enumerate(names)]

    x = (
        of("data.x_keys", spec.x_keys)
        if spec.x_keys is not None
        else pick("data.x_key", spec.x_key)
    )
    if spec.targets is not None:
        y = of("data.targets", spec.targets)
    elif spec.target in (None, "input"):
        y = x
    else:
        y = pick("data.target", str(spec.target))
    return x, y


def _sklearn(study: Study) -> tuple[np.ndarray, np.ndarray]:
    """A dataset that ships inside scikit-learn (no download): features and its target,
    or the features as the target when ``target = "input"`` is set explicitly."""
    spec = study.data
    try:
        from sklearn import datasets
    except ImportError as exc:
        raise _err(
            study,
            "data.sklearn",
            "scikit-learn installed",
            "it is not",
            "pip install 'ablab[datasets]' (or scikit-learn)",
        ) from exc
    x, y = getattr(datasets, f"load_{spec.sklearn}")(return_X_y=True)
    if spec.target_is_input():
        return x, x
    return x, y.reshape(-1, 1)  # one column: class index (sparse losses) or value


def load_dataset(study: Study) -> Dataset:
    """All rows of ``study`` as float32 arrays, validated (non-empty, finite, same row count)."""
    spec = study.data
    if spec.sklearn is not None:
        x, y = _sklearn(study)
    elif spec.synthetic is not None:
        x = _synthetic(study)
        if spec.target not in (None, "input"):
            raise _err(
                study,
                "data.target",
                '"input" for synthetic data',
                repr(spec.target),
                'use target = "input", or load your data from a file',
            )
        y = x
    else:
        x, y = _from_path(study)
    try:
        x = tree_map(lambda a: np.asarray(a, dtype=np.float32), x)
        y = tree_map(lambda a: np.asarray(a, dtype=np.float32), y)
    except (TypeError, ValueError) as exc:
        raise _err(
            study,
            "data",
            "numeric data",
            f"{type(exc).__name__}: {exc}",
            "encode non-numeric columns as numbers first",
        ) from exc
    x = tree_map(lambda a: a.reshape(-1, 1) if a.ndim < 2 else a, x)
    for name, arr in named_arrays(y, "target"):
        if arr.ndim < 1:
            raise _err(
                study,
                "data.target",
                "one target per row",
                f"shape {arr.shape}" + (f" ({name})" if name != "target" else ""),
                "give the target a row dimension",
            )
    rows = rows_of(x)
    if rows == 0:
        raise _err(study, "data", "at least one row", "0 rows", "point the study at non-empty data")
    for name, arr in [*named_arrays(x, "features")[1:], *named_arrays(y, "target")]:
        if arr.shape[0] != rows:
            raise _err(
                study,
                "data.target" if name == "target" else "data",
                f"{rows} rows in every array (one per input row)",
                f"{arr.shape[0]} rows in {name}",
                "make features and target the same length",
            )
    for name, arr in [*named_arrays(x, "features"), *named_arrays(y, "target")]:
        bad = ~np.isfinite(arr)
        if bad.any():
            row = int(np.argwhere(bad)[0][0])
            raise _err(
                study,
                "data",
                f"finite {name} (no NaN or inf)",
                f"{int(bad.sum())} non-finite values, the first in row {row}",
                "drop or impute the non-finite values before the study",
            )
    sw = None if spec.sample_weight is None else _sample_weight(study, rows)
    if spec.row_seed is not None:
        order = np.random.default_rng(spec.row_seed).permutation(rows)
        x, y = tree_map(lambda a: a[order], x), tree_map(lambda a: a[order], y)
        sw = None if sw is None else sw[order]
    return Dataset(x=x, y=y, sample_weight=sw)


def _sample_weight(study: Study, rows: int) -> np.ndarray:
    """``[data] sample_weight``: a column / array of the data file, or a file of its own --
    (rows,) finite float32."""
    spec = study.data
    name = spec.sample_weight
    assert name is not None
    key = "data.sample_weight"
    column = spec.path is not None and not name.lower().endswith(_SUFFIXES)
    if column:
        assert spec.path is not None
        loaded = _read_file(study, "data.path", spec.path)
        if not isinstance(loaded, dict) or name not in loaded:
            raise _err(
                study,
                key,
                "a column / array name of the data file, or a .npy / .csv file of weights",
                repr(name)
                + (f" (the file has {sorted(loaded)})" if isinstance(loaded, dict) else ""),
                'name the weights column, e.g. sample_weight = "w"',
            )
        if not spec.path.lower().endswith(".npz"):
            _numeric(study, key, loaded, [name])
        raw = np.asarray(loaded[name])
    else:
        read = _read_file(study, key, name)
        raw = np.asarray(next(iter(read.values())) if isinstance(read, dict) else read)
    sw = np.asarray(raw, dtype=np.float32).reshape(-1) if np.size(raw) == rows else None
    if sw is None:
        raise _err(
            study,
            key,
            f"one weight per row ({rows})",
            f"shape {np.shape(raw)}",
            "give one weight per data row",
        )
    if not np.isfinite(sw).all():
        raise _err(study, key, "finite weights", "NaN or inf among them", "drop or fix those rows")
    return sw


_SUFFIXES = (".npy", ".npz", ".csv", ".parquet")


def standardized(parts: Split, *, target_too: bool) -> Split:
    """Features scaled by the training split's mean and standard deviation (a constant
    column keeps scale 1); validation rows use the same statistics. ``target_too``: the
    target as well (an autoencoder's target is its input). Several inputs: each scaled by its
    own statistics."""
    if is_structured(parts.x_train):
        keys = list(parts.x_train) if isinstance(parts.x_train, dict) else None
        train = parts.x_train if keys is not None else dict(enumerate(parts.x_train))
        val = parts.x_val
        if val is not None and keys is None:
            val = dict(enumerate(val))
        scaled = {
            k: standardized(
                Split(a, a, None if val is None else val[k], None if val is None else val[k]),
                target_too=False,
            )
            for k, a in train.items()
        }
        back = (lambda d: d) if keys is not None else (lambda d: [d[k] for k in sorted(d)])
        x_train = back({k: p.x_train for k, p in scaled.items()})
        x_val = None if val is None else back({k: p.x_val for k, p in scaled.items()})
        if not target_too:
            return dataclasses.replace(parts, x_train=x_train, x_val=x_val)
        return dataclasses.replace(
            parts, x_train=x_train, y_train=x_train, x_val=x_val, y_val=x_val
        )
    mean = parts.x_train.mean(axis=0)
    std = parts.x_train.std(axis=0)
    std = np.where(std > 0, std, 1.0).astype(np.float32)

    def scale(a: np.ndarray | None) -> np.ndarray | None:
        return None if a is None else ((a - mean) / std).astype(np.float32)

    x_train, x_val = scale(parts.x_train), scale(parts.x_val)
    assert x_train is not None
    if not target_too:
        return dataclasses.replace(parts, x_train=x_train, x_val=x_val)
    y_train = scale(parts.y_train)
    assert y_train is not None
    return dataclasses.replace(
        parts, x_train=x_train, y_train=y_train, x_val=x_val, y_val=scale(parts.y_val)
    )


def split(data: Dataset, validation_split: float, *, where: str = "<study>") -> Split:
    """Cut like ``fit``: train = the first ``floor(rows * (1 - validation_split))`` rows.

    Uses Keras' own ``train_validation_split`` (keras/src/trainers/data_adapters/
    array_slicing.py) so the boundary is Keras' to the row.
    """
    if validation_split == 0.0:
        return Split(data.x, data.y, None, None, data.sample_weight)
    from ablab._keras import array_slicing

    try:
        (x_tr, y_tr, sw_tr), (x_va, y_va, sw_va) = array_slicing.train_validation_split(
            (data.x, data.y, data.sample_weight), validation_split=validation_split
        )
    except ValueError as exc:
        raise StudyError(
            where=where,
            key="train.validation_split",
            expected="a fraction that leaves at least one training and one validation row",
            got=f"{validation_split} of {data.rows} rows",
            fix="use a validation_split between 1/rows and 1 - 1/rows, or more data",
        ) from exc
    as_np = lambda a: None if a is None else np.asarray(a)  # noqa: E731
    return Split(
        tree_map(np.asarray, x_tr), tree_map(np.asarray, y_tr), tree_map(np.asarray, x_va),
        tree_map(np.asarray, y_va), as_np(sw_tr), as_np(sw_va),
    )  # fmt: skip


def with_validation_data(train: Dataset, validation: Dataset) -> Split:
    """All of ``train`` for training and ``validation`` for validation, as
    ``fit(validation_data=(x, y[, sample_weight]))`` uses them."""
    return Split(
        train.x, train.y, validation.x, validation.y, train.sample_weight,
        validation.sample_weight,
    )  # fmt: skip


def class_weighted(parts: Split, class_weight: dict[int, float]) -> Split:
    """The training rows' sample weights from ``class_weight``, by Keras' own
    ``class_weight_to_sample_weights`` (class index: the label, or the argmax of a one-hot
    row); validation rows stay unweighted, as in ``fit``."""
    from ablab._keras import data_adapter_utils

    if is_structured(parts.y_train):
        raise StudyError(
            where="<study>",
            key="train.class_weight",
            expected="a model with one output (fit refuses class_weight for several)",
            got="several targets",
            fix="pass per-row weights as sample_weight instead",
        )
    sw = data_adapter_utils.class_weight_to_sample_weights(parts.y_train, class_weight)
    return dataclasses.replace(parts, sw_train=np.asarray(sw, dtype=np.float32))
