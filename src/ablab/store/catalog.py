"""The DuckDB catalog across runs (table ``runs``) and SQL over every stored run (``runs``,
``history``, ``probes`` as views over the Parquet cells)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb

from ablab.errors import InputError

CATALOG = "catalog.duckdb"


_RUNS_DDL = """
CREATE TABLE IF NOT EXISTS runs (
    run_id VARCHAR PRIMARY KEY,
    name VARCHAR,
    source VARCHAR,
    created_at TIMESTAMP,
    finished_at TIMESTAMP,
    state VARCHAR,
    variants VARCHAR[],
    baseline VARCHAR,
    seeds INTEGER,
    cells_done INTEGER,
    cells_total INTEGER,
    wall_s DOUBLE,
    runs_per_s DOUBLE,
    run_dir VARCHAR
)
"""


@contextmanager
def catalog(runs_dir: Path, *, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
    """A connection to ``runs_dir``'s catalog, with the ``runs`` table ensured."""
    path = runs_dir / CATALOG
    if read_only and not path.exists():
        con = duckdb.connect(":memory:")
    else:
        runs_dir.mkdir(parents=True, exist_ok=True)
        con = duckdb.connect(str(path), read_only=read_only)
    try:
        if not read_only or not path.exists():
            con.execute(_RUNS_DDL)
        yield con
    finally:
        con.close()


def update_catalog(runs_dir: Path, sql: str, params: list[Any], tries: int = 40) -> bool:
    """Run one catalog write, retrying while another process (``ablab show`` / ``query``)
    holds DuckDB's file lock; gives up after ~10 s with a logged warning instead of failing
    the run -- each run's own status.json stays the source of truth."""
    for attempt in range(tries):
        try:
            with catalog(runs_dir) as con:
                con.execute(sql, params)
            return True
        except duckdb.IOException:
            time.sleep(min(0.05 * 2**attempt, 0.5))
    logging.getLogger("ablab").warning("catalog %s is locked; not updated", runs_dir / CATALOG)
    return False


def _intact(files: list[Path], runs: dict[Path, Any]) -> list[Path]:
    """``files`` without the damaged ones: each checked against its run's ``cells.sha256``
    (``RunDir.intact``: named once in a warning, with the repair), so one bad file never fails
    a query of the whole runs folder. ``runs``: the RunDir of each run folder, shared by the
    views of one query (each file is verified and reported once)."""
    from ablab.store.rundir import RunDir  # rundir writes the catalog: import it late

    by_run: dict[Path, list[Path]] = {}
    for f in files:
        by_run.setdefault(f.parents[2], []).append(f)
    good: list[Path] = []
    for folder, mine in by_run.items():
        run = runs.setdefault(folder, RunDir(folder))
        good += run.intact(mine)
    return sorted(good)


def _parquet_view(
    con: duckdb.DuckDBPyConnection,
    runs_dir: Path,
    name: str,
    folder: str,
    empty_columns: str,
    runs: dict[Path, Any],
) -> None:
    """A temp view ``name`` over every run's readable ``<folder>/*/chunk-*.parquet`` (empty
    if none).

    Probe files count only where their cell's history file exists (a run interrupted
    between the two writes leaves a probe file whose cell is not done).
    """
    files = sorted(runs_dir.glob(f"*/{folder}/*/chunk-*.parquet")) if runs_dir.is_dir() else []
    if folder != "cells":
        cells = {f.parent.parent.parent / "cells" / f.parent.name / f.name for f in files}
        done = set(_intact([c for c in cells if c.is_file()], runs))
        files = [
            f for f in files if f.parent.parent.parent / "cells" / f.parent.name / f.name in done
        ]
    files = _intact(files, runs)
    if not files:
        con.execute(f"CREATE TEMP TABLE {name} ({empty_columns})")
        return
    listed = ", ".join("'" + str(f.resolve()).replace("'", "''") + "'" for f in files)
    # hive_partitioning off: a sweep arm's folder (bn@batch_size=8) is not a key=value partition
    con.execute(
        f"CREATE TEMP VIEW {name} AS SELECT * FROM read_parquet([{listed}],"
        " union_by_name = true, hive_partitioning = false)"
    )


def query(runs_dir: Path, sql: str) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Run ``sql`` over every stored run.

    Tables: ``runs`` (the catalog), ``history`` (every history row of every run, columns of
    all runs unioned by name) and ``probes`` (variant, seed, kind, step, epoch, probe, value).
    """
    runs: dict[Path, Any] = {}
    with catalog(runs_dir, read_only=True) as con:
        _parquet_view(
            con,
            runs_dir,
            "history",
            "cells",
            "run_id VARCHAR, variant VARCHAR, seed BIGINT, epoch INTEGER,"
            " diverged_epoch INTEGER, loss DOUBLE, val_loss DOUBLE",
            runs,
        )
        _parquet_view(
            con,
            runs_dir,
            "probes",
            "probes",
            "run_id VARCHAR, variant VARCHAR, seed BIGINT, kind VARCHAR, step INTEGER,"
            " epoch INTEGER, probe VARCHAR, value DOUBLE",
            runs,
        )
        try:
            cur = con.execute(sql)
        except duckdb.Error as exc:
            raise InputError(
                where=str(runs_dir),
                key="SQL",
                expected="DuckDB SQL over the tables runs, history and probes",
                got=f"query failed: {exc}",
                fix='check the SQL; `ablab query "DESCRIBE history"` lists the columns',
            ) from exc
        if cur.description is None:
            return [], []
        cols = [d[0] for d in cur.description]
        return cols, cur.fetchall()
