"""ablab.run: the Python API end to end, storage, interruption."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pyarrow.parquet as pq
import pytest

import ablab
from ablab.store.catalog import query
from ablab.store.records import variant_histories
from ablab.store.rundir import RunDir, list_runs


def test_run_returns_tables_and_stores_everything(tiny_study: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    result = ablab.run(tiny_study, runs_dir=runs)
    assert result.state == "complete" and result.run_dir.parent == runs
    assert set(result.summary) == {"plain", "bn"}
    for name, s in result.summary.items():
        assert s["n_seeds"] == 6 and s["diverged"] == 0, name
        d = s["final_val_loss"]
        assert d["q05"] <= d["median"] <= d["q95"]
    # History: one row per variant x seed x epoch, with loss and val_loss.
    table = result.history
    assert table.num_rows == 2 * 6 * 3
    assert {"run_id", "variant", "seed", "epoch", "loss", "val_loss"} <= set(table.column_names)
    back = variant_histories(table)
    np.testing.assert_array_equal(back["bn"].seeds, np.arange(6))
    np.testing.assert_array_equal(
        back["bn"].values["val_loss"], result.histories["bn"].values["val_loss"]
    )
    # Resolved study with versions and platform.
    meta = json.loads((result.run_dir / "study.json").read_text())
    versions = meta["environment"]["versions"]
    assert {"python", "keras", "jax", "numpy"} <= set(versions)
    assert versions["keras"] == keras.__version__ and meta["environment"]["platform"]
    assert meta["study"]["seeds"]["count"] == 6 and meta["version"] == 1
    # Probes (on for this small model) are stored beside the history, queryable with SQL.
    probes = result.probes
    assert set(probes.column("probe").to_pylist()) >= {
        "dense#0/kernel_sum",
        "grad_norm",
        "train_loss_inference",
        "val_loss_train_mode",
        "batch_normalization#0/moving_mean_progress",
    }
    _, rows = query(runs, "SELECT count(*) FROM probes WHERE probe = 'grad_norm'")
    assert rows == [(2 * 6 * 9,)]  # variants x seeds x steps (3 epochs x 3 batches)
    doc = result.to_json()
    assert doc["explain"]["plain"]["optimum"]["kind"] == "pca"
    assert doc["explain"]["bn"]["bn"][0]["updates"] == 9
    # 2 chunks per variant -> 4 parquet cells; catalog row complete.
    assert len(RunDir(result.run_dir).cell_files()) == 4
    (row,) = list_runs(runs)
    assert row["run_id"] == result.run_id and row["state"] == "complete"
    assert row["cells_done"] == row["cells_total"] == 4


def test_json_document_has_the_documented_keys(tiny_study: Path, tmp_path: Path) -> None:
    doc = ablab.run(tiny_study, runs_dir=tmp_path / "r", seeds=2).to_json()
    assert {"run_id", "run_dir", "wall_s", "runs_per_s", "variants"} <= set(doc)
    v = doc["variants"]["plain"]
    assert {"n_seeds", "diverged", "final_val_loss"} <= set(v)
    assert set(v["final_val_loss"]) == {"mean", "median", "q05", "q95"}
    assert v["n_seeds"] == 2


def test_same_seeds_same_results_across_runs(tiny_study: Path, tmp_path: Path) -> None:
    a = ablab.run(tiny_study, runs_dir=tmp_path / "a")
    b = ablab.run(tiny_study, runs_dir=tmp_path / "b")
    np.testing.assert_array_equal(
        a.histories["bn"].values["val_loss"], b.histories["bn"].values["val_loss"]
    )


def test_in_code_study_with_callable_builder(tmp_path: Path) -> None:
    def make(width: int) -> keras.Model:
        return keras.Sequential(
            [keras.Input((5,)), keras.layers.Dense(width), keras.layers.Dense(5)]
        )

    study = ablab.Study(
        name="code",
        data={"synthetic": {"shape": [30, 5], "seed": 3}},
        train={"loss": "mse", "optimizer": "adam", "epochs": 2, "validation_split": 0.2},
        model={"builder": make},
        variants={"w2": {"params": {"width": 2}}, "w4": {"params": {"width": 4}}},
        seeds={"count": 3},
    )
    result = ablab.run(study, runs_dir=tmp_path)
    assert result.summary["w4"]["n_seeds"] == 3
    assert result.history.num_rows == 2 * 3 * 2


def test_interrupt_keeps_finished_cells(tiny_study: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"

    def stop_after_two(done: int, total: int) -> None:
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(ablab.RunInterrupted) as info:
        # one worker: the cells finish in plan order (tests/test_executors.py covers more)
        ablab.run(tiny_study, runs_dir=runs, on_cell=stop_after_two, workers=1)
    assert info.value.cells_done == 2 and info.value.cells_total == 4
    assert "interrupted: 2 of 4 cells" in str(info.value)
    run = RunDir(Path(info.value.run_dir))
    assert run.read_json("status.json")["state"] == "interrupted"
    files = run.cell_files()
    assert len(files) == 2
    # whole chunks of variant plain: 4 + 2 seeds, x 3 epochs
    assert [pq.read_table(f).num_rows for f in files] == [4 * 3, 2 * 3]
    assert not list(run.path.rglob("*.tmp"))  # no half-written files
    (row,) = list_runs(runs)
    assert row["state"] == "interrupted" and row["cells_done"] == 2


def test_variants_must_share_the_validation_split(tiny_study: Path, tmp_path: Path) -> None:
    text = tiny_study.read_text().replace(
        "[variants.bn]\n", "[variants.bn]\ntrain = { validation_split = 0.2 }\n"
    )
    bad = tmp_path / "split.toml"
    bad.write_text(text)
    with pytest.raises(ablab.StudyError) as info:
        ablab.run(bad, runs_dir=tmp_path / "runs")
    assert info.value.key == "variants.bn.train.validation_split"
    assert not (tmp_path / "runs").exists()


def test_bad_input_writes_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        (Path(__file__).parent / "conftest.py")
        .read_text()
        .split('TINY_STUDY = """')[1]
        .split('"""')[0]
        .replace('"Dense", units = 12', '"Dense", units = 11')
    )
    with pytest.raises(ablab.StudyError):
        ablab.run(bad, runs_dir=tmp_path / "runs")
    assert not (tmp_path / "runs").exists()


def test_seed_study_verdicts(tmp_path: Path) -> None:
    """On today's Keras the identity activation changes nothing (equivalent) and BN's effect
    is large enough to call with 100 seeds (README: 'helps', about -3.8 % val_loss)."""
    result = ablab.run(
        Path(__file__).parents[1] / "examples" / "bn_yes_or_no.toml", seeds=100, runs_dir=tmp_path
    )
    by = {c.variant: c for c in result.comparisons}
    assert set(by) == {"plain_identity", "bn", "bn_after"}
    assert by["plain_identity"].verdict == "equivalent"
    assert by["bn"].verdict == "helps" and by["bn_after"].verdict == "helps"
    assert by["bn"].ci_high < 0 and by["bn"].n == 100
    doc = result.to_json()
    keys = {
        "variant",
        "baseline",
        "metric",
        "n",
        "diff_mean",
        "ci_low",
        "ci_high",
        "p_value",
        "p_adjusted",
        "prob_better",
        "verdict",
        "seeds_needed",
    }
    assert all(keys <= set(c) for c in doc["comparisons"])
    assert "Holm" in doc["verdict_rule"]
    # the example declares plain = plain_identity and bn = bn_after: both hold exactly
    assert [(c.name, c.passed, c.max_abs_dev) for c in result.checks] == [
        ("plain ≡ plain_identity", True, 0.0),
        ("bn ≡ bn_after", True, 0.0),
    ]


def test_probes_cover_the_first_chunks_only(tiny_study: Path, tmp_path: Path) -> None:
    """``[probes] seeds = 3`` with chunks of 4: the first chunk (seeds 0-3) is probed, the
    second runs the probe-free program; histories cover all 6 seeds either way."""
    tiny_study.write_text(tiny_study.read_text() + "[probes]\nseeds = 3\n")
    result = ablab.run(tiny_study, runs_dir=tmp_path / "runs")
    probed = set(result.probes.column("seed").to_pylist())
    assert probed == {0, 1, 2, 3}
    assert result.histories["bn"].n_seeds == 6
    meta = json.loads((result.run_dir / "study.json").read_text())
    plan = meta["plan"]
    assert plan["chunk_sizes"] == {"plain": 4, "bn": 4} and plan["cells_total"] == 4
    assert plan["probed_chunks"] == {"plain": 1, "bn": 1}
    assert plan["fingerprint"]["keras"] == keras.__version__ and len(plan["data"]) == 24
    explain = result.to_json()["explain"]["bn"]
    assert explain["probes"] and explain["bn"][0]["updates"] == 9
