"""Issue #18 items 3 and 4 end to end: an l2 variant is judged on the penalty-free
``val_data_loss`` by default and the output says so; insisting on ``val_loss`` warns; the
summary table shows the verdict metric (every metric with ``--all-metrics``); ``ablab compare
RUN --metric NAME`` re-judges a stored run without retraining. One run of 2 variants x 8
seeds x 2 epochs, shared by the tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ablab.cli import main
from ablab.store.rundir import RunDir

L2_STUDY = """
name = "l2_or_not"
[data]
path = "data.npz"
target = "y"
[train]
optimizer = "adam"
loss = { name = "sparse_categorical_crossentropy", from_logits = true }
metrics = ["accuracy"]
epochs = 2
batch_size = 16
validation_split = 0.25
shuffle = false
[variants]
baseline = "plain"
[variants.plain]
layers = [{ layer = "Dense", units = 3 }]
[variants.l2]
layers = [{ layer = "Dense", units = 3, kernel_regularizer = "l2" }]
[seeds]
count = 8
[engine]
chunk_size = 8
"""


@pytest.fixture(scope="module")
def l2_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """``(runs dir, ablab run --json document)`` of the l2-vs-plain study."""
    root = tmp_path_factory.mktemp("l2")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype("float32")
    np.savez(root / "data.npz", x=x, y=(x[:, 0] > 0).astype("int64") + (x[:, 1] > 1))
    (root / "study.toml").write_text(L2_STUDY)
    runs = root / "runs"
    out = _run(["run", str(root / "study.toml"), "--runs-dir", str(runs), "--json"])
    return runs, json.loads(out)


def _run(argv: list[str], code: int = 0) -> str:
    """``ablab ARGV``'s stdout (checking its exit code), captured by hand: a module fixture
    cannot take capsys."""
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(argv) == code
    return buf.getvalue()


def test_l2_is_judged_on_the_penalty_free_loss_and_says_so(l2_run: tuple[Path, dict]) -> None:
    runs, doc = l2_run
    assert doc["verdict_metric"] == "val_data_loss"
    assert doc["comparisons"][0]["metric"] == "val_data_loss"
    assert "variants differ in regularisation (l2: kernel_regularizer" in doc["metric_note"]
    assert "Keras' val_loss includes the penalty" in doc["metric_note"]
    assert doc["metric_warning"] == ""
    finals = doc["variants"]["l2"]["finals"]  # the penalty is in Keras' loss only
    assert finals["val_loss"]["median"] > finals["val_data_loss"]["median"] + 1e-3
    plain = doc["variants"]["plain"]["finals"]  # no regulariser: data_loss is Keras' loss
    assert plain["val_data_loss"]["median"] == pytest.approx(plain["val_loss"]["median"])
    shown = _run(["show", doc["run_id"], "--runs-dir", str(runs)])
    assert "final val_data_loss over seeds" in shown
    assert "note: verdict metric val_data_loss: the variants differ in regularisation" in shown
    assert "vs plain on final val_data_loss" in shown


def test_insisting_on_val_loss_warns_in_table_and_json(l2_run: tuple[Path, dict]) -> None:
    runs, doc = l2_run
    argv = ["compare", doc["run_id"], "--runs-dir", str(runs), "--metric", "val_loss"]
    judged = json.loads(_run([*argv, "--json"]))
    assert judged["verdict_metric"] == "val_loss"
    assert judged["comparisons"][0]["metric"] == "val_loss"
    assert judged["metric_warning"].startswith("val_loss includes regularisation penalties")
    assert "val_data_loss compares the fit to the data alone" in judged["metric_warning"]
    text = _run(argv)
    assert "final val_loss over seeds" in text
    assert "warning: val_loss includes regularisation penalties" in " ".join(text.split())


def test_compare_run_rejudges_on_any_recorded_metric(l2_run: tuple[Path, dict]) -> None:
    runs, doc = l2_run
    argv = ["compare", doc["run_id"], "--runs-dir", str(runs), "--metric", "val_accuracy"]
    judged = json.loads(_run([*argv, "--json"]))
    (cmp,) = judged["comparisons"]
    assert cmp["metric"] == "val_accuracy" and cmp["lower_is_better"] is False
    assert judged["metric_warning"] == "" and judged["metric_note"] == ""
    # expected: the stored history's final val_accuracy, straight from the run folder
    table = RunDir(Path(doc["run_dir"])).history().to_pandas()
    last = table[table["epoch"] == table["epoch"].max()]
    for v in ("plain", "l2"):
        expected = np.median(last[last["variant"] == v]["val_accuracy"])
        got = judged["variants"][v]["finals"]["val_accuracy"]["median"]
        assert got == pytest.approx(expected)
    text = _run(argv)
    assert "final val_accuracy over seeds" in text
    assert "on final val_accuracy (higher is better" in text
    every = _run(["show", doc["run_id"], "--runs-dir", str(runs), "--all-metrics"])
    for name in ("val_data_loss", "loss", "data_loss", "accuracy", "val_accuracy"):
        assert f"final {name} over seeds" in every


def test_compare_run_refuses_an_unrecorded_metric(
    l2_run: tuple[Path, dict], capsys: pytest.CaptureFixture[str]
) -> None:
    runs, doc = l2_run
    argv = ["compare", doc["run_id"], "--runs-dir", str(runs), "--metric", "val_auc"]
    assert main(argv) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "'val_auc'" in err and "val_accuracy" in err and "val_data_loss" in err


def test_rejudging_on_another_metric_drops_the_old_metrics_direction_and_margin(
    l2_run: tuple[Path, dict], tmp_path: Path
) -> None:
    """A study judged on val_accuracy (higher is better, margin 0.01 in accuracy units),
    re-judged on val_data_loss: the loss is lower-is-better with its own default margin --
    not the stored accuracy settings (which would invert the verdict)."""
    import shutil

    from ablab.analysis.document import rejudge

    runs, doc = l2_run
    copy = tmp_path / doc["run_id"]
    shutil.copytree(runs / doc["run_id"], copy)
    meta = json.loads((copy / "study.json").read_text())
    meta["study"]["verdicts"] = {"metric": "val_accuracy", "higher_is_better": True, "margin": 0.01}
    (copy / "study.json").write_text(json.dumps(meta))
    same = rejudge(RunDir(copy))["comparisons"][0]
    assert same["metric"] == "val_accuracy" and same["lower_is_better"] is False
    assert same["margin"] == 0.01
    other = rejudge(RunDir(copy), metric="val_data_loss")["comparisons"][0]
    assert other["metric"] == "val_data_loss" and other["lower_is_better"] is True
    assert other["margin"] != 0.01  # the default for the loss: 0.1 x the baseline's SD
    assert other["margin_rule"].startswith("0.1 × baseline SD")
