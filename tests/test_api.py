"""The Python API in Keras' vocabulary (ablab.execution.api.ablate), ``ablab.open_run`` as a
RunResult, and ``ablab.Study(...)``'s friendly errors (issue #18, items 1 and 5)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import keras
import numpy as np
import pytest

import ablab
from ablab.cli import main
from ablab.engine.build import build_program
from ablab.errors import InputError, StudyError
from ablab.store.rundir import RUN_ROOT, RunDir

ROWS, FEATURES, SEEDS = 40, 4, 4
COMPILE = {"optimizer": "adam", "loss": "mse"}
FIT = {"epochs": 2, "batch_size": 16, "validation_split": 0.25, "shuffle": False}
PLAIN = [{"layer": "Dense", "units": 2}, {"layer": "Dense", "units": FEATURES}]
BN = [
    {"layer": "Dense", "units": 2},
    {"layer": "BatchNormalization"},
    {"layer": "Dense", "units": FEATURES},
]


def build_plain() -> keras.Model:
    """Importable (module level): stored by name, ``tests.test_api:build_plain``."""
    return keras.Sequential(
        [keras.Input((FEATURES,)), keras.layers.Dense(2), keras.layers.Dense(FEATURES)]
    )


def _bn_model() -> keras.Model:
    return keras.Sequential(
        [
            keras.Input((FEATURES,)),
            keras.layers.Dense(2),
            keras.layers.BatchNormalization(),
            keras.layers.Dense(FEATURES),
        ]
    )


def _x() -> np.ndarray:
    return np.random.RandomState(1).normal(0, 1, (ROWS, FEATURES))


@pytest.fixture(scope="module")
def ablated(tmp_path_factory: pytest.TempPathFactory) -> ablab.RunResult:
    """plain by an importable function, bn by a lambda (stored as models/bn.json)."""
    runs = tmp_path_factory.mktemp("api") / "runs"
    x = _x()
    return ablab.ablate(
        {"plain": build_plain, "bn": lambda: _bn_model()},
        x,
        x,
        compile=COMPILE,
        fit=FIT,
        seeds=SEEDS,
        probes={"enabled": False},
        runs_dir=runs,
    )


def test_ablate_equals_the_same_study_from_a_dict(ablated: ablab.RunResult, tmp_path: Path) -> None:
    # expected values: the same models, data and settings as an ordinary (dict) study with
    # inline layers -- paired seeds must give the very same histories, bit for bit
    np.savez(tmp_path / "d.npz", x=_x(), y=_x())
    study = ablab.study_from_dict(
        {
            "data": {"path": "d.npz", "target": "y"},
            "train": {**COMPILE, **FIT},
            "variants": {"plain": {"layers": PLAIN}, "bn": {"layers": BN}},
            "seeds": {"count": SEEDS},
            "probes": {"enabled": False},
        },
        root=str(tmp_path),
    )
    plain = ablab.run(study, runs_dir=tmp_path / "runs")
    assert list(ablated.histories) == ["plain", "bn"] and ablated.study.baseline == "plain"
    for v in ("plain", "bn"):
        for name, values in plain.histories[v].values.items():
            np.testing.assert_array_equal(ablated.histories[v].values[name], values)
    assert [c.verdict for c in ablated.comparisons] == [c.verdict for c in plain.comparisons]


def test_the_stored_study_names_its_models_and_data(ablated: ablab.RunResult) -> None:
    stored = json.loads((ablated.run_dir / "study.json").read_text())["study"]
    assert stored["root"] == RUN_ROOT and stored["source"] == "ablab.ablate"
    assert stored["variants"]["plain"]["builder"] == "tests.test_api:build_plain"
    assert stored["variants"]["bn"]["builder"] == "models/bn.json"
    assert stored["data"]["path"] == "data/arrays.npz"
    with np.load(ablated.run_dir / "data" / "arrays.npz") as npz:
        np.testing.assert_array_equal(npz["x"], _x())
    recorded = RunDir(ablated.run_dir).checksums()
    assert {"data/arrays.npz", "models/bn.json"} <= set(recorded)


def test_cli_resumes_and_shows_a_python_built_run(
    ablated: ablab.RunResult, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = tmp_path / "runs"
    shutil.copytree(ablated.run_dir, runs / ablated.run_id)
    copy = runs / ablated.run_id
    (copy / "cells" / "bn" / "chunk-00000.parquet").unlink()  # a lost cell: resume re-trains
    assert main(["run", "--resume", ablated.run_id, "--runs-dir", str(runs), "-q"]) == 0
    resumed = ablab.open_run(ablated.run_id, runs_dir=runs)
    for v in ("plain", "bn"):
        for name, values in ablated.histories[v].values.items():
            np.testing.assert_array_equal(resumed.histories[v].values[name], values)
    capsys.readouterr()
    assert main(["show", ablated.run_id, "--runs-dir", str(runs), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["variants"]["bn"]["n_seeds"] == SEEDS


def test_resume_refuses_changed_data(ablated: ablab.RunResult, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    copy = runs / ablated.run_id
    shutil.copytree(ablated.run_dir, copy)
    (copy / "cells" / "plain" / "chunk-00000.parquet").unlink()
    np.savez(copy / "data" / "arrays.npz", x=_x() + 1, y=_x())
    with pytest.raises(InputError, match=r"data/arrays\.npz: checksum mismatch"):
        ablab.resume(ablated.run_id, runs_dir=runs)


def test_open_run_is_a_run_result(
    ablated: ablab.RunResult, monkeypatch: pytest.MonkeyPatch
) -> None:
    # today: a ReportData without run_id, comparisons, summary or write_report
    monkeypatch.setenv("ABLAB_RUNS_DIR", str(ablated.run_dir.parent))  # the CLI's default
    opened = ablab.open_run("latest")
    assert isinstance(opened, ablab.RunResult)
    assert opened.run_id == ablated.run_id and opened.state == "complete"
    assert opened.summary == ablated.summary
    assert [c.to_json() for c in opened.comparisons] == [c.to_json() for c in ablated.comparisons]
    assert callable(opened.write_report) and callable(opened.plot)
    assert "plain" in opened._repr_html_()
    assert ablab.open_run(ablated.run_id[:12], runs_dir=ablated.run_dir.parent).run_id == (
        ablated.run_id
    )


def test_a_model_object_is_a_builder() -> None:
    # today: `got {} -> TypeError: missing a required argument: 'inputs'`
    study = ablab.Study(
        data={"synthetic": {"shape": [ROWS, FEATURES]}},
        train={**COMPILE, **FIT},
        model={"builder": build_plain()},
    )
    program = build_program(study, "default", probes=False)
    assert [type(layer).__name__ for layer in program.prepared.model.layers] == ["Dense", "Dense"]
    assert "instance>" in study.resolved()["model"]["builder"]


def test_study_raises_the_friendly_error() -> None:
    # today: a raw pydantic ValidationError with a URL
    with pytest.raises(StudyError, match=r"(?s)\[train\.epochz\].*did you mean `epochs`"):
        ablab.Study(data={"synthetic": {"shape": [8, 2]}}, train={"loss": "mse", "epochz": 3})
    with pytest.raises(StudyError, match=r"\[data\] expected exactly one of"):
        ablab.Study.model_validate({"data": {}, "train": {"loss": "mse"}})


def _not_a_model() -> str:
    return "nope"


@pytest.mark.parametrize(
    ("kwargs", "key", "says"),
    [
        ({"y": np.zeros((ROWS - 1, FEATURES))}, "y", f"expected {ROWS} rows"),
        ({"fit": {"epochz": 2}}, "fit.epochz", "fit arguments ablab takes: epochs"),
        ({"fit": {"epochs": 0}}, "fit.epochs", "greater than or equal to 1"),
        ({"compile": {"loss": "mse", "jit_compile": True}}, "compile.jit_compile", "optimizer"),
        ({"compile": {"optimizer": "adam"}}, "compile.loss", "present"),
        ({"variants": {"a": _not_a_model}}, "variants.a.builder", "returning an uncompiled"),
        ({"variants": {"a": lambda: 3}}, "variants.a", "returning a keras.Model"),
        ({"x": {"a": np.zeros((ROWS, 2)), "b": np.zeros((ROWS - 1, 2))}}, "x.b", "40 rows"),
        ({"y": [np.zeros((ROWS, 2)), np.zeros((ROWS + 1, 2))]}, "y[1]", f"{ROWS} rows"),
        ({"fit": {"sample_weight": {"a": np.ones(ROWS)}}}, "fit.sample_weight", "one array"),
        ({"y": None}, "y", "y=x for an autoencoder"),
        ({"variants": {"baseline": build_plain}}, "variants", "other than 'baseline'"),
        (
            {"fit": {"callbacks": [keras.callbacks.TerminateOnNaN()]}},
            "fit.callbacks[0]",
            "--engine reference",
        ),
    ],
)
def test_ablate_refuses_bad_input_before_writing(
    kwargs: dict, key: str, says: str, tmp_path: Path
) -> None:
    # today: in-memory arrays are refused outright (`[data.x] ... unknown key 'x'`)
    args = {
        "variants": {"a": build_plain},
        "x": _x(),
        "y": _x(),
        "compile": COMPILE,
        "fit": FIT,
        "seeds": 2,
        "runs_dir": tmp_path / "runs",
    } | kwargs
    with pytest.raises(StudyError) as info:
        ablab.ablate(**args)
    assert info.value.where == "ablab.ablate" and info.value.key == key
    assert says in str(info.value)
    assert not (tmp_path / "runs").exists()


MULTI_ROWS = 40


def build_two_inputs() -> keras.Model:
    a, b = keras.Input(shape=(3,), name="a"), keras.Input(shape=(2,), name="b")
    h = keras.layers.Dense(4, activation="tanh")(keras.layers.Concatenate()([a, b]))
    return keras.Model({"a": a, "b": b}, keras.layers.Dense(2)(h))


def build_two_inputs_list() -> keras.Model:
    a, b = keras.Input(shape=(3,), name="a"), keras.Input(shape=(2,), name="b")
    h = keras.layers.Dense(4, activation="tanh")(keras.layers.Concatenate()([a, b]))
    return keras.Model([a, b], keras.layers.Dense(2)(h))


def build_two_outputs() -> keras.Model:
    a, b = keras.Input(shape=(3,), name="a"), keras.Input(shape=(2,), name="b")
    h = keras.layers.Dense(4, activation="tanh")(keras.layers.Concatenate()([a, b]))
    out = {"p": keras.layers.Dense(2, name="p")(h), "q": keras.layers.Dense(1, name="q")(h)}
    return keras.Model({"a": a, "b": b}, out)


def _multi_data() -> tuple[dict, np.ndarray, dict]:
    rng = np.random.RandomState(3)
    x = {"a": rng.normal(size=(MULTI_ROWS, 3)), "b": rng.normal(size=(MULTI_ROWS, 2))}
    y = rng.normal(size=(MULTI_ROWS, 2))
    return x, y, {"p": y, "q": rng.normal(size=(MULTI_ROWS, 1))}


def _assert_fit_fidelity(result: ablab.RunResult) -> None:
    """The engine's History equals model.fit's from the same initial weights, every seed."""
    from ablab.engine.reference import reference_history

    study = result.study.model_copy(update={"root": str(result.run_dir)})
    table = result.history.to_pydict()
    for variant, history in result.histories.items():
        program = build_program(study, variant, probes=False)
        for i, seed in enumerate(history.seeds):
            ref = reference_history(program, int(seed))
            stopped = ref.pop("stopped_epoch", None)  # EarlyStopping: a column of its own
            if stopped is not None:
                rows = [
                    r
                    for r, (v, s) in enumerate(zip(table["variant"], table["seed"], strict=True))
                    if v == variant and s == int(seed)
                ]
                assert (table["stopped_epoch"][rows[0]] or 0) == int(stopped)
            assert set(ref) == set(history.values), (sorted(ref), sorted(history.values))
            for name, expected in ref.items():
                np.testing.assert_allclose(
                    history.values[name][i], expected, rtol=1e-5, err_msg=f"{seed} {name}"
                )


@pytest.mark.parametrize("shuffle", [False, True])
def test_ablate_multi_input_dict_matches_model_fit(shuffle: bool, tmp_path: Path) -> None:
    x, y, _ = _multi_data()
    result = ablab.ablate(
        {"two": build_two_inputs},
        x,
        y,
        compile={"optimizer": "adam", "loss": "mse"},
        fit={"epochs": 2, "batch_size": 16, "validation_split": 0.25, "shuffle": shuffle},
        seeds=3,
        runs_dir=tmp_path / "runs",
    )
    stored = json.loads((result.run_dir / "study.json").read_text())["study"]["data"]
    assert stored["x_keys"] == {"a": "x.a", "b": "x.b"} and stored["target"] == "y"
    assert set(result.histories["two"].values) >= {"loss", "val_loss"}
    _assert_fit_fidelity(result)


def test_ablate_multi_input_list_and_validation_data(tmp_path: Path) -> None:
    x, y, _ = _multi_data()
    rows = MULTI_ROWS // 4
    val = ([x["a"][-rows:], x["b"][-rows:]], y[-rows:])
    result = ablab.ablate(
        {"two": build_two_inputs_list},
        [x["a"][:-rows], x["b"][:-rows]],
        y[:-rows],
        compile={"optimizer": "sgd", "loss": "mse"},
        fit={
            "epochs": 2,
            "batch_size": 8,
            "validation_data": val,
            # Keras' own callback object, per seed (was: "unknown argument 'callbacks'")
            "callbacks": [keras.callbacks.EarlyStopping(monitor="val_loss", patience=0)],
        },
        seeds=2,
        runs_dir=tmp_path / "runs",
        verdicts={"metric": "val_loss"},  # recorded with validation_data (was refused)
    )
    assert result.study.train.early_stopping is not None
    _assert_fit_fidelity(result)


@pytest.mark.parametrize("loss", ["mse", {"p": "mse", "q": {"name": "Huber", "delta": 0.5}}])
def test_ablate_multi_output_dict_matches_model_fit(loss: object, tmp_path: Path) -> None:
    x, _, y = _multi_data()
    result = ablab.ablate(
        {"two": build_two_outputs},
        x,
        y,
        compile={"optimizer": "adam", "loss": loss},
        fit={"epochs": 2, "batch_size": 16, "validation_split": 0.25, "shuffle": True},
        seeds=3,
        runs_dir=tmp_path / "runs",
    )
    names = set(result.histories["two"].values)
    assert {"loss", "p_loss", "q_loss", "val_loss", "val_p_loss"} <= names, names
    _assert_fit_fidelity(result)
