"""The ``fit`` arguments users have (issue #18 item 2): class_weight, sample_weight,
validation_data, steps_per_epoch, EarlyStopping, mixed precision -- each vectorized and held
to ``keras.Model.fit``.

Expected values come from ``keras.Model.fit`` 3.15 itself (``ablab.engine.reference``, with
the same arguments and a real ``keras.callbacks.EarlyStopping``), run in this process from
the engine's own initial weights. Tolerance rtol 1e-5 (float32, as tests/test_reference.py);
mixed precision: rtol 1e-3 (measured on this model: mixed_bfloat16 1.1e-7, mixed_float16
1.1e-4 -- XLA may fuse the low-precision casts differently in the scanned program). Models
are a single Dense layer, 2-3 seeds, 4 epochs, <= 64 rows: these tests must stay cheap.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ablab
from ablab.engine.reference import reference_history
from ablab.errors import StudyError
from ablab.study.schema import TrainSpec, callback_spec
from tests.conftest import make_program

SEEDS = np.array([0, 1, 2, 3], dtype=np.uint32)


def _study(
    data: dict[str, Any] | None = None, units: int = 4, activation: str = "linear", **train: Any
) -> ablab.Study:
    spec = {
        "loss": "mse",
        "optimizer": {"name": "sgd", "learning_rate": 0.05},
        "epochs": 4,
        "batch_size": 16,
        "validation_split": 0.25,
        "shuffle": False,
        **train,
    }
    layer = {"layer": "Dense", "units": units, "activation": activation}
    return ablab.Study(
        data=data or {"synthetic": {"shape": [64, 4], "seed": 3}},
        train=spec,
        variants={"a": {"layers": [layer]}},
        source="<test>",
    )


def _assert_fit(study: ablab.Study, seeds: np.ndarray = SEEDS, rtol: float = 1e-5) -> dict:
    program = make_program(study, "a")
    engine = program.train(seeds)
    for i, seed in enumerate(seeds):
        ref = reference_history(program, int(seed))
        assert set(ref) == set(engine), (sorted(ref), sorted(engine))
        for name, expected in ref.items():
            np.testing.assert_allclose(
                engine[name][i], expected, rtol=rtol, atol=0, err_msg=f"seed {seed} {name}"
            )
    return engine


def test_early_stopping_stops_each_seed_on_its_own_like_fit() -> None:
    # monitor loss with min_delta 0.24: the seeds' epoch-to-epoch gains (0.18-0.38) cross
    # it at different epochs: seed 0 stops at epoch 3 (1-based), 2 at the last, 3 never.
    study = _study(
        early_stopping={
            "monitor": "loss",
            "min_delta": 0.24,
            "patience": 0,
            "restore_best_weights": True,
        }
    )
    engine = _assert_fit(study, SEEDS[[0, 2, 3]])
    stopped = engine["stopped_epoch"]
    assert stopped.tolist() == [3, 4, 0], stopped
    for i, at in enumerate(stopped):  # after its stop a seed's History repeats that epoch
        if at:
            assert (engine["loss"][i, at - 1 :] == engine["loss"][i, at - 1]).all()
    assert np.isfinite(engine["val_loss"]).all()  # never mistaken for divergence


def test_class_weight_and_steps_per_epoch_match_fit(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype(np.float32)
    label = (x[:, 0] + 0.5 * rng.normal(size=64) > 0.3).astype(np.float32)
    path = tmp_path / "rows.npz"
    np.savez(path, x=x, y=label[:, None])
    data = {"path": str(path), "target": "y"}
    # steps_per_epoch 1 of 3 batches (48 training rows): each pass spans three epochs
    study = _study(
        data,
        units=1,
        activation="sigmoid",
        loss="binary_crossentropy",
        class_weight={"0": 1.0, "1": 3.0},  # TOML's keys are strings
        steps_per_epoch=1,
        metrics=["accuracy"],
    )
    assert study.train.class_weight == {0: 1.0, 1: 3.0}
    _assert_fit(study, SEEDS[:2])


def test_sample_weight_and_validation_data_match_fit(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)

    def table(name: str, rows: int) -> str:
        x = rng.normal(size=(rows, 4))
        cols = {f"f{i}": x[:, i] for i in range(4)}
        cols.update(t=x @ np.array([1.0, -2.0, 0.5, 0.0]), w=rng.uniform(0.1, 3.0, rows))
        lines = [",".join(cols)] + [
            ",".join(f"{cols[c][r]:.6f}" for c in cols) for r in range(rows)
        ]
        (tmp_path / name).write_text("\n".join(lines) + "\n")
        return str(tmp_path / name)

    val = {"path": table("val.csv", 16), "target": "t", "sample_weight": "w"}
    data = {"path": table("train.csv", 48), "target": "t", "sample_weight": "w", "validation": val}
    study = _study(data, units=1, validation_split=0.0)
    program = make_program(study, "a")
    assert program.split.x_train.shape == (48, 4) and program.split.n_val == 16
    assert program.split.sw_train is not None and program.split.sw_val is not None
    _assert_fit(study, SEEDS[:2])


def test_mixed_precision_matches_fit_under_the_same_policy() -> None:
    import keras

    before = keras.config.dtype_policy().name
    study = _study(dtype_policy="mixed_bfloat16")
    program = make_program(study, "a")
    assert program.prepared.model.layers[0].dtype_policy.name == "mixed_bfloat16"
    assert keras.config.dtype_policy().name == before  # not leaked to later models
    _assert_fit(study, SEEDS[:2], rtol=1e-3)


def _float32_model(explicit: bool = False) -> Any:
    import keras

    dtype = {"dtype": "float32"} if explicit else {}
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(4, **dtype)], name="stored")


def _builder_study(builder: Any, root: str = ".", **train: Any) -> ablab.Study:
    base = _study(**train)
    return ablab.Study(
        data=base.data.model_dump(),
        train=base.train.model_dump(),
        model={"builder": builder},
        variants={"a": {}},
        source="<test>",
        root=root,
    )


def test_mixed_precision_applies_to_stored_and_cloned_models(tmp_path: Path) -> None:
    # a model rebuilt from model.to_json() / cloned keeps its layers' float32 config: the
    # requested policy is applied to them (it was silently ignored)
    (tmp_path / "m.json").write_text(_float32_model().to_json())
    stored = _builder_study("m.json", root=str(tmp_path), dtype_policy="mixed_bfloat16", epochs=2)
    program = make_program(stored, "a")
    assert program.prepared.model.layers[-1].dtype_policy.name == "mixed_bfloat16"
    _assert_fit(stored, SEEDS[:2], rtol=1e-3)
    cloned = _builder_study(_float32_model(), dtype_policy="mixed_bfloat16", epochs=2)
    program = make_program(cloned, "a")
    assert program.prepared.model.layers[-1].dtype_policy.name == "mixed_bfloat16"


def test_mixed_precision_a_builder_fixing_float32_is_refused() -> None:
    study = _builder_study(lambda: _float32_model(explicit=True), dtype_policy="mixed_bfloat16")
    with pytest.raises(StudyError) as err:
        make_program(study, "a")
    assert err.value.key == "train.dtype_policy"
    assert "set_global_policy" in err.value.fix


def test_early_stopping_monitors_what_the_history_records() -> None:
    # val_data_loss (ablab's penalty-free loss, in every History) was refused as unknown
    stop = {"monitor": "val_data_loss", "min_delta": 0.1, "patience": 0}
    _assert_fit(_study(early_stopping=stop, epochs=2), SEEDS[:2])
    bad = _study(early_stopping={"monitor": "val_nope"})
    with pytest.raises(StudyError, match="val_data_loss") as err:
        make_program(bad, "a")
    assert err.value.key == "train.early_stopping.monitor"


def test_early_stopping_on_a_metric_without_a_direction_asks_for_a_mode() -> None:
    # mode "auto" on a metric Keras has no direction for: a friendly error, not a traceback
    stop = {"monitor": "val_false_positives"}
    study = _study(metrics=["false_positives"], early_stopping=stop, epochs=2)
    with pytest.raises(StudyError, match='mode = "min"') as err:
        make_program(study, "a")
    assert err.value.key == "train.early_stopping.mode"
    make_program(_study(metrics=["false_positives"], early_stopping={**stop, "mode": "max"}), "a")


def test_callback_objects_convert_and_other_callbacks_are_refused() -> None:
    import keras

    key, spec = callback_spec(keras.callbacks.EarlyStopping(monitor="loss", patience=2))
    assert key == "early_stopping" and spec["patience"] == 2 and spec["monitor"] == "loss"
    train = TrainSpec(loss="mse", callbacks=[keras.callbacks.EarlyStopping(patience=1)])
    assert train.early_stopping is not None and train.early_stopping.patience == 1
    with pytest.raises(StudyError) as err:
        ablab.study_from_dict(
            {
                "data": {"synthetic": {"shape": [8, 2]}},
                "train": {"loss": "mse", "callbacks": [{"name": "ModelCheckpoint"}]},
                "variants": {"a": {"layers": [{"layer": "Dense", "units": 2}]}},
            }
        )
    text = str(err.value)
    assert "train.callbacks[0]" in text and "compiled program" in text
    assert 'kind = "reference"' in text


def test_reduce_lr_on_plateau_lowers_each_seeds_rate_on_its_own_like_fit() -> None:
    # monitor loss with min_delta 0.2: the seeds' gains fall under it at different epochs:
    # seed 0 halves its rate after epoch 4 (1-based), seed 2 after epoch 5, seed 3 never.
    plateau = {"monitor": "loss", "min_delta": 0.2, "patience": 0, "factor": 0.5}
    study = _study(epochs=6, reduce_lr_on_plateau=plateau)
    engine = _assert_fit(study, SEEDS[[0, 2, 3]])  # History's learning_rate included
    first_lowered = [
        (lr < 0.05).argmax() if (lr < 0.05).any() else 0 for lr in engine["learning_rate"]
    ]
    assert first_lowered == [4, 5, 0], engine["learning_rate"]
    # shuffled rows (one fit call per epoch, the callback's state kept across them), with
    # EarlyStopping in the same fit
    stop = {"monitor": "val_loss", "min_delta": 0.05, "patience": 1}
    both = _study(epochs=5, shuffle=True, reduce_lr_on_plateau=plateau, early_stopping=stop)
    _assert_fit(both, SEEDS[[0, 2]])


def test_reduce_lr_on_plateau_converts_and_refuses_what_keras_refuses() -> None:
    import keras

    cb = keras.callbacks.ReduceLROnPlateau(monitor="loss", factor=0.3, patience=2, cooldown=1)
    key, spec = callback_spec(cb)
    assert key == "reduce_lr_on_plateau" and spec["factor"] == 0.3 and spec["cooldown"] == 1
    train = TrainSpec(loss="mse", callbacks=[cb, keras.callbacks.EarlyStopping(patience=1)])
    assert train.reduce_lr_on_plateau is not None and train.reduce_lr_on_plateau.patience == 2
    assert train.early_stopping is not None
    study = {
        "data": {"synthetic": {"shape": [8, 2]}},
        "variants": {"a": {"layers": [{"layer": "Dense", "units": 2}]}},
    }
    with pytest.raises(StudyError, match="factor"):
        ablab.study_from_dict(
            {**study, "train": {"loss": "mse", "reduce_lr_on_plateau": {"factor": 1.0}}}
        )
    schedule = {"schedule": "ExponentialDecay", "initial_learning_rate": 0.1}
    schedule |= {"decay_steps": 10, "decay_rate": 0.9}
    train_spec = {
        "loss": "mse",
        "optimizer": {"name": "sgd", "learning_rate": schedule},
        "callbacks": [{"name": "ReduceLROnPlateau", "monitor": "loss"}],
    }
    with pytest.raises(StudyError, match="schedule") as err:
        ablab.study_from_dict({**study, "train": train_spec})
    assert "reduce_lr_on_plateau" in str(err.value)
