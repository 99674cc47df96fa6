"""The command line: `ablab run / show / query`, exit codes, messages, --json, Ctrl-C."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import ablab
from ablab.cli import main
from tests.conftest import TINY_STUDY

ABLAB = [sys.executable, "-m", "ablab"]

_IMPORTS_AT_EXIT = """
import atexit, sys
def imports():
    seen = ", ".join(f"{m} {m in sys.modules}" for m in ("sklearn", "matplotlib", "keras"))
    print("imported:", seen, file=sys.stderr)
atexit.register(imports)
sys.argv[0] = "ablab"
from ablab.cli import run_main
run_main()
"""


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """One run of the tiny study, made through the CLI with --json."""
    root = tmp_path_factory.mktemp("cli")
    (root / "tiny.toml").write_text(TINY_STUDY)
    args = ["run", str(root / "tiny.toml"), "--runs-dir", str(root / "runs"), "--json"]
    out = subprocess.run(  # `ablab run ...` (python -m ablab), telling what it imported
        [sys.executable, "-c", _IMPORTS_AT_EXIT, *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    # Keras came without scikit-learn and matplotlib (ablab._startup), and the synthetic
    # data and the tables needed neither
    assert "imported: sklearn False, matplotlib False, keras True" in out.stderr
    doc = json.loads(out.stdout)  # exactly one JSON document on stdout
    return root, doc


def test_run_json_is_one_document(stored: tuple[Path, dict]) -> None:
    _, doc = stored
    assert {"run_id", "run_dir", "wall_s", "runs_per_s", "variants", "comparisons"} <= set(doc)
    assert doc["variants"]["bn"]["n_seeds"] == 6
    (cmp,) = doc["comparisons"]
    assert cmp["variant"] == "bn" and cmp["baseline"] == "plain" and cmp["n"] == 6
    assert cmp["verdict"] in ("helps", "hurts", "equivalent", "inconclusive")
    # wall_s counts from the command's start: compile and training are parts of it (#17)
    assert doc["compile_s"] > 0 and doc["train_s"] > 0
    assert doc["wall_s"] >= doc["compile_s"] + doc["train_s"]
    assert doc["runs_per_s"] == pytest.approx(12 / doc["wall_s"])


def test_run_prints_a_table(
    tiny_study: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", str(tiny_study), "--runs-dir", str(tmp_path), "--seeds", "2"]) == 0
    out = capsys.readouterr().out
    for text in (
        "plain (baseline)",
        "bn",
        "median",
        "5–95 %",
        "runs/s end to end",
        "; compile",
        "training",
        "stored in",
        "vs plain on final val_loss",
        "verdict rule",
    ):
        assert text in out


def test_show_lists_and_summarises(
    stored: tuple[Path, dict], capsys: pytest.CaptureFixture[str]
) -> None:
    root, doc = stored
    assert main(["show", "--runs-dir", str(root / "runs")]) == 0
    assert doc["run_id"][:12] in capsys.readouterr().out
    assert main(["show", doc["run_id"], "--runs-dir", str(root / "runs"), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["state"] == "complete"
    assert shown["comparisons"][0]["verdict"] == doc["comparisons"][0]["verdict"]
    for v in ("plain", "bn"):
        np.testing.assert_allclose(
            shown["variants"][v]["final_val_loss"]["median"],
            doc["variants"][v]["final_val_loss"]["median"],
        )


def test_query_runs_sql(stored: tuple[Path, dict], capsys: pytest.CaptureFixture[str]) -> None:
    root, _ = stored
    sql = "SELECT variant, count(*) AS n FROM history WHERE epoch = 3 GROUP BY 1 ORDER BY 1"
    assert main(["query", sql, "--runs-dir", str(root / "runs"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "columns": ["variant", "n"],
        "rows": [["bn", 6], ["plain", 6]],
    }
    assert main(["query", "SELEKT", "--runs-dir", str(root / "runs")]) == 2
    assert "query failed" in capsys.readouterr().err


def _with_data(lines: str) -> str:
    """TINY_STUDY with its [data] table replaced by ``lines``."""
    return TINY_STUDY.replace('synthetic = { kind = "normal", shape = [100, 12], seed = 1 }', lines)


BAD_INPUTS = {
    "malformed_toml": ("[data\n", "(syntax)"),
    "unknown_section": (TINY_STUDY + "\n[extra]\nx = 1\n", "extra"),
    "unknown_key": (TINY_STUDY.replace("epochs = 3", "epochz = 3"), "train.epochz"),
    "unknown_layer": (
        TINY_STUDY.replace('layer = "BatchNormalization"', 'layer = "BatchNorm"'),
        "variants.bn.layers[1].layer",
    ),
    "shape_mismatch": (
        TINY_STUDY.replace('"Dense", units = 12 }]', '"Dense", units = 5 }]'),
        "variants.plain",
    ),
    "no_training_rows": (
        TINY_STUDY.replace("validation_split = 0.1", "validation_split = 0.999"),
        "train.validation_split",
    ),
    "unknown_verdict_metric": (
        TINY_STUDY + '\n[verdicts]\nmetric = "val_acc"\n',
        "verdicts.metric",
    ),
    "zero_seeds": (TINY_STUDY.replace("count = 6", "count = 0"), "seeds.count"),
    "unvectorized_callback": (  # a host-side callback: refused, pointing at the fit engine
        TINY_STUDY.replace(
            "shuffle = false", 'shuffle = false\ncallbacks = [{name = "ModelCheckpoint"}]'
        ),
        "train.callbacks[0]",
    ),
    "early_stopping_unknown_monitor": (
        TINY_STUDY.replace(
            "shuffle = false", 'shuffle = false\nearly_stopping = {monitor = "val_acc"}'
        ),
        "train.early_stopping.monitor",
    ),
    "steps_per_epoch_uneven": (  # 90 rows in batches of 32: a partial batch per pass
        TINY_STUDY.replace("shuffle = false", "shuffle = false\nsteps_per_epoch = 1"),
        "train.steps_per_epoch",
    ),
    "builder_raises": (
        TINY_STUDY.split("[variants]")[0] + '[model]\nbuilder = "boom.py:make"\n[variants.a]\n',
        "variants.a.params",
    ),
    "nan_in_data": (
        TINY_STUDY.replace(
            'synthetic = { kind = "normal", shape = [100, 12], seed = 1 }', 'path = "nan.npy"'
        ),
        "data",
    ),
    "empty_data": (
        TINY_STUDY.replace(
            'synthetic = { kind = "normal", shape = [100, 12], seed = 1 }', 'path = "empty.npy"'
        ),
        "data",
    ),
    # issue #16: each of these ended in a traceback, an OOM kill or nonsense verdicts
    "epochs_huge": (TINY_STUDY.replace("epochs = 3", "epochs = 1e12"), "train.epochs"),
    "seeds_huge": (TINY_STUDY.replace("count = 6", "count = 1e12"), "seeds.count"),
    "csv_text_column": (_with_data('path = "text.csv"\ntarget = "y"'), "data.features"),
    "csv_without_target": (_with_data('path = "reg.csv"'), "data.target"),
    "synthetic_huge": (TINY_STUDY.replace("[100, 12]", "[1e9, 1e9]"), "data.synthetic.shape"),
    "dense_huge_for_the_budget": (
        TINY_STUDY.replace(
            '"Dense", units = 8 }, { layer = "Dense", units = 12 }]',
            '"Dense", units = 100000000 }, { layer = "Dense", units = 12 }]',
        )
        + "memory_budget_mb = 2048\n",
        "engine.memory_budget_mb",
    ),
    "sparse_ce_on_a_regression_target": (
        _with_data('path = "reg.csv"\ntarget = "y"').replace(
            'loss = "mse"', 'loss = "sparse_categorical_crossentropy"'
        ),
        "train.loss",
    ),
    "sparse_ce_on_diabetes": (
        _with_data('sklearn = "diabetes"').replace(
            'loss = "mse"', 'loss = "sparse_categorical_crossentropy"'
        ),
        "train.loss",
    ),
    "learning_rate_negative": (
        TINY_STUDY.replace(
            'optimizer = "adam"', 'optimizer = { name = "sgd", learning_rate = -1 }'
        ),
        "train.optimizer.learning_rate",
    ),
    "learning_rate_nan": (
        TINY_STUDY.replace(
            'optimizer = "adam"', 'optimizer = { name = "sgd", learning_rate = nan }'
        ),
        "train.optimizer.learning_rate",
    ),
    "memory_budget_tiny": (TINY_STUDY + "memory_budget_mb = 1e-6\n", "engine.memory_budget_mb"),
}
BAD_INPUT_TEXT = {  # what the message must say besides its key
    "csv_text_column": "'color'",
    "csv_without_target": "set `target`",
    "dense_huge_for_the_budget": "GiB",
    "sparse_ce_on_diabetes": "labels from 25 to 346",
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_exit_2_clear_message_nothing_written(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text, key = BAD_INPUTS[case]
    (tmp_path / "boom.py").write_text("def make():\n    raise ValueError('builder broke')\n")
    x = np.ones((10, 12))
    x[3, 3] = np.nan
    np.save(tmp_path / "nan.npy", x)
    np.save(tmp_path / "empty.npy", np.ones((0, 12)))
    rng = np.random.default_rng(0)
    cols = {f"f{i}": rng.normal(size=40) for i in range(12)}
    table = {**cols, "color": ["blue", "red"] * 20, "y": rng.normal(size=40)}
    for name, columns in (("text.csv", table), ("reg.csv", {**cols, "y": table["y"]})):
        lines = [",".join(columns)] + [
            ",".join(str(columns[c][r]) for c in columns) for r in range(40)
        ]
        (tmp_path / name).write_text("\n".join(lines) + "\n")
    study = tmp_path / "s.toml"
    study.write_text(text)
    runs = tmp_path / "runs"
    assert main(["run", str(study), "--runs-dir", str(runs)]) == 2
    err = capsys.readouterr().err
    assert str(study) in err and f"[{key}]" in err and "how to fix" in err, err
    assert "expected" in err and "got" in err
    assert BAD_INPUT_TEXT.get(case, "") in err, err
    assert "Traceback" not in err
    assert not runs.exists()


def test_seeds_option_must_be_positive(
    tiny_study: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", str(tiny_study), "--seeds", "0", "--runs-dir", str(tmp_path / "r")]) == 2
    assert "seeds.count" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run"]) == 2
    assert main(["frobnicate"]) == 2


def test_ctrl_c_keeps_finished_cells(tmp_path: Path) -> None:
    # Many small chunks so that the run is still going when SIGINT arrives.
    study = tmp_path / "long.toml"
    study.write_text(
        TINY_STUDY.replace("count = 6", "count = 4000")
        .replace("chunk_size = 4", "chunk_size = 16")
        .replace("epochs = 3", "epochs = 20")
    )
    runs = tmp_path / "runs"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ablab", "run", str(study), "--runs-dir", str(runs)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and len(list(runs.glob("*/cells/*/*.parquet"))) < 3:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted:" in err and "cells had finished and are stored" in err
    (run_dir,) = [p for p in runs.iterdir() if p.is_dir()]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "interrupted" and 3 <= status["cells_done"] < status["cells_total"]
    assert main(["show", run_dir.name, "--runs-dir", str(runs), "--json"]) == 0


def test_report_command_writes_one_html_file(
    report_run: ablab.RunResult, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs_dir = str(report_run.run_dir.parent)
    out = tmp_path / "sub" / "r.html"
    assert main(["report", report_run.run_id[:15], "--runs-dir", runs_dir, "-o", str(out)]) == 0
    assert str(out) in capsys.readouterr().out.replace("\n", "")
    assert out.read_text().startswith("<!DOCTYPE html>")
    assert main(["report", "latest", "--runs-dir", runs_dir]) == 0
    assert (report_run.run_dir / "report.html").is_file()
    assert main(["report", "nope", "--runs-dir", runs_dir]) == 2
    assert "no such run" in capsys.readouterr().err


def test_progress_only_for_a_person_at_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    from ablab import cli as _cli

    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # rich: treat stderr as a terminal
    monkeypatch.setenv("TTY_INTERACTIVE", "1")
    assert _cli._show_progress(quiet=False, as_json=False)
    assert not _cli._show_progress(quiet=True, as_json=False)
    assert not _cli._show_progress(quiet=False, as_json=True)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False, raising=False)
    assert not _cli._show_progress(quiet=False, as_json=False)


def test_progress_bars_in_a_real_terminal_and_report_at_the_end(tmp_path: Path) -> None:
    """`ablab run --report` on a pseudo-terminal draws bars for compile, chunks and checks,
    then writes the report."""
    import pty

    from tests.conftest import REPORT_STUDY

    study = tmp_path / "s.toml"  # the report study without its BatchNormalization variant
    head, _, tail = REPORT_STUDY.partition("[variants.bn]")
    study.write_text(head + "[seeds]" + tail.partition("[seeds]")[2])
    master, slave = pty.openpty()
    env = {**os.environ, "COLUMNS": "120", "TERM": "xterm"}
    env.pop("CI", None)
    proc = subprocess.Popen(
        [*ABLAB, "run", str(study), "--seeds", "2", "--report", "--runs-dir", tmp_path / "runs"],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=env,
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(timeout=300) == 0
    os.close(master)
    screen = b"".join(chunks).decode("utf-8", "replace")
    for text in ("plain", "plain_id", "compiled in", "checks", "plain ≡ plain_id", "━"):
        assert text in screen, text
    (report,) = (tmp_path / "runs").glob("*/report.html")
    assert 'data-plot="checks"' in report.read_text()
    assert "report: " in screen


# The tiny study with `bn` replaced by `huge`: the same layers as `plain`, trained with SGD at a
# learning rate of 1e6 (every seed's loss is inf after the first epoch).
DIVERGING_STUDY = TINY_STUDY.replace(
    '[variants.bn]\nlayers = [{ layer = "Dense", units = 8 }, { layer = "BatchNormalization" },\n'
    '          { layer = "Dense", units = 12 }]',
    '[variants.huge]\nlayers = [{ layer = "Dense", units = 8 }, { layer = "Dense", units = 12 }]\n'
    'train = { optimizer = { name = "sgd", learning_rate = 1e6 } }',
)
# Whether SGD at learning rate 1e6 first overflows to inf or to nan depends on the CPU's
# floating-point path (inf on Intel, nan on AMD EPYC, same jaxlib): both are divergence.
HUGE_LINE = re.compile(
    r"huge: 2 of 2 seeds diverged at epoch 1 \(loss (inf|nan)\); learning_rate 1e\+06 "
    r"\(plain: 0\.001, adam's default\) is the likely cause"
)


def test_a_diverged_variant_is_named_by_run_and_show(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """(The report's "why" shows the same document's lines: tests/test_report.py.)"""
    study = tmp_path / "s.toml"
    study.write_text(DIVERGING_STUDY)
    runs = tmp_path / "runs"
    assert main(["run", str(study), "--seeds", "2", "--runs-dir", str(runs)]) == 0
    run_line = HUGE_LINE.search(capsys.readouterr().out)  # a diverged variant is a finding: exit 0
    assert run_line
    assert main(["show", "latest", "--runs-dir", str(runs), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert list(doc["divergence"]) == ["huge"]
    assert doc["divergence"]["huge"]["text"] == run_line.group(0)
    assert main(["show", "latest", "--runs-dir", str(runs)]) == 0
    assert run_line.group(0) in capsys.readouterr().out


def test_a_baseline_that_diverges_on_every_seed_fails_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    study = tmp_path / "s.toml"
    study.write_text(DIVERGING_STUDY.replace('baseline = "plain"', 'baseline = "huge"'))
    runs = tmp_path / "runs"
    assert main(["run", str(study), "--seeds", "2", "--runs-dir", str(runs), "--json"]) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out)["state"] == "complete"  # stored, and its document printed
    (error,) = captured.err.strip().splitlines()
    assert error.startswith("error: the baseline huge diverged on every seed (2 of 2 at epoch 1")
    assert "learning_rate 1e+06" in error and "the run is stored" in error
    (status,) = runs.glob("*/status.json")
    assert json.loads(status.read_text())["state"] == "complete"


def test_one_diverged_sweep_point_is_a_warning_not_a_failed_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A learning-rate sweep whose big point diverges still judged its other point: exit 0,
    the diverged baseline arm said as a warning (exit 1 is for "nothing could be judged")."""
    study = tmp_path / "s.toml"
    text = TINY_STUDY.replace('optimizer = "adam"', 'optimizer = "sgd"').replace(
        "epochs = 3", "epochs = 1"
    )
    study.write_text(text + "[sweep]\nlearning_rate = [0.01, 1e6]\n")
    runs = tmp_path / "runs"
    assert main(["run", str(study), "--seeds", "2", "--runs-dir", str(runs), "--json"]) == 0
    err = capsys.readouterr().err
    assert "warning: the baseline plain@learning_rate=1000000.0 diverged on every seed" in err
    assert "error:" not in err


_EXIT_SCRIPT = r"""
import atexit, os, sys, threading, time
from ablab import cli


class Teardown:
    def __del__(self, write=os.write):  # (os may be gone by then: bound early)
        write(1, b"torn down\n")


KEPT = Teardown()  # freed when the interpreter tears the process down
atexit.register(lambda: print("atexit ran", flush=True))
if sys.argv[2] == "busy":  # another non-daemon thread still at work
    threading.Thread(target=time.sleep, args=(3.0,)).start()
sys.argv = ["ablab", "show", "nope", "--runs-dir", sys.argv[1]]
cli.run_main()
"""


@pytest.mark.parametrize("threads", ["alone", "busy"])
def test_the_command_leaves_without_the_interpreter_teardown(tmp_path: Path, threads: str) -> None:
    """cli.exit_now: the exit code and the atexit handlers as with sys.exit, without the
    teardown (~0.9 s of the flagship's ~7 s) -- unless another thread is still at work."""
    (tmp_path / "runs").mkdir()
    out = subprocess.run(
        [sys.executable, "-c", _EXIT_SCRIPT, str(tmp_path / "runs"), threads],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2, out.stderr  # bad input: no run called "nope"
    assert "nope" in out.stderr
    assert "atexit ran" in out.stdout
    assert ("torn down" in out.stdout) == (threads == "busy")
