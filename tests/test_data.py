"""Data loading and fit's validation split."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

import ablab
from ablab.engine.data import Dataset, load_dataset, split
from ablab.study.loading import study_from_dict
from tests.conftest import SEED_STUDY


def _study(tmp_path: Path, data: dict, **train: object) -> ablab.Study:
    raw = tomllib.loads(SEED_STUDY.read_text())
    raw["data"] = data
    raw["train"].update(train)
    return study_from_dict(raw, source=str(tmp_path / "s.toml"), root=str(tmp_path))


def _train_only() -> dict:
    """The seed study without its data section (tests add their own)."""
    raw = tomllib.loads(SEED_STUDY.read_text())
    del raw["data"]
    return raw


def test_synthetic_data_is_the_seed_questions_exact_data(seed_study: ablab.Study) -> None:
    # SEED.md: np.random.seed(1); x_train = np.random.normal(0, 1, (100, 12)).
    np.random.seed(1)
    expected = np.random.normal(0, 1, (100, 12)).astype(np.float32)
    data = load_dataset(seed_study)
    np.testing.assert_array_equal(data.x, expected)
    np.testing.assert_array_equal(data.y, expected)
    assert data.x.dtype == np.float32


def test_split_takes_the_last_fraction_like_fit(seed_study: ablab.Study) -> None:
    data = load_dataset(seed_study)
    parts = split(data, 0.1)
    # keras: split_at = floor(100 * (1 - 0.1)) = 90 (array_slicing.train_validation_split)
    assert parts.n_train == 90 and parts.n_val == 10
    np.testing.assert_array_equal(parts.x_train, data.x[:90])
    np.testing.assert_array_equal(parts.x_val, data.x[90:])
    assert split(data, 0.0).x_val is None


@pytest.mark.parametrize("fraction", [0.25, 0.33, 0.5, 0.07])
def test_split_boundary_is_floor(fraction: float) -> None:
    x = np.arange(30, dtype=np.float32).reshape(15, 2)
    parts = split(Dataset(x, x), fraction)
    assert parts.n_train == math.floor(15 * (1 - fraction))


def test_split_leaving_no_rows_is_a_study_error() -> None:
    x = np.zeros((3, 2), np.float32)
    with pytest.raises(ablab.StudyError) as info:
        split(Dataset(x, x), 0.7)  # floor(3 * 0.3) = 0 training rows
    assert info.value.key == "train.validation_split"


def test_npy_with_target_path(tmp_path: Path) -> None:
    x = np.random.default_rng(0).normal(size=(20, 3))
    y = x @ np.ones((3, 1))
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    data = load_dataset(_study(tmp_path, {"path": "x.npy", "target_path": "y.npy"}))
    np.testing.assert_allclose(data.x, x.astype(np.float32))
    np.testing.assert_allclose(data.y, y.astype(np.float32))


def test_npz_with_keys(tmp_path: Path) -> None:
    x = np.ones((5, 2))
    np.savez(tmp_path / "d.npz", feats=x, labels=np.arange(5.0))
    data = load_dataset(_study(tmp_path, {"path": "d.npz", "x_key": "feats", "target": "labels"}))
    assert data.x.shape == (5, 2) and data.y.shape == (5,)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_table_with_target_column(tmp_path: Path, fmt: str) -> None:
    table = pa.table({"a": [1.0, 2.0, 3.0], "b": [0.5, 0.25, 0.0], "t": [1.0, 0.0, 1.0]})
    path = tmp_path / f"d.{fmt}"
    if fmt == "csv":
        pacsv.write_csv(table, path)
    else:
        pq.write_table(table, path)
    data = load_dataset(_study(tmp_path, {"path": path.name, "target": "t"}))
    np.testing.assert_array_equal(data.x, [[1, 0.5], [2, 0.25], [3, 0]])
    np.testing.assert_array_equal(data.y, [[1], [0], [1]])
    only_a = load_dataset(_study(tmp_path, {"path": path.name, "target": "t", "features": ["a"]}))
    assert only_a.x.shape == (3, 1)


def test_nan_in_data_is_named(tmp_path: Path) -> None:
    x = np.ones((10, 2))
    x[4, 1] = np.nan
    np.save(tmp_path / "x.npy", x)
    with pytest.raises(ablab.StudyError) as info:
        load_dataset(_study(tmp_path, {"path": "x.npy"}))
    assert "row 4" in info.value.got and info.value.key == "data"


def test_inf_in_target_is_named(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.ones((4, 2)))
    np.save(tmp_path / "y.npy", np.array([1.0, np.inf, 0.0, 1.0]))
    with pytest.raises(ablab.StudyError, match="finite target"):
        load_dataset(_study(tmp_path, {"path": "x.npy", "target_path": "y.npy"}))


def test_empty_data_is_a_study_error(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.ones((0, 12)))
    with pytest.raises(ablab.StudyError, match="at least one row"):
        load_dataset(_study(tmp_path, {"path": "x.npy"}))


def test_missing_file_and_unknown_column(tmp_path: Path) -> None:
    with pytest.raises(ablab.StudyError, match="no such file"):
        load_dataset(_study(tmp_path, {"path": "nope.npy"}))
    pq.write_table(pa.table({"a": [1.0]}), tmp_path / "d.parquet")
    with pytest.raises(ablab.StudyError) as info:
        load_dataset(_study(tmp_path, {"path": "d.parquet", "target": "label"}))
    assert info.value.key == "data.target"


@pytest.mark.parametrize(
    ("name", "rows", "features"),
    [
        ("digits", 1797, 64),
        ("iris", 150, 4),
        ("wine", 178, 13),
        ("breast_cancer", 569, 30),
        ("diabetes", 442, 10),
    ],
)
def test_sklearn_datasets(name: str, rows: int, features: int) -> None:
    # row and feature counts: scikit-learn's documentation of each load_* function
    study = study_from_dict({**_train_only(), "data": {"sklearn": name}})
    data = load_dataset(study)
    assert data.x.shape == (rows, features) and data.y.shape == (rows, 1)
    assert data.x.dtype == np.float32
    auto = load_dataset(
        study_from_dict({**_train_only(), "data": {"sklearn": name, "target": "input"}})
    )
    np.testing.assert_array_equal(auto.y, auto.x)


def test_row_seed_permutes_rows_once_and_pairs_targets() -> None:
    plain = load_dataset(study_from_dict({**_train_only(), "data": {"sklearn": "iris"}}))
    perm = load_dataset(
        study_from_dict({**_train_only(), "data": {"sklearn": "iris", "row_seed": 3}})
    )
    order = np.random.default_rng(3).permutation(150)
    np.testing.assert_array_equal(perm.x, plain.x[order])
    np.testing.assert_array_equal(perm.y, plain.y[order])


def test_standardize_uses_the_training_split_only() -> None:
    from ablab.engine.data import standardized

    x = np.arange(40, dtype=np.float32).reshape(20, 2) ** 1.5
    x[:, 1] = 7.0  # a constant column keeps scale 1
    parts = split(Dataset(x, x[:, :1]), 0.25)
    scaled = standardized(parts, target_too=False)
    mean, std = parts.x_train.mean(axis=0), parts.x_train.std(axis=0)
    np.testing.assert_allclose(scaled.x_train[:, 0].mean(), 0.0, atol=1e-6)
    np.testing.assert_allclose(scaled.x_train[:, 0].std(), 1.0, rtol=1e-5)
    np.testing.assert_allclose(
        scaled.x_val[:, 0], (parts.x_val[:, 0] - mean[0]) / std[0], rtol=1e-6
    )
    np.testing.assert_array_equal(scaled.x_train[:, 1], 0.0)
    np.testing.assert_array_equal(scaled.y_train, parts.y_train)  # the target stays
    autoencoder = standardized(split(Dataset(x, x), 0.25), target_too=True)
    np.testing.assert_array_equal(autoencoder.y_val, autoencoder.x_val)


def test_two_data_sources_are_refused() -> None:
    with pytest.raises(ablab.StudyError, match="exactly one of"):
        study_from_dict({**_train_only(), "data": {"sklearn": "iris", "path": "x.npy"}})


def test_text_columns_are_named_with_the_fix(tmp_path: Path) -> None:
    """A text column ended in `ValueError: could not convert string to float: 'blue'`
    (issue #16)."""
    (tmp_path / "d.csv").write_text("a,color,y\n1.0,blue,0.5\n2.0,red,0.1\n")
    with pytest.raises(ablab.StudyError, match=r"\[data\.features\]") as info:
        load_dataset(_study(tmp_path, {"path": "d.csv", "target": "y"}))
    assert "['color']" in str(info.value) and "'blue'" in str(info.value)
    assert "features = [...]" in str(info.value)
    data = load_dataset(_study(tmp_path, {"path": "d.csv", "target": "y", "features": ["a"]}))
    assert data.x.shape == (2, 1)
    (tmp_path / "t.csv").write_text("a,label\n1.0,cat\n2.0,dog\n")
    with pytest.raises(ablab.StudyError, match=r"\[data\.target\].*'label'"):
        load_dataset(_study(tmp_path, {"path": "t.csv", "target": "label"}))


def test_a_table_without_target_is_refused_not_an_autoencoder(tmp_path: Path) -> None:
    """A CSV study without `target` silently became an autoencoder and then failed on the
    output shape with the wrong fix (issue #16). `target = "input"` still says it."""
    (tmp_path / "d.csv").write_text("a,b\n1.0,2.0\n3.0,4.0\n")
    with pytest.raises(ablab.StudyError, match="set `target`"):
        load_dataset(_study(tmp_path, {"path": "d.csv"}))
    np.savez(tmp_path / "d.npz", x=np.ones((2, 3)), y=np.zeros(2))
    with pytest.raises(ablab.StudyError, match="set `target`"):
        load_dataset(_study(tmp_path, {"path": "d.npz"}))
    data = load_dataset(_study(tmp_path, {"path": "d.csv", "target": "input"}))
    np.testing.assert_array_equal(data.x, data.y)
    np.save(tmp_path / "d.npy", np.ones((2, 3)))  # one unnamed array: the input, as documented
    data = load_dataset(_study(tmp_path, {"path": "d.npy"}))
    np.testing.assert_array_equal(data.x, data.y)
