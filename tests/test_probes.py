"""Probes: they change nothing, they equal what a Keras callback reads during model.fit, and
the BN convergence figure is 1 - momentum**updates on constant batches."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest

import ablab
from ablab.engine import probes as _probes
from ablab.engine.probes import probes_enabled
from ablab.engine.reference import all_rows, fit_arguments, fresh_model
from tests.conftest import make_program

SEEDS = np.array([0, 3], dtype=np.uint32)


@pytest.mark.parametrize("variant", ["plain", "bn"])
def test_probes_do_not_change_training(seed_study: ablab.Study, variant: str) -> None:
    plain = make_program(seed_study, variant, probes=False).train(SEEDS)
    probed, steps, epochs = make_program(seed_study, variant, probes=True).run(SEEDS)
    for name in plain:
        np.testing.assert_array_equal(plain[name], probed[name])
    assert steps["grad_norm"].shape == (2, 60) and (steps["grad_norm"] > 0).all()
    assert epochs["train_loss_inference"].shape == (2, 20)


class _Recorder(keras.callbacks.Callback):
    """Reads every layer's weights after each batch, as the seed answer's manual loop did."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[tuple[float, float]]] = []

    def on_train_begin(self, logs: dict | None = None) -> None:
        self.start = [[np.asarray(w) for w in layer.get_weights()] for layer in self._dense()]

    def _dense(self) -> list[keras.layers.Layer]:
        return [layer for layer in self.model.layers if layer.trainable_weights]

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        row = []
        for layer, w0 in zip(self._dense(), self.start, strict=True):
            ws = [np.asarray(w, np.float64) for w in layer.get_weights()]
            dist = np.sqrt(sum(np.sum((w - s) ** 2) for w, s in zip(ws, w0, strict=True)))
            row.append((float(np.sum(layer.kernel.numpy())), float(dist)))
        self.rows.append(row)


def test_probe_values_equal_weights_read_by_a_callback_in_fit(seed_study: ablab.Study) -> None:
    program = make_program(seed_study, "plain", probes=True)
    _, steps, _ = program.run(SEEDS)
    x, y = all_rows(program)
    args = fit_arguments(program)
    for i, seed in enumerate(SEEDS):
        model = fresh_model(program, int(seed))
        rec = _Recorder()
        model.fit(
            x,
            y,
            epochs=args["epochs"],
            batch_size=args["batch_size"],
            validation_split=args["validation_split"],
            shuffle=False,
            verbose=0,
            callbacks=[rec],
        )
        got = np.asarray(rec.rows)  # (steps, layers, 2)
        for j, layer in enumerate(("dense#0", "dense#1")):
            np.testing.assert_allclose(
                steps[f"{layer}/kernel_sum"][i], got[:, j, 0], rtol=1e-5, atol=1e-5
            )
            np.testing.assert_allclose(
                steps[f"{layer}/dist_init"][i], got[:, j, 1], rtol=1e-5, atol=1e-6
            )


@pytest.mark.parametrize("chunk_rows", [4096, 5])  # 5: the chunked path (48 rows = 9x5 + 3)
def test_bn_convergence_is_one_minus_momentum_to_the_updates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk_rows: int
) -> None:
    monkeypatch.setattr(_probes, "BN_PROBE_ROWS", chunk_rows)
    # Constant batches: the same 8 rows repeated, BN first (its input is the data itself),
    # so every batch -- and the full training set -- has the same statistics.
    rows = np.random.default_rng(0).normal(2.0, 3.0, (8, 4))
    np.save(tmp_path / "x.npy", np.tile(rows, (6, 1)))
    momentum = 0.9
    study = ablab.Study(
        data={"path": "x.npy"},
        root=str(tmp_path),
        train={
            "loss": "mse",
            "epochs": 4,
            "batch_size": 8,
            "shuffle": False,
            "optimizer": {"name": "sgd", "learning_rate": 0.0},
        },
        variants={
            "bn": {
                "layers": [
                    {"layer": "BatchNormalization", "momentum": momentum},
                    {"layer": "Dense", "units": 4},
                ]
            }
        },
    )
    program = make_program(study, "bn", probes=True)
    _, _, epochs = program.run(np.array([0], np.uint32))
    updates = 6 * np.arange(1, 5)  # 6 batches per epoch
    expected = 1 - momentum**updates  # 0.469, 0.718, 0.850, 0.920
    np.testing.assert_allclose(
        epochs["batch_normalization#0/moving_mean_progress"][0], expected, rtol=1e-4
    )
    np.testing.assert_allclose(
        epochs["batch_normalization#0/moving_var_progress"][0], expected, rtol=1e-4
    )


def test_probes_switch() -> None:
    assert probes_enabled("auto", 212, 100_000) and not probes_enabled("auto", 10**6, 100_000)
    assert probes_enabled(True, 10**9, 1) and not probes_enabled(False, 1, 10)


RELU_STUDY = ablab.Study(
    data={"synthetic": {"shape": [40, 6]}},
    train={"loss": "mse", "epochs": 2, "batch_size": 16, "validation_split": 0.25},
    variants={
        "relu": {
            "layers": [
                {"layer": "Dense", "units": 4, "activation": "relu"},
                {"layer": "Dense", "units": 6},
            ]
        },
        "relu_bn": {
            "layers": [
                {"layer": "Dense", "units": 4, "activation": "relu"},
                {"layer": "BatchNormalization"},
                {"layer": "Dense", "units": 6},
            ]
        },
    },
)


@pytest.mark.parametrize(
    ("study", "variant", "expected"),
    [
        # linear under MSE: an analytic optimum (explain.optimum_gaps) needs the train loss
        ("seed", "plain", {"train_loss_inference"}),
        (
            "seed",
            "bn",
            {
                "train_loss_inference",
                "val_loss_train_mode",
                "batch_normalization#0/moving_mean_progress",
                "batch_normalization#0/moving_var_progress",
                "batch_normalization#0/moving_var_ratio",
            },
        ),
        ("relu", "relu", set()),  # nothing explains a plain non-linear model per epoch
        (
            "relu",
            "relu_bn",
            {
                "val_loss_train_mode",
                "batch_normalization#0/moving_mean_progress",
                "batch_normalization#0/moving_var_progress",
                "batch_normalization#0/moving_var_ratio",
            },
        ),
    ],
)
def test_epoch_probes_are_recorded_where_an_explanation_uses_them(
    seed_study: ablab.Study, study: str, variant: str, expected: set[str]
) -> None:
    """Each per-epoch probe is an extra pass over rows (up to ~1.5x the training of a small
    CNN): the training-set loss only for a model with an analytic optimum, the train-mode
    validation loss and the moving statistics only for a model with BatchNormalization.
    The History and the per-step probes do not change."""
    spec = seed_study if study == "seed" else RELU_STUDY
    seeds = SEEDS
    history, steps, epochs = make_program(spec, variant, probes=True).run(seeds)
    assert set(epochs) == expected
    assert "grad_norm" in steps and "dense#0/kernel_sum" in steps
    plain = make_program(spec, variant, probes=False).train(seeds)
    for name in plain:
        np.testing.assert_array_equal(plain[name], history[name])
