"""The verdict metric: the penalty-free loss where Keras' val_loss includes a regularisation
penalty, a shared metric where the loss functions differ, warnings where a study insists
(issue #18, item 3), and ``data_loss`` itself against Keras' own loss."""

from __future__ import annotations

import numpy as np
import pytest

from ablab.stats.metric_choice import choose_metric, penalties
from ablab.stats.verdicts import compare
from ablab.store.records import VariantHistory
from ablab.study.schema import VerdictSpec


def _history(seed: int, penalty: float = 0.0, metrics: tuple[str, ...] = ()) -> VariantHistory:
    """8 seeds x 2 epochs; ``loss`` = ``data_loss`` + ``penalty`` (a regularised variant)."""
    rng = np.random.default_rng(seed)
    data, val = rng.uniform(1.0, 2.0, (8, 2)), rng.uniform(1.0, 2.0, (8, 2))
    values = {
        "loss": data + penalty,
        "data_loss": data.copy(),
        "val_loss": val + penalty,
        "val_data_loss": val.copy(),
    }
    for m in metrics:
        values[m] = values[f"val_{m}"] = rng.uniform(0.5, 1.0, (8, 2))
    return VariantHistory(seeds=np.arange(8), values=values)


def _study(l2_loss: str = "mse") -> dict:
    """The resolved-study fields the choice reads: losses and layer lists."""
    dense = {"layer": "Dense", "units": 3}
    return {
        "train": {"loss": "mse"},
        "variants": {
            "plain": {"layers": [dense]},
            "l2": {
                "layers": [{**dense, "kernel_regularizer": "l2"}],
                "train": {"loss": l2_loss},
            },
        },
    }


def test_a_penalty_makes_the_penalty_free_loss_the_default() -> None:
    hists = {"plain": _history(0), "l2": _history(1, penalty=0.5)}
    assert list(penalties(hists)) == ["l2"]
    assert penalties(hists)["l2"] == pytest.approx(0.5)
    choice = choose_metric(VerdictSpec(), hists, _study())
    assert choice.metric == "val_data_loss" and not choice.warning
    assert "variants differ in regularisation (l2: kernel_regularizer" in choice.note
    assert "val_loss includes the penalty" in choice.note
    (cmp,) = compare(hists, "plain", VerdictSpec(), plan_seeds=False, study=_study())
    assert cmp.metric == "val_data_loss" and cmp.metric_note == choice.note


def test_no_penalty_keeps_val_loss() -> None:
    hists = {"plain": _history(0), "wide": _history(1)}
    assert penalties(hists) == {}
    assert choose_metric(VerdictSpec(), hists, _study()) == choose_metric(VerdictSpec(), hists)
    assert choose_metric(VerdictSpec(), hists).metric == "val_loss"
    # a run stored before data_loss existed: nothing to detect, val_loss as before
    old = {k: VariantHistory(h.seeds, {"val_loss": h.values["val_loss"]}) for k, h in hists.items()}
    assert choose_metric(VerdictSpec(), old).metric == "val_loss"


def test_insisting_on_val_loss_with_a_penalty_warns() -> None:
    hists = {"plain": _history(0), "l2": _history(1, penalty=0.5)}
    choice = choose_metric(VerdictSpec(metric="val_loss"), hists, _study())
    assert choice.metric == "val_loss" and not choice.note
    assert "val_loss includes regularisation penalties" in choice.warning
    assert "val_data_loss compares the fit to the data alone" in choice.warning
    (cmp,) = compare(hists, "plain", VerdictSpec(metric="val_loss"), plan_seeds=False)
    assert cmp.metric_warning.startswith("val_loss includes")
    assert "a regularizer or add_loss" in cmp.metric_warning  # no study: measured only
    ok = choose_metric(VerdictSpec(metric="val_data_loss"), hists, _study())
    assert ok.metric == "val_data_loss" and not ok.warning and not ok.note


def test_different_loss_functions_compare_a_shared_metric() -> None:
    hists = {"plain": _history(0, metrics=("mae",)), "l2": _history(1, metrics=("mae",))}
    choice = choose_metric(VerdictSpec(), hists, _study(l2_loss="huber"))
    assert choice.metric == "val_mae"
    assert "differ in their loss function (plain: mse, l2: huber)" in choice.note
    bare = {"plain": _history(0), "l2": _history(1)}  # no shared metric: val_loss, warned
    choice = choose_metric(VerdictSpec(), bare, _study(l2_loss="huber"))
    assert choice.metric == "val_loss" and "add a metric they share" in choice.warning


@pytest.mark.parametrize("spelling", ["mean_squared_error", "MeanSquaredError", {"name": "MSE"}])
def test_one_loss_however_spelled_is_the_same_loss(spelling: object) -> None:
    hists = {"plain": _history(0, metrics=("mae",)), "l2": _history(1, metrics=("mae",))}
    study = _study()
    study["variants"]["l2"]["train"]["loss"] = spelling
    choice = choose_metric(VerdictSpec(), hists, study)
    assert choice.metric == "val_loss" and not choice.note and not choice.warning
    # arguments still tell losses apart
    study["train"]["loss"] = {"name": "huber", "delta": 2.0}
    study["variants"]["l2"]["train"]["loss"] = {"name": "Huber", "delta": 1.0}
    assert choose_metric(VerdictSpec(), hists, study).metric == "val_mae"
    study["variants"]["l2"]["train"]["loss"] = {"delta": 2.0, "name": "Huber"}
    assert choose_metric(VerdictSpec(), hists, study).metric == "val_loss"


def test_sweep_arms_read_their_declared_variant() -> None:
    arms = {"plain@batch_size=8": "plain", "l2@batch_size=8": "l2"}
    hists = {a: _history(i, metrics=("mae",)) for i, a in enumerate(arms)}
    study = _study(l2_loss="huber")
    study["arms"] = {a: {"variant": v, "point": {"batch_size": 8}} for a, v in arms.items()}
    choice = choose_metric(VerdictSpec(), hists, study)
    assert choice.metric == "val_mae"
    assert "(plain@batch_size=8: mse, l2@batch_size=8: huber)" in choice.note


def test_data_loss_is_keras_loss_without_a_penalty() -> None:
    """``DataLoss`` against Keras' own History (the source of the expected values): equal to
    ``loss`` and ``val_loss`` without a regulariser, with sample weights (weighed as Keras
    weighs the loss). Unweighted, on the engine's History: test_engine.py; with a penalty:
    test_verdict_metric_end_to_end in test_cli.py."""
    import keras

    from ablab.engine.data_loss import DataLoss

    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 4)).astype("float32")
    y = rng.integers(0, 3, 40)
    weights = rng.uniform(0.1, 2.0, 40).astype("float32")
    loss = {"class_name": "SparseCategoricalCrossentropy", "config": {"from_logits": True}}
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.compile("adam", loss=keras.losses.get(loss), weighted_metrics=[DataLoss(loss)])
    h = model.fit(
        x, y, sample_weight=weights, batch_size=16, epochs=2, validation_split=0.25, verbose=0
    ).history
    np.testing.assert_allclose(h["data_loss"], h["loss"], rtol=1e-6)
    np.testing.assert_allclose(h["val_data_loss"], h["val_loss"], rtol=1e-6)


def test_the_worker_side_name_is_the_study_name_and_imports_no_ablab() -> None:
    import subprocess
    import sys
    from pathlib import Path

    from ablab.engine import data_loss
    from ablab.study.keras_names import DATA_LOSS

    assert data_loss.DATA_LOSS == DATA_LOSS
    # what fit_worker does: load the file by path, in an interpreter without ablab
    code = (
        "import importlib.util, sys; "
        f"spec = importlib.util.spec_from_file_location('w', {str(Path(data_loss.__file__))!r}); "
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
        "print('ablab' in sys.modules, m.DataLoss('mse').name)"
    )
    env = {"KERAS_BACKEND": "jax", "PATH": "", "HOME": str(Path.home())}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env,
        cwd=str(Path(data_loss.__file__).parent.parent.parent.parent),
    )  # fmt: skip
    assert out.stdout.split()[-2:] == ["False", DATA_LOSS]
