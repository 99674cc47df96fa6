"""Run directories (Parquet cells, JSON metadata) and the DuckDB catalog across runs.

Layout under a runs directory (default ``runs/``)::

    catalog.duckdb                      table `runs`: one row per run
    <run_id>/study.json                 resolved study + environment + cell plan (versioned)
    <run_id>/status.json                state, cells done / total (versioned)
    <run_id>/cells/<variant>/chunk-<k>.parquet   history rows of one cell
    <run_id>/probes/<variant>/chunk-<k>.parquet  probe rows of one cell (probed cells only)
    <run_id>/summary.json               the run's JSON summary (when it ended)
    <run_id>/.lock                      held (flock) by the process running the run

A swept study's variants are its arms (``variant@axis=value``), so a cell file is one
(variant, sweep point, seed chunk). A cell is done when its history file exists.
Every file is written atomically (temp file in the same folder + ``os.replace``),
so an interrupted run leaves only whole files: each finished cell is readable.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import logging
import math
import os
import re
import secrets
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ablab._errors import StudyError

FORMAT_VERSION = 1
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


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def jsonable(obj: Any) -> Any:
    """``obj`` with numpy scalars made Python, non-finite floats made null, dates and paths
    made strings -- so the result is strict JSON (``allow_nan=False``)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, bool | np.bool_):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, dt.datetime | dt.date):
        return obj.isoformat()
    if isinstance(obj, Path):
        return str(obj)
    return obj


def dumps(obj: Any) -> str:
    """Strict JSON text of ``obj`` (see :func:`jsonable`)."""
    return json.dumps(jsonable(obj), indent=2, allow_nan=False)


def atomic_write_json(path: Path, obj: dict[str, Any]) -> None:
    atomic_write_bytes(path, (dumps(obj) + "\n").encode())


def atomic_write_parquet(path: Path, table: pa.Table) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def new_run_id(name: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "study"
    return f"{_now():%Y%m%d-%H%M%S}-{slug}-{secrets.token_hex(2)}"


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


def _update_catalog(runs_dir: Path, sql: str, params: list[Any], tries: int = 40) -> bool:
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


@dataclass
class RunDir:
    """One run's folder."""

    path: Path
    _lock_fd: int | None = field(default=None, repr=False, compare=False)

    @property
    def run_id(self) -> str:
        return self.path.name

    @property
    def runs_dir(self) -> Path:
        return self.path.parent

    def cell_path(self, variant: str, chunk: int) -> Path:
        return self.path / "cells" / variant / f"chunk-{chunk:05d}.parquet"

    def cell_files(self) -> list[Path]:
        return sorted((self.path / "cells").glob("*/chunk-*.parquet"))

    def probe_files(self) -> list[Path]:
        return sorted((self.path / "probes").glob("*/chunk-*.parquet"))

    # -- writing -------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        runs_dir: Path,
        name: str,
        study: dict[str, Any],
        environment: dict[str, Any],
        cells_total: int,
        plan: dict[str, Any] | None = None,
    ) -> RunDir:
        run_id = new_run_id(name)
        run = cls(runs_dir / run_id)
        run.path.mkdir(parents=True)
        run._lock_fd = run._acquire()  # held before anything shows the run as running
        try:
            created = _now()
            atomic_write_json(
                run.path / "study.json",
                {
                    "version": FORMAT_VERSION,
                    "run_id": run_id,
                    "created_at": created.isoformat(),
                    "study": study,
                    "environment": environment,
                    "plan": plan,
                },
            )
            run.write_status("running", 0, cells_total)
            _update_catalog(
                runs_dir,
                "INSERT INTO runs (run_id, name, source, created_at, state, variants, baseline,"
                " seeds, cells_done, cells_total, run_dir)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    run_id,
                    name,
                    study.get("source"),
                    created,
                    "running",
                    list(study.get("variants", {})),
                    study.get("baseline"),
                    study.get("seeds", {}).get("count"),
                    0,
                    cells_total,
                    str(run.path.resolve()),
                ],
            )
        except BaseException:
            os.close(run._lock_fd)  # closing releases the flock
            run._lock_fd = None
            raise
        return run

    def _acquire(self) -> int:
        """Take this run's lock (``flock`` on ``.lock``, our pid inside); StudyError if a
        live process holds it."""
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise StudyError(
                where=str(self.path),
                key="RUN",
                expected="a run no other process is running",
                got=f"locked by process {holder}",
                fix="wait for it to end (or stop it) before resuming",
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        return fd

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold this run's lock while running or resuming it (taken here unless
        :meth:`create` took it already), released at the end. The kernel drops the lock when
        the process dies, even by ``kill -9``, so a killed run is resumable at once while a
        running one cannot be resumed twice."""
        if self._lock_fd is None:
            self._lock_fd = self._acquire()
        try:
            yield
        finally:
            fd, self._lock_fd = self._lock_fd, None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def is_running(self) -> bool:
        """Does a live process hold this run's lock (a run marked "running" whose process
        was killed does not)?"""
        path = self.path / ".lock"
        if not path.exists():
            return False
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # closing drops a lock we got
        return False

    def clean_partial_writes(self) -> None:
        """Remove the temp files a killed writer left behind (never whole cells)."""
        for folder in ("cells", "probes"):
            for tmp in (self.path / folder).glob("*/.*.tmp"):
                tmp.unlink(missing_ok=True)
        for tmp in self.path.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)

    def done_cells(self) -> set[tuple[str, int]]:
        """(variant, chunk) of every cell whose history is stored."""
        return {(f.parent.name, int(f.stem.split("-")[1])) for f in self.cell_files()}

    def reopen(self, cells_done: int, cells_total: int) -> None:
        """Mark a resumed run running again (status and catalog)."""
        self.write_status("running", cells_done, cells_total)
        _update_catalog(
            self.runs_dir,
            "UPDATE runs SET state = ?, finished_at = NULL, cells_done = ? WHERE run_id = ?",
            ["running", cells_done, self.run_id],
        )

    def write_status(self, state: str, cells_done: int, cells_total: int) -> None:
        atomic_write_json(
            self.path / "status.json",
            {
                "version": FORMAT_VERSION,
                "state": state,
                "cells_done": cells_done,
                "cells_total": cells_total,
                "updated_at": _now().isoformat(),
            },
        )

    def write_cell(
        self, variant: str, chunk: int, table: pa.Table, probes: pa.Table | None = None
    ) -> None:
        """Store one cell: its probes first, then its history (whose file marks it done)."""
        if probes is not None:
            run_col = pa.array([self.run_id] * probes.num_rows, pa.string())
            atomic_write_parquet(
                self.path / "probes" / variant / f"chunk-{chunk:05d}.parquet",
                probes.add_column(0, "run_id", run_col),
            )
        run_col = pa.array([self.run_id] * table.num_rows, pa.string())
        atomic_write_parquet(self.cell_path(variant, chunk), table.add_column(0, "run_id", run_col))

    def finish(
        self, state: str, cells_done: int, cells_total: int, summary: dict[str, Any] | None
    ) -> None:
        """Mark the run ended: summary first, then status (the source of truth), then the
        catalog (best effort: another process may hold its lock)."""
        if summary is not None:
            atomic_write_json(self.path / "summary.json", {"version": FORMAT_VERSION, **summary})
        self.write_status(state, cells_done, cells_total)
        _update_catalog(
            self.runs_dir,
            "UPDATE runs SET state = ?, finished_at = ?, cells_done = ?, wall_s = ?,"
            " runs_per_s = ? WHERE run_id = ?",
            [
                state,
                _now(),
                cells_done,
                (summary or {}).get("wall_s"),
                (summary or {}).get("runs_per_s"),
                self.run_id,
            ],
        )

    # -- reading -------------------------------------------------------------------------
    def read_json(self, name: str) -> dict[str, Any]:
        return json.loads((self.path / name).read_text())

    def history(self, variant: str | None = None, *, run_id: bool = True) -> pa.Table:
        """Every stored history row of this run (all finished cells), or of one variant's;
        ``run_id=False`` is the analysis' compact form: no run_id column (one repeated string
        per row: 8 million of them for 100,000 seeds x 4 variants x 20 epochs) and the
        variant column dictionary-encoded."""
        files = self.cell_files()
        if variant is not None:
            files = [f for f in files if f.parent.name == variant]
        if not files:
            return pa.table({})
        tables = []
        for f in files:
            if run_id:
                tables.append(pq.read_table(f))
                continue
            # the analysis' compact form: no run_id, variant dictionary-encoded
            names = [c for c in pq.ParquetFile(f).schema_arrow.names if c != "run_id"]
            tables.append(pq.read_table(f, columns=names, read_dictionary=["variant"]))
        return pa.concat_tables(tables, promote_options="default")

    def done_probe_files(self) -> list[Path]:
        """Probe files of the cells whose history is stored (a run interrupted between the
        two writes leaves a probe file whose cell is not done)."""
        done = {(f.parent.name, f.name) for f in self.cell_files()}
        return [f for f in self.probe_files() if (f.parent.name, f.name) in done]

    def probes(self, kind: str | None = None) -> pa.Table:
        """Every stored probe row of this run (cells whose history is stored); ``kind``
        ("step" / "epoch") reads only those rows, without the run_id column."""
        files = self.done_probe_files()
        if not files:
            return pa.table({})
        if kind is None:
            return pa.concat_tables([pq.read_table(f) for f in files])
        columns = ["variant", "seed", "kind", "step", "epoch", "probe", "value"]
        return pa.concat_tables(
            [
                pq.read_table(
                    f,
                    columns=columns,
                    filters=[("kind", "=", kind)],
                    read_dictionary=["variant", "kind", "probe"],
                )
                for f in files
            ]
        )


def resolve_run(runs_dir: Path, ref: str) -> RunDir:
    """A run by path, id, unique id prefix, or ``latest``."""
    as_path = Path(ref)
    if (as_path / "study.json").is_file():
        return RunDir(as_path)
    runs = sorted(p for p in runs_dir.glob("*/study.json")) if runs_dir.is_dir() else []
    ids = [p.parent.name for p in runs]
    if ref == "latest" and ids:
        return RunDir(runs_dir / max(ids))
    matches = [i for i in ids if i == ref] or [i for i in ids if i.startswith(ref)]
    if len(matches) == 1:
        return RunDir(runs_dir / matches[0])
    raise StudyError(
        where=str(runs_dir),
        key="RUN",
        expected="a run directory, a run id or a unique prefix of one, or 'latest'",
        got=f"{ref!r} ({'ambiguous: ' + ', '.join(matches) if matches else 'no such run'})",
        fix="list runs with `ablab show`",
    )


def list_runs(runs_dir: Path) -> list[dict[str, Any]]:
    """Rows of the catalog's ``runs`` table, newest first."""
    with catalog(runs_dir, read_only=True) as con:
        cur = con.execute("SELECT * FROM runs ORDER BY created_at DESC")
        cols = [d[0] for d in cur.description]
        rows = [dict(zip(cols, row, strict=True)) for row in cur.fetchall()]
    for row in rows:  # marked running, but no live process holds its lock: killed
        folder = Path(row["run_dir"]) if row["run_dir"] else None
        if row["state"] == "running" and folder is not None and folder.is_dir():
            row["state"] = "running" if RunDir(folder).is_running() else "killed"
    return rows


def _parquet_view(
    con: duckdb.DuckDBPyConnection, runs_dir: Path, name: str, folder: str, empty_columns: str
) -> None:
    """A temp view ``name`` over every run's ``<folder>/*/chunk-*.parquet`` (empty if none).

    Probe files count only where their cell's history file exists (a run interrupted
    between the two writes leaves a probe file whose cell is not done).
    """
    pattern = f"*/{folder}/*/chunk-*.parquet"
    if not (runs_dir.is_dir() and any(runs_dir.glob(pattern))):
        con.execute(f"CREATE TEMP TABLE {name} ({empty_columns})")
        return
    root = str(runs_dir.resolve()).replace("'", "''")
    # hive_partitioning off: a sweep arm's folder (bn@batch_size=8) is not a key=value partition
    source = (
        f"read_parquet('{root}/{pattern}', union_by_name = true, filename = true,"
        " hive_partitioning = false)"
    )
    where = ""
    if folder != "cells":
        where = (
            f" WHERE replace(filename, '/{folder}/', '/cells/') IN "
            f"(SELECT file FROM glob('{root}/*/cells/*/chunk-*.parquet'))"
        )
    con.execute(f"CREATE TEMP VIEW {name} AS SELECT * EXCLUDE (filename) FROM {source}{where}")


def query(runs_dir: Path, sql: str) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Run ``sql`` over every stored run.

    Tables: ``runs`` (the catalog), ``history`` (every history row of every run, columns of
    all runs unioned by name) and ``probes`` (variant, seed, kind, step, epoch, probe, value).
    """
    with catalog(runs_dir, read_only=True) as con:
        _parquet_view(
            con,
            runs_dir,
            "history",
            "cells",
            "run_id VARCHAR, variant VARCHAR, seed BIGINT, epoch INTEGER,"
            " diverged_epoch INTEGER, loss DOUBLE, val_loss DOUBLE",
        )
        _parquet_view(
            con,
            runs_dir,
            "probes",
            "probes",
            "run_id VARCHAR, variant VARCHAR, seed BIGINT, kind VARCHAR, step INTEGER,"
            " epoch INTEGER, probe VARCHAR, value DOUBLE",
        )
        try:
            cur = con.execute(sql)
        except duckdb.Error as exc:
            raise StudyError(
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
