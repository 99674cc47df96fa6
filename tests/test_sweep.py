"""Sweeps (ablab.study.sweep): axes crossed with variants, verdicts per point, the effect table."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ablab
from ablab.errors import InputError, StudyError
from ablab.store.catalog import query
from ablab.study.loading import study_from_dict
from ablab.study.sweep import arm_name, expand_sweep, sweep_effects, sweep_points
from tests.conftest import TINY_STUDY

ABLAB = str(Path(sys.executable).parent / "ablab")


def _study(sweep: dict[str, Any], **extra: Any) -> ablab.Study:
    raw = tomllib.loads(TINY_STUDY)
    raw["sweep"] = sweep
    raw.update(extra)
    return study_from_dict(raw, source="sweep.toml")


def test_expansion_crosses_axes_with_variants_and_pairs_within_points() -> None:
    study = expand_sweep(_study({"batch_size": [16, 32], "learning_rate": [0.001, 0.01]}))
    points = sweep_points(study)
    assert points == [
        {"batch_size": 16, "learning_rate": 0.001},
        {"batch_size": 16, "learning_rate": 0.01},
        {"batch_size": 32, "learning_rate": 0.001},
        {"batch_size": 32, "learning_rate": 0.01},
    ]
    assert len(study.variants) == 2 * 4
    assert study.baseline == "plain@batch_size=16,learning_rate=0.001"
    # every bn arm is compared with the plain arm of the same point, and only with it
    assert study.verdicts.pairs == [(arm_name("bn", p), arm_name("plain", p)) for p in points]
    arm = "bn@batch_size=32,learning_rate=0.01"
    train = study.variant_train(arm)
    assert train.batch_size == 32
    assert train.optimizer_config() == {"class_name": "adam", "config": {"learning_rate": 0.01}}
    assert study.arms[arm].variant == "bn" and study.arms[arm].point == points[3]
    assert expand_sweep(study) is study  # idempotent: a stored (expanded) study stays as is


def test_layer_argument_axis_and_per_point_checks() -> None:
    raw_checks = {"equivalent": [["plain", "bn"]]}
    study = expand_sweep(_study({"BatchNormalization.momentum": [0.5, 0.9]}, checks=raw_checks))
    bn = study.variant_layers("bn@BatchNormalization.momentum=0.5")
    assert bn is not None and bn[1] == {"layer": "BatchNormalization", "momentum": 0.5}
    # plain has no BatchNormalization: unchanged at every point
    assert study.variant_layers("plain@BatchNormalization.momentum=0.9") == [
        {"layer": "Dense", "units": 8},
        {"layer": "Dense", "units": 12},
    ]
    assert study.checks.equivalent == [
        ["plain@BatchNormalization.momentum=0.5", "bn@BatchNormalization.momentum=0.5"],
        ["plain@BatchNormalization.momentum=0.9", "bn@BatchNormalization.momentum=0.9"],
    ]


def test_builder_parameter_axis(tmp_path: Path) -> None:
    builder = tmp_path / "build.py"
    builder.write_text(
        "import keras\n"
        "def build(width=4, bn=False):\n"
        "    layers = [keras.Input((12,)), keras.layers.Dense(width)]\n"
        "    if bn:\n"
        "        layers.append(keras.layers.BatchNormalization())\n"
        "    return keras.Sequential(layers + [keras.layers.Dense(12)])\n"
    )
    raw = tomllib.loads(TINY_STUDY)
    raw["model"] = {"builder": "build.py:build"}
    raw["variants"] = {"baseline": "plain", "plain": {}, "bn": {"params": {"bn": True}}}
    raw["sweep"] = {"width": [4, 6]}
    study = expand_sweep(study_from_dict(raw, source="b.toml", root=str(tmp_path)))
    assert study.variant_params("bn@width=6") == {"bn": True, "width": 6}
    del raw["variants"]["bn"]  # train one variant (2 arms): the width reaches the builder
    study = expand_sweep(study_from_dict(raw, source="b.toml", root=str(tmp_path)))
    result = ablab.run(study, runs_dir=tmp_path / "runs", seeds=2)
    # the linear model's rank (ablab.analysis.explain) is the builder's width at each point
    ranks = {arm: e["optimum"]["rank"] for arm, e in result.to_json()["explain"].items()}
    assert ranks == {"plain@width=4": 4, "plain@width=6": 6}
    assert result.comparisons[0].variant == "plain@width=6"
    assert result.comparisons[0].baseline == "plain@width=4"


@pytest.mark.parametrize(
    ("sweep", "variant_train", "key", "message"),
    [
        ({"colour": [1, 2]}, None, "sweep.colour", "a [train] key"),
        ({"batch_size": []}, None, "sweep.batch_size", "non-empty"),
        ({"batch_size": [8, 8]}, None, "sweep.batch_size", "distinct"),
        ({"batch_size": [0, 8]}, None, "sweep.batch_size", "greater than or equal to 1"),
        ({"epochs": [1, 2]}, {"epochs": 5}, "sweep.epochs", "no variant overrides"),
        ({"params.width": [4, 8]}, None, "sweep.params.width", "a builder study"),
        (
            {"learning_rate": [0.1, 0.2]},
            {"optimizer": {"name": "sgd", "learning_rate": 0.5}},
            "sweep.learning_rate",
            "no variant sets itself",
        ),
        (
            {"learning_rate": [0.1], "optimizer.learning_rate": [0.2]},
            None,
            "sweep.optimizer.learning_rate",
            "one axis per setting",
        ),
        ({"shuffle": ["true", True]}, None, "sweep", "distinct arms"),
        ({"optimizer": ["adam", "keras/SGD"]}, None, "sweep", "valid folder name"),
    ],
)
def test_bad_axes_are_named(
    sweep: dict[str, Any], variant_train: dict[str, Any] | None, key: str, message: str
) -> None:
    raw = tomllib.loads(TINY_STUDY)
    raw["sweep"] = sweep
    if variant_train:
        raw["variants"]["bn"]["train"] = variant_train
    with pytest.raises(StudyError) as info:
        expand_sweep(study_from_dict(raw, source="s.toml"))
    assert info.value.key == key and message in str(info.value)


@pytest.fixture(scope="module")
def swept_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[ablab.RunResult, Path]:
    root = tmp_path_factory.mktemp("sweep")
    path = root / "swept.toml"
    path.write_text(TINY_STUDY + "[sweep]\nbatch_size = [16, 32]\n")
    return ablab.run(path, runs_dir=root / "runs"), root


def test_swept_run_stores_arms_with_verdicts_per_point(
    swept_run: tuple[ablab.RunResult, Path],
) -> None:
    result, root = swept_run
    assert set(result.histories) == {
        "plain@batch_size=16",
        "bn@batch_size=16",
        "plain@batch_size=32",
        "bn@batch_size=32",
    }
    pairs = {(c.variant, c.baseline) for c in result.comparisons}
    assert pairs == {
        ("bn@batch_size=16", "plain@batch_size=16"),
        ("bn@batch_size=32", "plain@batch_size=32"),
    }
    sweep = result.to_json()["sweep"]
    assert sweep["axes"] == {"batch_size": [16, 32]} and sweep["metric"] == "val_loss"
    assert [(r["variant"], r["baseline"], r["point"]) for r in sweep["rows"]] == [
        ("bn", "plain", {"batch_size": 16}),
        ("bn", "plain", {"batch_size": 32}),
    ]
    for row, comp in zip(sweep["rows"], result.comparisons, strict=True):
        assert row["diff_mean"] == comp.diff_mean and row["verdict"] == comp.verdict
    # The arm at batch 16 is exactly the unswept study trained at batch 16 (same seeds).
    plain16 = TINY_STUDY.replace("batch_size = 32", "batch_size = 16")
    (root / "plain16.toml").write_text(plain16)
    direct = ablab.run(root / "plain16.toml", runs_dir=root / "direct")
    np.testing.assert_array_equal(
        direct.histories["plain"].values["val_loss"],
        result.histories["plain@batch_size=16"].values["val_loss"],
    )


def test_stored_swept_run_shows_sweep_table_and_report(
    swept_run: tuple[ablab.RunResult, Path],
) -> None:
    result, root = swept_run
    shown = subprocess.run(
        [ABLAB, "show", result.run_id, "--runs-dir", str(root / "runs")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shown.returncode == 0, shown.stderr
    assert "sweep: effect on final val_loss" in shown.stdout
    assert "bn vs plain" in shown.stdout
    doc = json.loads(
        subprocess.run(
            [ABLAB, "show", result.run_id, "--runs-dir", str(root / "runs"), "--json"],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        ).stdout
    )
    assert doc["sweep"] == json.loads(json.dumps(result.to_json()["sweep"]))
    # arm folders (bn@batch_size=16) are not read as hive partitions: no extra column
    columns, _ = query(root / "runs", "SELECT * FROM history LIMIT 1")
    assert not any("@" in c for c in columns)
    data = result.report_data()
    assert "sweep" in data.available()
    fig = data.figure("sweep")
    (ax,) = fig.axes
    assert ax.get_xlabel() == "batch_size" and len(ax.lines) >= 3
    html = result.write_report().read_text()
    assert 'data-plot="sweep"' in html and "Along the sweep" in html


def test_sweep_effects_ignores_unswept_studies() -> None:
    assert sweep_effects({"arms": {}}, []) is None


def test_single_variant_sweep_compares_each_point_with_the_first() -> None:
    raw = tomllib.loads(TINY_STUDY)
    del raw["variants"]["bn"]
    raw["sweep"] = {"learning_rate": [0.001, 0.01, 0.1]}
    study = expand_sweep(study_from_dict(raw, source="one.toml"))
    assert study.verdicts.pairs == [
        ("plain@learning_rate=0.01", "plain@learning_rate=0.001"),
        ("plain@learning_rate=0.1", "plain@learning_rate=0.001"),
    ]
    rows = sweep_effects(
        study.resolved(),
        [
            {"variant": v, "baseline": b, "metric": "val_loss", "diff_mean": 0.0}
            for v, b in study.verdicts.pairs
        ],
    )
    assert rows is not None
    assert [r["label"] for r in rows["rows"]] == ["plain vs plain@learning_rate=0.001"] * 2


def test_remedies_with_a_sweep_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text(TINY_STUDY + "[sweep]\nbatch_size = [16, 32]\n")
    with pytest.raises(InputError, match="--remedies") as info:
        ablab.run(path, runs_dir=tmp_path / "runs", remedies=True)
    assert "BatchNormalization.momentum" in info.value.fix
    assert not (tmp_path / "runs").exists()
