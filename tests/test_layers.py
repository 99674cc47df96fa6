"""Breadth: layers, losses, metrics, optimizers and data sources the vectorized engine runs,
each held to ``keras.Model.fit`` from identical initial weights (``ablab.engine.reference``: fit
itself, this process, same Keras); Dropout > 0 against fit's distribution; a model the
engine cannot run named by its layer, and run by the reference engine instead.

Tolerances as in tests/test_reference.py: rtol 1e-5 (BatchNormalization's inference-mode
validation values 1e-4).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest

import ablab
from ablab.engine.reference import reference_history
from tests.conftest import make_program
from tests.layer_models import activation_names

SEEDS = np.array([3], dtype=np.uint32)  # one seed: exactness does not need more
SYNTHETIC = {"synthetic": {"kind": "normal", "shape": [100, 12], "seed": 1}}
TRAIN = {"epochs": 2, "batch_size": 16, "validation_split": 0.2, "shuffle": True}


def _study(
    tmp_path: Path, data: dict, variant: dict, model: dict | None = None, **train: Any
) -> ablab.Study:
    raw = {
        "name": "breadth",
        "data": data,
        "model": model or {},
        "train": {**TRAIN, "optimizer": "adam", "loss": "mse", **train},
        "variants": {"v": variant},
        "seeds": {"count": 2},
    }
    return ablab.study_from_dict(raw, source=str(tmp_path / "breadth.toml"))


def _assert_fidelity(study: ablab.Study, *, bn: bool = False) -> dict[str, np.ndarray]:
    program = make_program(study, "v")
    engine = program.train(SEEDS)
    for i, seed in enumerate(SEEDS):
        ref = reference_history(program, int(seed))
        assert set(ref) == set(engine), (sorted(ref), sorted(engine))
        for name, expected in ref.items():
            rtol = 1e-4 if bn and name.startswith("val_") else 1e-5
            np.testing.assert_allclose(
                engine[name][i], expected, rtol=rtol, atol=0, err_msg=f"seed {seed} {name}"
            )
    return engine


def _dense(units: int, **kw: Any) -> dict:
    return {"layer": "Dense", "units": units, **kw}


def test_every_keras_activation(tmp_path: Path) -> None:
    assert len(activation_names()) >= 30  # Keras 3.15 exports 32, threshold among them
    model = {"builder": "tests.layer_models:all_activations"}
    opt = {"name": "adam", "learning_rate": 0.01}
    # Keras 3.15's sparsemax mixes float32 with an int32 index array: fine under JAX's
    # standard promotion (what users run), refused by the strict mode this suite sets.
    with jax.numpy_dtype_promotion("standard"):
        _assert_fidelity(_study(tmp_path, SYNTHETIC, {}, model, optimizer=opt))


def test_functional_add_and_concatenate(tmp_path: Path) -> None:
    model = {"builder": "tests.layer_models:add_concat"}
    _assert_fidelity(_study(tmp_path, SYNTHETIC, {}, model))


def test_layer_and_group_normalization_dropout_zero_batchnorm_adamw(tmp_path: Path) -> None:
    layers = [
        _dense(16),
        {"layer": "LayerNormalization"},
        _dense(16, activation="relu"),
        {"layer": "GroupNormalization", "groups": 4},
        {"layer": "Dropout", "rate": 0.0},
        {"layer": "BatchNormalization"},
        _dense(12),
    ]
    opt = {"name": "adamw", "learning_rate": 0.01, "weight_decay": 0.05}
    _assert_fidelity(
        _study(tmp_path, SYNTHETIC, {"layers": layers}, optimizer=opt, metrics=["mae"]), bn=True
    )


def test_conv1d_pooling_rmsprop(tmp_path: Path) -> None:
    layers = [
        {"layer": "Reshape", "target_shape": [12, 1]},
        {"layer": "Conv1D", "filters": 4, "kernel_size": 3, "activation": "relu"},
        {"layer": "MaxPooling1D", "pool_size": 2},
        {"layer": "Conv1D", "filters": 4, "kernel_size": 3, "padding": "same"},
        {"layer": "AveragePooling1D", "pool_size": 2},
        {"layer": "GlobalAveragePooling1D"},
        _dense(12),
    ]
    _assert_fidelity(_study(tmp_path, SYNTHETIC, {"layers": layers}, optimizer="rmsprop"))


def test_conv2d_on_digits_with_logits_nesterov_and_a_schedule(tmp_path: Path) -> None:
    layers = [
        {"layer": "Reshape", "target_shape": [8, 8, 1]},
        {
            "layer": "Conv2D",
            "filters": 4,
            "kernel_size": 3,
            "padding": "same",
            "activation": "relu",
        },
        {"layer": "AveragePooling2D", "pool_size": 2},
        {"layer": "Conv2D", "filters": 8, "kernel_size": 3, "activation": "relu"},
        {"layer": "MaxPooling2D", "pool_size": 2},
        {"layer": "Flatten"},
        _dense(10),
    ]
    schedule = {
        "schedule": "ExponentialDecay",
        "initial_learning_rate": 0.1,
        "decay_steps": 50,
        "decay_rate": 0.5,
    }
    study = _study(
        tmp_path,
        {"sklearn": "digits", "standardize": True},
        {"layers": layers},
        loss={"name": "sparse_categorical_crossentropy", "from_logits": True},
        metrics=["accuracy"],
        optimizer={"name": "sgd", "momentum": 0.9, "nesterov": True, "learning_rate": schedule},
        batch_size=128,
    )
    engine = _assert_fidelity(study)
    assert engine["val_accuracy"][:, -1].min() > 0.3  # it learns: 10 classes, chance 0.1


def test_embedding(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 10, size=(120, 6)).astype(np.float32)
    np.savez(tmp_path / "tokens.npz", x=x, y=x.mean(axis=1, keepdims=True) / 10)
    layers = [
        {"layer": "Embedding", "input_dim": 10, "output_dim": 4},
        {"layer": "Flatten"},
        _dense(1),
    ]
    data = {"path": str(tmp_path / "tokens.npz"), "target": "y"}
    _assert_fidelity(_study(tmp_path, data, {"layers": layers}))


@pytest.mark.parametrize(
    ("name", "data", "out", "loss", "metrics"),
    [
        (
            "binary_probs",
            "breast_cancer",
            _dense(1, activation="sigmoid"),
            "binary_crossentropy",
            ["accuracy", "auc"],
        ),
        (
            "binary_logits",
            "breast_cancer",
            _dense(1),
            {"name": "binary_crossentropy", "from_logits": True},
            [{"name": "BinaryAccuracy", "threshold": 0.0}],
        ),
        (
            "sparse_probs",
            "wine",
            _dense(3, activation="softmax"),
            "sparse_categorical_crossentropy",
            [{"name": "sparse_categorical_accuracy"}],
        ),
    ],
)
def test_classification_losses_and_metrics(
    tmp_path: Path, name: str, data: str, out: dict, loss: Any, metrics: list
) -> None:
    study = _study(
        tmp_path,
        {"sklearn": data, "standardize": True, "row_seed": 0},
        {"layers": [_dense(8, activation="relu"), out]},
        loss=loss,
        metrics=metrics,
    )
    engine = _assert_fidelity(study)
    history_names = set(engine)
    for m in study.train.metric_names():
        assert {m, f"val_{m}"} <= history_names


@pytest.mark.parametrize("logits", [False, True])
def test_categorical_crossentropy_on_one_hot_targets(tmp_path: Path, logits: bool) -> None:
    from sklearn.datasets import load_iris

    x, y = load_iris(return_X_y=True)
    order = np.random.default_rng(1).permutation(len(x))
    np.savez(tmp_path / "iris.npz", x=x[order], y=np.eye(3)[y[order]])
    study = _study(
        tmp_path,
        {"path": str(tmp_path / "iris.npz"), "target": "y", "standardize": True},
        {
            "layers": [
                _dense(8, activation="relu"),
                _dense(3, activation=None if logits else "softmax"),
            ]
        },
        loss={"name": "categorical_crossentropy", "from_logits": logits},
        metrics=["categorical_accuracy"],
    )
    _assert_fidelity(study)


def test_dropout_masks_are_per_seed_and_fit_reproduces_them(tmp_path: Path) -> None:
    """Given the engine's per-seed RNG state (``_reference.fresh_model`` sets it), fit draws
    the very same Dropout masks: exact fidelity at rate 0.5 too."""
    layers = [_dense(16, activation="relu"), {"layer": "Dropout", "rate": 0.5}, _dense(12)]
    _assert_fidelity(_study(tmp_path, SYNTHETIC, {"layers": layers}))


def test_dropout_follows_fit_in_distribution(tmp_path: Path) -> None:
    """Dropout 0.5: the engine's per-seed masks come from its own per-seed RNG state, so single
    runs cannot match fit's; the distribution over seeds must. 200 engine seeds against 8
    model.fit runs whose dropout RNG is Keras' own (not ablab's): two-sample tests."""
    from scipy import stats

    from ablab.engine.fit_worker import fit_history
    from ablab.engine.reference import all_rows, fit_arguments, fresh_model, permutations

    layers = [_dense(16, activation="relu"), {"layer": "Dropout", "rate": 0.5}, _dense(12)]
    study = _study(tmp_path, SYNTHETIC, {"layers": layers}, epochs=3)
    program = make_program(study, "v")
    engine = program.train(np.arange(200, dtype=np.uint32))["loss"][:, -1]
    x, y = all_rows(program)
    fit = []
    for seed in range(8):
        model = fresh_model(program, seed)
        rng = np.random.default_rng(1000 + seed)  # fit's dropout stream, unrelated to ablab's
        for layer in model._flatten_layers():
            for gen in layer._seed_generators:
                gen.state.assign(rng.integers(0, 2**31, size=gen.state.shape).astype("uint32"))
        hist = fit_history(model, x, y, fit_arguments(program), permutations(program, seed))
        fit.append(hist["loss"][-1])
    assert stats.ks_2samp(engine, fit).pvalue > 0.01  # 8 fits: catches a shift of ~1 sd
    assert stats.mannwhitneyu(engine, fit).pvalue > 0.01
    # and dropout does act: without it the training loss is lower on most seeds
    no_drop = _study(tmp_path, SYNTHETIC, {"layers": [layers[0], layers[2]]}, epochs=3)
    plain = make_program(no_drop, "v").train(np.arange(200, dtype=np.uint32))["loss"][:, -1]
    assert np.mean(plain < engine) > 0.9


def test_a_layer_the_engine_cannot_run_is_named_and_the_reference_engine_runs_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ablab.cli import main

    study = tmp_path / "host.toml"
    study.write_text(
        """
[data]
synthetic = { kind = "normal", shape = [40, 12], seed = 1 }
[train]
loss = "mse"
epochs = 2
validation_split = 0.25
[variants.plain]
layers = [{ layer = "Dense", units = 8 }, { layer = "Dense", units = 12 }]
[variants.host]
layers = [{ layer = "Dense", units = 8 }, { layer = "tests.layer_models:HostScale" },
          { layer = "Dense", units = 12 }]
"""
    )
    runs = tmp_path / "runs"
    assert main(["run", str(study), "--seeds", "3", "--runs-dir", str(runs)]) == 2
    err = capsys.readouterr().err
    assert "variants.host" in err and "host_scale (HostScale)" in err
    assert "--engine reference" in err
    assert not runs.exists() or not any(runs.glob("*/study.json"))  # nothing written

    args = ["--seeds", "3", "--runs-dir", str(runs), "--engine", "reference", "--json"]
    code = main(["run", str(study), *args])
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["variants"]["host"]["n_seeds"] == 3
    (cmp,) = doc["comparisons"]
    assert cmp["variant"] == "host" and cmp["n"] == 3
    (meta,) = runs.glob("*/study.json")
    assert '"kind": "reference"' in meta.read_text()


def test_reference_engine_stores_what_the_vectorized_engine_stores(
    tiny_study: Path, tmp_path: Path
) -> None:
    vectorized = ablab.run(tiny_study, runs_dir=tmp_path / "a", seeds=3)
    spec = ablab.load_study(tiny_study)
    spec = spec.model_copy(update={"engine": spec.engine.model_copy(update={"kind": "reference"})})
    reference = ablab.run(spec, runs_dir=tmp_path / "b", seeds=3)
    a, b = vectorized.history, reference.history
    assert a.column_names == b.column_names and a.num_rows == b.num_rows
    for name in ("loss", "val_loss"):
        np.testing.assert_allclose(b.column(name).to_numpy(), a.column(name).to_numpy(), rtol=1e-4)
    assert [c.n for c in reference.comparisons] == [c.n for c in vectorized.comparisons]
    assert reference.explain["bn"]["probes"] is False
