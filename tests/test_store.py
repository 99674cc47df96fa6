"""Run folders, atomic writes, the DuckDB catalog and SQL over stored runs."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

import ablab
from ablab.store.catalog import query
from ablab.store.io import atomic_write_bytes
from ablab.store.rundir import RunDir, list_runs, resolve_run


def _fake_run(runs: Path, name: str, rows: int) -> RunDir:
    run = RunDir.create(
        runs,
        name,
        {"name": name, "variants": {"a": {}}, "baseline": "a", "seeds": {"count": rows}},
        {"versions": {}},
        1,
    )
    table = pa.table(
        {
            "variant": ["a"] * rows,
            "seed": list(range(rows)),
            "epoch": [1] * rows,
            "diverged_epoch": pa.array([None] * rows, pa.int32()),
            "loss": [float(i) for i in range(rows)],
        }
    )
    run.write_cell("a", 0, table)
    run.finish("complete", 1, 1, {"wall_s": 1.0, "runs_per_s": float(rows)})
    return run


def test_atomic_write_replaces_whole_file(tmp_path: Path) -> None:
    target = tmp_path / "x" / "f.json"
    atomic_write_bytes(target, b"one")
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in target.parent.iterdir()] == ["f.json"]


def test_query_spans_runs(tmp_path: Path) -> None:
    a = _fake_run(tmp_path, "first", 3)
    b = _fake_run(tmp_path, "second", 5)
    cols, rows = query(
        tmp_path, "SELECT run_id, count(*) AS n, sum(loss) FROM history GROUP BY run_id ORDER BY n"
    )
    assert cols == ["run_id", "n", "sum(loss)"]
    assert rows == [(a.run_id, 3, 3.0), (b.run_id, 5, 10.0)]
    _, runs = query(tmp_path, "SELECT name, state FROM runs ORDER BY name")
    assert runs == [("first", "complete"), ("second", "complete")]


def test_json_is_strict_nan_becomes_null() -> None:
    import json

    import numpy as np

    from ablab.store.io import dumps

    doc = json.loads(dumps({"a": float("nan"), "b": np.float32(1.5), "c": [np.inf, np.int64(3)]}))
    assert doc == {"a": None, "b": 1.5, "c": [None, 3]}


def test_catalog_writes_wait_for_a_reader_holding_the_lock(tmp_path: Path) -> None:
    import subprocess
    import sys
    import time

    from ablab.store.catalog import CATALOG, catalog, update_catalog

    with catalog(tmp_path):
        pass
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]);"
            " print('held', flush=True); time.sleep(2)",
            str(tmp_path / CATALOG),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    t0 = time.monotonic()
    ok = update_catalog(tmp_path, "INSERT INTO runs (run_id) VALUES (?)", ["x"])
    holder.communicate()  # waits, and closes its pipe
    assert ok and time.monotonic() - t0 > 0.5  # it waited for the lock, then wrote
    assert [r["run_id"] for r in list_runs(tmp_path)] == ["x"]


def test_query_on_empty_runs_dir_and_bad_sql(tmp_path: Path) -> None:
    assert query(tmp_path / "none", "SELECT count(*) FROM history")[1] == [(0,)]
    with pytest.raises(ablab.BadInput, match="query failed"):
        query(tmp_path, "SELEC 1")


def test_resolve_run_by_id_prefix_path_latest(tmp_path: Path) -> None:
    run = _fake_run(tmp_path, "only", 1)
    assert resolve_run(tmp_path, run.run_id).path == run.path
    assert resolve_run(tmp_path, run.run_id[:10]).path == run.path
    assert resolve_run(tmp_path, str(run.path)).path == run.path
    assert resolve_run(tmp_path, "latest").path == run.path
    with pytest.raises(ablab.InputError, match="no such run"):
        resolve_run(tmp_path, "zzz")


def test_list_runs_newest_first(tmp_path: Path) -> None:
    assert list_runs(tmp_path) == []
    _fake_run(tmp_path, "a", 1)
    _fake_run(tmp_path, "b", 1)
    assert [r["name"] for r in list_runs(tmp_path)] == ["b", "a"]


def test_probes_of_unfinished_cells_are_not_queried(tmp_path: Path) -> None:
    run = _fake_run(tmp_path, "p", 2)
    probes = pa.table(
        {
            "variant": ["a"],
            "seed": [0],
            "kind": ["step"],
            "step": [1],
            "epoch": [1],
            "probe": ["grad_norm"],
            "value": [1.0],
        }
    )
    run.write_cell(
        "a",
        1,
        pa.table(
            {
                "variant": ["a"],
                "seed": [5],
                "epoch": [1],
                "diverged_epoch": pa.array([None], pa.int32()),
                "loss": [1.0],
            }
        ),
        probes,
    )  # cell 1: probes + history
    # cell 2 was interrupted after its probes were written, before its history
    from ablab.store.io import atomic_write_parquet

    orphan = probes.add_column(0, "run_id", pa.array([run.run_id]))
    atomic_write_parquet(run.path / "probes" / "a" / "chunk-00002.parquet", orphan)
    assert query(tmp_path, "SELECT count(*) FROM probes")[1] == [(1,)]
    assert run.probes().num_rows == 1


def _current_umask() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("Umask:"):
            return int(line.split()[1], 8)
    raise AssertionError("no Umask line")  # Linux only, as CI is


def test_run_files_are_readable_per_the_umask(tmp_path: Path) -> None:
    """mkstemp's 0600 made a shared runs folder unreadable to the group (issue #16)."""
    import stat

    from ablab.store.io import atomic_write_json

    run = _fake_run(tmp_path, "shared", 2)
    atomic_write_bytes(run.path / "report.html", b"<html>")  # how the report is written
    atomic_write_json(run.path / "x.json", {})
    want = 0o666 & ~_current_umask()
    files = [p for p in run.path.rglob("*") if p.is_file() and p.name != ".lock"]
    assert {"study.json", "status.json", "summary.json", "report.html", "cells.sha256"} <= {
        p.name for p in files
    }
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in files} == {p.name: want for p in files}
    assert want & 0o044 or _current_umask() & 0o044  # readable by others unless the umask says


def test_a_damaged_cell_is_named_and_skipped_never_fatal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A cell whose bytes no longer match its recorded checksum -- a flipped byte reads as
    valid Parquet, a truncated file does not -- is skipped by every reader with a warning
    naming it; the other cells and runs still read and query (issue #16)."""
    import hashlib

    run = _fake_run(tmp_path, "hurt", 4)
    table = run.history().drop_columns(["run_id"])
    run.write_cell("a", 1, table.set_column(1, "seed", pa.array([10, 11, 12, 13])))
    other = _fake_run(tmp_path, "fine", 3)
    lines = (run.path / "cells.sha256").read_text().splitlines()
    for rel in ("cells/a/chunk-00000.parquet", "cells/a/chunk-00001.parquet"):
        digest = hashlib.sha256((run.path / rel).read_bytes()).hexdigest()
        assert f"{digest}  {rel}" in lines
    assert run.damaged_files() == {}

    cell = run.path / "cells/a/chunk-00001.parquet"
    data = bytearray(cell.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different bytes
    cell.write_bytes(bytes(data))
    first = RunDir(run.path)
    with caplog.at_level("WARNING", logger="ablab"):
        assert first.history().num_rows == 4  # chunk 0 only
    assert "cells/a/chunk-00001.parquet is damaged: checksum mismatch" in caplog.text
    assert first.done_cells() == {("a", 0)}  # so --resume re-trains chunk 1
    caplog.clear()
    with caplog.at_level("WARNING", logger="ablab"):  # a footer that reads is not enough
        _, rows = query(tmp_path, "SELECT run_id, count(*) FROM history GROUP BY 1 ORDER BY 2")
    assert rows == [(other.run_id, 3), (run.run_id, 4)]
    assert caplog.text.count("chunk-00001.parquet is damaged") == 1  # once, not per view

    cell.write_bytes(bytes(data[: len(data) // 2]))  # truncated: no footer
    caplog.clear()
    with caplog.at_level("WARNING", logger="ablab"):
        assert query(tmp_path, "SELECT count(*) FROM runs")[1] == [(2,)]
        _, rows = query(tmp_path, "SELECT run_id, count(*) FROM history GROUP BY 1 ORDER BY 2")
    assert rows == [(other.run_id, 3), (run.run_id, 4)]
    assert "chunk-00001.parquet is damaged" in caplog.text
    assert set(RunDir(run.path).damaged_files()) == {"cells/a/chunk-00001.parquet"}


def test_list_and_show_agree_on_cells_of_a_killed_run(tmp_path: Path) -> None:
    """The catalog's cells_done is written at start and end only; a killed run's list row
    said 0/N while `ablab show RUN` (status.json) said 10/N (issue #16)."""
    run = RunDir.create(tmp_path, "k", {"variants": {"a": {}}}, {}, 4)
    run.write_status("running", 3, 4)  # as each stored cell does
    with run.locked():  # create() took the lock; leaving releases it, as a kill would
        assert list_runs(tmp_path)[0]["state"] == "running"
    (row,) = list_runs(tmp_path)
    assert (row["state"], row["cells_done"], row["cells_total"]) == ("killed", 3, 4)


def test_an_unreadable_cell_is_damage_not_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Another user's 0600 cell (written by an older ablab) cannot be hashed: it is named
    as damaged, like any other, instead of escaping as a PermissionError."""
    from ablab.store import rundir

    run = _fake_run(tmp_path, "private", 2)

    def denied(path: Path) -> str:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(rundir, "sha256_file", denied)
    with caplog.at_level("WARNING", logger="ablab"):
        assert RunDir(run.path).history().num_rows == 0
    assert "is damaged: unreadable (PermissionError" in caplog.text
