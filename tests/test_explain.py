"""Analytic baselines and the BN diagnosis."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.decomposition import PCA
from sklearn.linear_model import LinearRegression

import ablab
from ablab.analysis.explain import (
    bn_diagnosis,
    diverged_baselines,
    divergence_summary,
    linear_optimum,
    linear_rank,
    optimum_gaps,
)
from ablab.engine.data import Split
from ablab.store.records import VariantHistory
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


def _hist(**values: np.ndarray) -> VariantHistory:
    n = next(iter(values.values())).shape[0]
    return VariantHistory(seeds=np.arange(n), values=values)


DIVERGE_STUDY = {
    "baseline": "plain",
    "train": {"optimizer": "adam"},
    "variants": {
        "plain": {},
        "huge": {"train": {"optimizer": {"name": "sgd", "learning_rate": 1000.0}}},
        "small": {"train": {"optimizer": {"name": "adam", "learning_rate": 1e-4}}},
    },
}


def test_divergence_summary_counts_epochs_kinds_and_names_the_likely_cause() -> None:
    ok = np.ones((4, 3))
    inf = np.full((4, 3), np.inf)
    inf[:, 1:] = np.nan  # inf at epoch 1, then NaN
    mixed = ok.copy()
    mixed[0, 1:] = np.inf  # seed 0: loss inf from epoch 2
    mixed[1, 2] = np.nan  # seed 1: loss nan at epoch 3
    histories = {
        "plain": _hist(loss=ok, val_loss=ok),
        "huge": _hist(loss=inf, val_loss=np.full((4, 3), np.nan)),
        "small": _hist(loss=mixed, val_loss=ok),
    }
    div = divergence_summary(histories, DIVERGE_STUDY)
    assert list(div) == ["huge", "small"]  # only variants with a diverged seed
    huge = div["huge"]
    assert (huge["diverged"], huge["n_seeds"], huge["first_epoch"], huge["median_epoch"]) == (
        4,
        4,
        1,
        1,
    )
    assert huge["values"] == {"loss inf": 4}
    assert huge["cause"] is not None and huge["cause"]["setting"] == "learning_rate"
    assert huge["text"] == (
        "huge: 4 of 4 seeds diverged at epoch 1 (loss inf); learning_rate 1000 "
        "(plain: 0.001, adam's default) is the likely cause"
    )
    small = div["small"]
    assert small["values"] == {"loss inf": 1, "loss nan": 1}
    # a smaller learning rate than the baseline's is not named as a cause
    assert small["cause"] is None
    assert small["text"] == (
        "small: 2 of 4 seeds diverged at epochs 2–3 (median 2.5; loss inf on 1, loss nan on 1)"
    )
    assert not huge["is_baseline"] and diverged_baselines(div) == []


def test_a_diverged_baseline_is_named_by_the_usual_range_only() -> None:
    nan = np.full((3, 2), np.nan)
    study = {
        "baseline": "plain",
        "train": {"optimizer": {"name": "sgd", "learning_rate": 1e6}},
        "variants": {"plain": {}, "other": {}},
    }
    histories = {"plain": _hist(loss=nan), "other": _hist(loss=nan)}
    div = divergence_summary(histories, study)
    # the same learning rate in both arms: named because it is out of the usual range only
    assert div["other"]["text"].endswith(
        "learning_rate 1e+06 (above the usual range, < 1) is the likely cause"
    )
    (message,) = diverged_baselines(div)
    assert message.startswith("the baseline plain diverged on every seed (3 of 3 at epoch 1")
    assert "loss nan" in message and "learning_rate 1e+06" in message
