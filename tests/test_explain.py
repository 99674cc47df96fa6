"""Analytic baselines and the BN diagnosis."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.decomposition import PCA
from sklearn.linear_model import LinearRegression

import ablab
from ablab.analysis.explain import bn_diagnosis, linear_optimum, linear_rank, optimum_gaps
from ablab.engine.data import Split
from tests.conftest import make_program


def _split(x: np.ndarray, y: np.ndarray, n_train: int) -> Split:
    return Split(x[:n_train], y[:n_train], x[n_train:], y[n_train:])


def test_pca_optimum_matches_scikit_learn(seed_study: ablab.Study) -> None:
    program = make_program(seed_study, "plain", probes=False)
    sp = program.split
    opt = linear_optimum(sp, 8)
    # Reference: sklearn.decomposition.PCA(8) reconstruction error, fitted on training rows.
    pca = PCA(n_components=8).fit(sp.x_train.astype(np.float64))
    recon = pca.inverse_transform(pca.transform(sp.x_train.astype(np.float64)))
    recon_val = pca.inverse_transform(pca.transform(sp.x_val.astype(np.float64)))
    assert opt["kind"] == "pca"
    assert opt["train_mse"] == pytest.approx(np.mean((sp.x_train - recon) ** 2), rel=1e-9)
    assert opt["val_mse"] == pytest.approx(np.mean((sp.x_val - recon_val) ** 2), rel=1e-9)


def test_full_rank_optimum_is_least_squares() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 3))
    y = x @ rng.normal(size=(3, 2)) + 0.5 + rng.normal(0, 0.1, (60, 2))
    opt = linear_optimum(_split(x, y, 50), rank=3)
    ref = LinearRegression().fit(x[:50], y[:50])  # sklearn OLS with intercept
    assert opt["kind"] == "least_squares"
    assert opt["train_mse"] == pytest.approx(np.mean((y[:50] - ref.predict(x[:50])) ** 2))
    assert opt["val_mse"] == pytest.approx(np.mean((y[50:] - ref.predict(x[50:])) ** 2))


def test_linear_rank(seed_study: ablab.Study, seed_programs: dict) -> None:
    assert [linear_rank(p) for p in seed_programs.values()] == [8, 8, 8, 8]
    relu = ablab.Study(
        data={"synthetic": {"shape": [20, 4]}},
        train={"loss": "mse"},
        variants={
            "r": {
                "layers": [
                    {"layer": "Dense", "units": 2, "activation": "relu"},
                    {"layer": "Dense", "units": 4},
                ]
            }
        },
    )
    assert linear_rank(make_program(relu, "r")) is None


@pytest.mark.parametrize("variant", ["plain", "bn"])
def test_trained_linear_variants_never_beat_the_optimum(
    seed_study: ablab.Study, variant: str
) -> None:
    program = make_program(seed_study, variant, probes=True)
    history, _, epochs = program.run(np.arange(64, dtype=np.uint32))
    gaps = optimum_gaps(program, history, epochs)
    assert gaps is not None
    final_train = epochs["train_loss_inference"][:, -1]
    assert np.all(final_train >= gaps["train_mse"] - 1e-6)  # float32 evaluation tolerance
    assert gaps["train_gap"]["q05"] >= -1e-6


def test_bn_diagnosis_in_words(seed_study: ablab.Study) -> None:
    program = make_program(seed_study, "bn", probes=True)
    history, _, epochs = program.run(np.arange(32, dtype=np.uint32))
    (d,) = bn_diagnosis(program, history, epochs)
    # 20 epochs x 3 batches (90 rows, batch 32) = 60 updates; 1 - 0.99**60 = 0.4528
    assert d["updates"] == 60 and d["momentum"] == 0.99
    assert d["expected_progress"] == pytest.approx(1 - 0.99**60)
    assert "after 60 updates with momentum 0.99" in d["text"] and "~45 %" in d["text"]
    assert 0.3 < d["moving_mean_progress"] < 0.6
    assert "val_loss_train_mode" in d and "val_loss_inference" in d
