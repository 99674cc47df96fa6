"""Resumable runs (ablab.execution.pipeline.resume): a run killed with SIGKILL mid-way is
finished by
``ablab run --resume RUN`` and ends bit-identical to an uninterrupted run of the same seeds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest

import ablab
from ablab.errors import InputError
from ablab.store.rundir import RunDir, list_runs
from tests.conftest import TINY_STUDY

ABLAB = str(Path(sys.executable).parent / "ablab")

# 40 seeds in chunks of 2 -> 20 cells per variant; the first 2 chunks carry probes, the
# rest run the probe-free program: a resumed run must rebuild both kinds of cell.
MANY_CELLS = (
    TINY_STUDY.replace("count = 6", "count = 40").replace("chunk_size = 4", "chunk_size = 2")
    + "[probes]\nseeds = 4\n"
)

# What may differ between two runs of the same seeds: identity, time, where it ran.
VOLATILE = {
    "run_id",
    "run_dir",
    "wall_s",
    "runs_per_s",
    "train_s",
    "compile_s",
    "version",
    "executor",
    "created_at",
}


def _sorted_rows(table: pa.Table) -> pa.Table:
    table = table.drop_columns(["run_id"])
    keys = [
        k for k in ("variant", "seed", "kind", "probe", "step", "epoch") if k in table.schema.names
    ]
    return table.sort_by([(k, "ascending") for k in keys])


def _document(run_dir: Path) -> dict:
    doc = json.loads((run_dir / "summary.json").read_text())
    # where the study file was (each run here reads its own copy) is not a result
    doc["study"] = {k: v for k, v in doc["study"].items() if k not in ("source", "root")}
    return {k: v for k, v in doc.items() if k not in VOLATILE}


def _assert_same_run(a: Path, b: Path) -> None:
    ra, rb = RunDir(a), RunDir(b)
    assert _sorted_rows(ra.history()).equals(_sorted_rows(rb.history()))
    assert _sorted_rows(ra.probes()).equals(_sorted_rows(rb.probes()))
    assert _document(a) == _document(b)


@pytest.fixture
def study_file(tmp_path: Path) -> Path:
    path = tmp_path / "many.toml"
    path.write_text(MANY_CELLS)
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> ablab.RunResult:
    """The uninterrupted run both resume tests must reproduce."""
    root = tmp_path_factory.mktemp("whole")
    (root / "many.toml").write_text(MANY_CELLS)
    result = ablab.run(root / "many.toml", runs_dir=root / "runs")
    assert result.state == "complete"
    return result


def _cells(run_dir: Path) -> int:
    return len(list((run_dir / "cells").glob("*/chunk-*.parquet")))


def test_kill_9_then_resume_is_bit_identical(
    study_file: Path, tmp_path: Path, reference: ablab.RunResult
) -> None:
    runs = tmp_path / "killed"
    log = tmp_path / "killed.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [ABLAB, "run", str(study_file), "--runs-dir", str(runs), "--quiet", "--json"],
            stdout=subprocess.DEVNULL,
            stderr=sink,
        )
    run_dir = None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        found = [p.parent for p in runs.glob("*/study.json")] if runs.is_dir() else []
        if found and _cells(found[0]) >= 3:
            run_dir = found[0]
            break
        time.sleep(0.005)
    assert run_dir is not None, log.read_text()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "running"  # nobody could mark it: the process was killed
    cells_before = _cells(run_dir)
    assert 3 <= cells_before < 40, "the kill must land mid-run"
    (run_dir / "cells" / "plain" / ".chunk-00019.parquet.x.tmp").write_bytes(b"half")
    shown = subprocess.run(
        [ABLAB, "show", run_dir.name, "--runs-dir", str(runs)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "state: killed" in shown.stdout
    (row,) = list_runs(runs)
    assert row["state"] == "killed"
    assert f"{status['cells_done']}/40 cells" in shown.stdout  # the list agrees with show RUN
    assert row["cells_done"] == status["cells_done"]
    assert f"ablab run --resume {run_dir.name}" in shown.stdout
    # a finished cell damaged after the kill (issue #16: the resume trained the missing
    # cells, then crashed reading this one in the analysis, and every resume after it too)
    hurt = run_dir / "cells" / "plain" / "chunk-00001.parquet"
    hurt.write_bytes(hurt.read_bytes()[:100])

    done = subprocess.run(
        [ABLAB, "run", "--resume", run_dir.name, "--runs-dir", str(runs), "--json"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["state"] == "complete" and doc["run_id"] == run_dir.name
    assert _cells(run_dir) == 40
    assert not list(run_dir.glob("*/*/.*.tmp")), "partial writes are cleaned"
    _assert_same_run(reference.run_dir, run_dir)
    (row,) = list_runs(runs)
    assert row["state"] == "complete" and row["cells_done"] == 40


def test_interrupted_run_resumes_in_process(
    study_file: Path, tmp_path: Path, reference: ablab.RunResult
) -> None:
    def stop(done: int, total: int) -> None:
        if done == 25:  # into the second variant
            raise KeyboardInterrupt

    runs = tmp_path / "runs"
    with pytest.raises(ablab.RunInterrupted):
        ablab.run(study_file, runs_dir=runs, on_cell=stop)
    (run_dir,) = [p.parent for p in runs.glob("*/study.json")]
    assert json.loads((run_dir / "status.json").read_text())["state"] == "interrupted"
    trained: list[int] = []
    result = ablab.resume("latest", runs_dir=runs, on_cell=lambda d, t: trained.append(d))
    assert trained == list(range(26, 41))  # only the 15 missing cells
    assert result.state == "complete"
    _assert_same_run(reference.run_dir, run_dir)


def test_resume_refuses_complete_and_locked_runs(study_file: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    done = ablab.run(study_file, runs_dir=runs, seeds=2)
    with pytest.raises(InputError, match="complete run"):
        ablab.resume(done.run_id, runs_dir=runs)

    def stop(done: int, total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(ablab.RunInterrupted) as info:
        ablab.run(study_file, runs_dir=runs, seeds=4, on_cell=stop)
    run_dir = RunDir(Path(info.value.run_dir))
    # as if another process were running it
    with run_dir.locked(), pytest.raises(InputError, match="locked by process"):
        ablab.resume(run_dir.path)
    assert ablab.resume(run_dir.path).state == "complete"


def test_resume_cli_usage_errors(study_file: Path, tmp_path: Path) -> None:
    both = subprocess.run(
        [ABLAB, "run", str(study_file), "--resume", "latest", "--runs-dir", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert both.returncode == 2 and "drop STUDY" in both.stderr
    missing = subprocess.run(
        [ABLAB, "run", "--resume", "nope", "--runs-dir", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 2 and "no such run" in missing.stderr


def test_resume_refuses_another_environment(study_file: Path, tmp_path: Path) -> None:
    """A cell computed by other software (here: the stored fingerprint says jax 0.0.1)
    would not be bit-identical: refused, naming the difference, nothing trained."""
    runs = tmp_path / "runs"

    def stop(done: int, total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(ablab.RunInterrupted) as info:
        ablab.run(study_file, runs_dir=runs, seeds=4, on_cell=stop)
    meta_path = Path(info.value.run_dir) / "study.json"
    meta = json.loads(meta_path.read_text())
    meta["plan"]["fingerprint"]["jax"] = "0.0.1"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(InputError, match=r"jax: stored '0\.0\.1'") as err:
        ablab.resume("latest", runs_dir=runs)
    assert err.value.key == "--resume"
    assert len(list(Path(info.value.run_dir).glob("cells/*/chunk-*.parquet"))) == 1


def test_a_damaged_cell_of_a_complete_run_is_named_then_repaired(
    study_file: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A truncated cell of a finished run crashed `ablab show` / `report` / every `query`
    of the runs folder, and `--resume` answered "complete, nothing to resume" (issue #16).
    Now readers skip it with a warning naming it, and --resume re-trains it to the bits."""
    from ablab.cli import main

    runs = tmp_path / "runs"
    done = ablab.run(study_file, runs_dir=runs, seeds=4)  # 2 cells per variant, all probed
    run_dir = RunDir(done.run_dir)
    before = _sorted_rows(run_dir.history()), _sorted_rows(run_dir.probes())
    summary = _document(run_dir.path)
    for kind in ("cells", "probes"):
        hurt = run_dir.path / kind / "bn" / "chunk-00001.parquet"
        hurt.write_bytes(hurt.read_bytes()[:-40])
    with caplog.at_level("WARNING", logger="ablab"):
        assert main(["show", done.run_id, "--runs-dir", str(runs), "--json"]) == 0
        assert main(["report", done.run_id, "--runs-dir", str(runs)]) == 0
        assert main(["query", "SELECT count(*) FROM runs", "--runs-dir", str(runs)]) == 0
        assert main(["query", "SELECT count(*) FROM history", "--runs-dir", str(runs)]) == 0
    assert "cells/bn/chunk-00001.parquet is damaged" in caplog.text
    assert f"ablab run --resume {done.run_id}" in caplog.text

    repaired = ablab.resume(done.run_id, runs_dir=runs)
    assert repaired.state == "complete"
    run_dir = RunDir(run_dir.path)
    assert run_dir.damaged_files() == {}
    assert _sorted_rows(run_dir.history()).equals(before[0])
    assert _sorted_rows(run_dir.probes()).equals(before[1])
    assert _document(run_dir.path) == summary
    with pytest.raises(InputError, match="every cell intact"):
        ablab.resume(done.run_id, runs_dir=runs)
