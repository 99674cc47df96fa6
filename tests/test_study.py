"""Study files: valid ones load with Keras' defaults; every kind of bad input is one StudyError
naming the file, the key, what was expected, what was got, and how to fix it."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

import ablab
from ablab.study.loading import study_from_dict
from ablab.study.schema import TrainSpec
from tests.conftest import SEED_STUDY


def _raw() -> dict:
    return tomllib.loads(SEED_STUDY.read_text())


def test_seed_study_loads_with_its_values(seed_study: ablab.Study) -> None:
    assert seed_study.name == "bn_yes_or_no"
    assert list(seed_study.variants) == ["plain", "plain_identity", "bn", "bn_after"]
    assert seed_study.baseline == "plain"
    t = seed_study.train
    assert (t.loss, t.epochs, t.batch_size, t.validation_split, t.shuffle) == (
        "mean_squared_error",
        20,
        32,
        0.1,
        False,
    )
    assert t.optimizer_config() == {"class_name": "adam", "config": {}}
    assert seed_study.seeds.count == 1000 and seed_study.seeds.base == 0


def test_train_defaults_are_keras_fit_defaults() -> None:
    raw = _raw()
    raw["train"] = {"loss": "mse"}
    t = study_from_dict(raw).train
    # keras.Model.compile(optimizer="rmsprop") / fit(epochs=1, batch_size=None->32,
    # validation_split=0.0, shuffle=True)
    assert (t.optimizer, t.epochs, t.batch_size, t.validation_split, t.shuffle) == (
        "rmsprop",
        1,
        32,
        0.0,
        True,
    )


def test_optimizer_table_keeps_kwargs() -> None:
    raw = _raw()
    raw["train"]["optimizer"] = {"name": "sgd", "learning_rate": 0.1, "momentum": 0.9}
    cfg = study_from_dict(raw).train.optimizer_config()
    assert cfg == {"class_name": "sgd", "config": {"learning_rate": 0.1, "momentum": 0.9}}


def test_variant_train_overrides_merge() -> None:
    raw = _raw()
    raw["variants"]["bn"]["train"] = {"batch_size": 64}
    study = study_from_dict(raw)
    assert study.variant_train("bn").batch_size == 64
    assert study.variant_train("plain").batch_size == 32


def test_with_seeds_replaces_count(seed_study: ablab.Study) -> None:
    assert seed_study.with_seeds(count=5).seeds.count == 5
    with pytest.raises(ablab.StudyError, match=r"seeds\.count"):
        seed_study.with_seeds(count=0)


def _bad(mutate) -> ablab.StudyError:
    raw = _raw()
    mutate(raw)
    with pytest.raises(ablab.StudyError) as info:
        study_from_dict(raw, source="x.toml")
    return info.value


@pytest.mark.parametrize(
    ("mutate", "key", "got"),
    [
        (lambda r: r.update(bogus={}), "bogus", "unknown key"),
        (lambda r: r["train"].update(epoch=3), "train.epoch", "unknown key"),
        (lambda r: r["seeds"].update(count=0), "seeds.count", "0"),
        (lambda r: r["seeds"].update(count=-3), "seeds.count", "-3"),
        (lambda r: r["train"].update(validation_split=1.5), "train.validation_split", "1.5"),
        (lambda r: r["train"].pop("loss"), "train.loss", "nothing"),
        (lambda r: r.pop("data"), "data", "nothing"),
        (lambda r: r["variants"].update(baseline="nope"), "variants.baseline", "nope"),
        (lambda r: r["data"].update(path="x.npy"), "data", "synthetic"),
        (lambda r: r["data"]["synthetic"].update(shape=[100]), "data.synthetic.shape", "100"),
        (lambda r: r["variants"].update(odd=3), "variants.odd", "3"),
    ],
)
def test_bad_study_values_name_the_key(mutate, key: str, got: str) -> None:
    err = _bad(mutate)
    assert err.where == "x.toml"
    assert err.key == key, str(err)
    assert got in err.got or got in err.expected, str(err)
    assert err.fix and err.expected
    assert "how to fix" in str(err)


def test_unknown_key_suggests_the_close_one() -> None:
    err = _bad(lambda r: r["train"].update(epochz=3))
    assert "did you mean `epochs`?" in err.fix
    err = _bad(lambda r: r["seeds"].update(cuont=3))
    assert "did you mean `count`?" in err.fix


def test_variant_names_are_validated() -> None:
    for bad in ("a/b", "..", "baseline x"):
        err = _bad(lambda r, bad=bad: r["variants"].update({bad: {"layers": []}}))
        assert err.key == f"variants.{bad}" and "letters, digits" in err.expected


def test_malformed_toml_is_a_study_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("[data\nsynthetic = 1\n")
    with pytest.raises(ablab.StudyError) as info:
        ablab.load_study(path)
    assert info.value.key == "(syntax)" and str(path) in str(info.value)


def test_missing_file_is_a_study_error(tmp_path: Path) -> None:
    with pytest.raises(ablab.StudyError, match="no such file"):
        ablab.load_study(tmp_path / "missing.toml")


def test_in_code_study_accepts_a_callable_builder() -> None:
    def builder(units: int = 4):
        raise NotImplementedError

    study = ablab.Study(
        data={"synthetic": {"shape": [20, 3]}},
        model={"builder": builder, "params": {"units": 2}},
        train={"loss": "mse"},
        variants={"a": {}, "b": {"params": {"units": 3}}},
    )
    assert study.baseline == "a"
    assert study.variant_params("b") == {"units": 3}
    assert "callable" in study.resolved()["model"]["builder"]


def test_losses_and_metrics_with_arguments_become_keras_configs() -> None:
    import keras

    from ablab.study.schema import TrainSpec

    train = TrainSpec.model_validate(
        {
            "loss": {"name": "sparse_categorical_crossentropy", "from_logits": True},
            "metrics": ["mae", {"name": "accuracy"}, {"name": "AUC", "num_thresholds": 50}],
        }
    )
    assert train.loss_name == "sparse_categorical_crossentropy"
    assert train.loss_config() == {
        "class_name": "SparseCategoricalCrossentropy",
        "config": {"from_logits": True},
    }
    # no arguments: the plain name, resolved by Keras like compile does (accuracy by shape)
    assert train.metric_configs()[:2] == ["mae", "accuracy"]
    # with arguments: every instance records the same History name (Keras would number them)
    auc = train.metric_configs()[2]
    names = {keras.metrics.get(auc).name for _ in range(3)}
    assert names == {"auc"} and train.metric_names() == ["mae", "accuracy", "auc"]


def test_learning_rate_schedules_and_example_studies_load() -> None:
    import keras

    from ablab.study.remedies import with_remedies
    from tests.conftest import ROOT

    mlp = ablab.load_study(ROOT / "examples" / "digits_mlp.toml")
    assert not mlp.data.target_is_input()
    assert not with_remedies(mlp).data.target_is_input()  # a round trip keeps the target
    for name in ("digits_cnn", "breast_cancer_dropout", "bn_yes_or_no", "bn_batch_size"):
        ablab.load_study(ROOT / "examples" / f"{name}.toml")
    study = ablab.study_from_dict(
        {
            "data": {"synthetic": {"shape": [10, 2]}},
            "train": {
                "loss": "mse",
                "optimizer": {
                    "name": "sgd",
                    "learning_rate": {
                        "schedule": "ExponentialDecay",
                        "initial_learning_rate": 0.1,
                        "decay_steps": 10,
                        "decay_rate": 0.5,
                    },
                },
            },
            "variants": {"a": {"layers": [{"layer": "Dense", "units": 2}]}},
        }
    )
    opt = keras.optimizers.get(study.train.optimizer_config())
    assert type(opt._learning_rate).__name__ == "ExponentialDecay"
    assert study.data.target_is_input()


def test_numbers_out_of_their_sane_range_are_refused_by_key() -> None:
    """Each of these reached the engine (issue #16): an OverflowError, a 139 s wait, a
    NaN trained on every seed, a chunk of one seed."""
    import math as m

    base = {
        "data": {"synthetic": {"shape": [10, 3]}},
        "train": {"loss": "mse"},
        "variants": {"a": {"layers": [{"layer": "Dense", "units": 3}]}},
    }
    cases = {
        "train.epochs": ({"train": {"loss": "mse", "epochs": 1e12}}, "less than or equal"),
        "seeds.count": ({"seeds": {"count": 1e12}}, "less than or equal"),
        "engine.memory_budget_mb": ({"engine": {"memory_budget_mb": 1e-6}}, "greater than"),
        "verdicts.margin": ({"verdicts": {"margin": m.inf}}, "finite"),
        "train.optimizer.learning_rate": (
            {"train": {"loss": "mse", "optimizer": {"name": "sgd", "learning_rate": m.nan}}},
            ">= 0",
        ),
        "data.synthetic.shape": ({"data": {"synthetic": {"shape": [1e9, 1e9]}}}, "GiB"),
    }
    for key, (change, text) in cases.items():
        with pytest.raises(ablab.StudyError) as info:
            study_from_dict({**base, **change}, source="s.toml")
        assert f"[{key}]" in str(info.value) and text in str(info.value), str(info.value)
    study = study_from_dict(base, source="s.toml")
    study.variants["a"].train = {"optimizer": {"name": "sgd", "learning_rate": -1}}
    with pytest.raises(ablab.StudyError, match=r"\[variants\.a\.train\.optimizer\.learning_rate\]"):
        study.variant_train("a")
    with pytest.raises(ablab.StudyError, match=r"seeds\.count"):
        study.with_seeds(count=10**9)


def test_an_integer_learning_rate_is_a_float_for_keras() -> None:
    """TOML's `learning_rate = 1000` is an int, which Keras refuses ("should be float")."""
    import keras

    train = TrainSpec(loss="mse", optimizer={"name": "sgd", "learning_rate": 1000})
    config = train.optimizer_config()
    assert config["config"]["learning_rate"] == 1000.0
    assert float(keras.optimizers.get(config).learning_rate) == 1000.0
