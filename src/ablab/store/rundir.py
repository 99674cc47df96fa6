"""Run directories: Parquet cells and JSON metadata of one run, found by id (the catalog
across runs is ``ablab.store.catalog``).

Layout under a runs directory (default ``runs/``)::

    catalog.duckdb                      table `runs`: one row per run
    <run_id>/study.json                 resolved study + environment + cell plan (versioned)
    <run_id>/status.json                state, cells done / total (versioned)
    <run_id>/cells/<variant>/chunk-<k>.parquet   history rows of one cell
    <run_id>/probes/<variant>/chunk-<k>.parquet  probe rows of one cell (probed cells only)
    <run_id>/cells.sha256               SHA-256 of every cell file as written (sha256sum format;
                                        the last line for a file counts)
    <run_id>/summary.json               the run's JSON summary (when it ended)
    <run_id>/data/, <run_id>/models/    files a run was given (``ablab.ablate``: its arrays,
                                        model architectures); checksums in cells.sha256
    <run_id>/.lock                      held (flock) by the process running the run

A swept study's variants are its arms (``variant@axis=value``), so a cell file is one
(variant, sweep point, seed chunk). A cell is done when its history file exists and is
intact. Every file is written atomically (temp file in the same folder + ``os.replace``),
so an interrupted run leaves only whole files; its checksum is recorded right after. A file
damaged later (a disk, a copy, a hand) no longer matches its checksum: readers skip it with a
warning naming it, and ``ablab run --resume RUN`` re-trains it to the same bits.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ablab.errors import InputError
from ablab.store.catalog import catalog, update_catalog
from ablab.store.io import (
    FILE_MODE,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_parquet,
    sha256_file,
)

FORMAT_VERSION = 1
CHECKSUMS = "cells.sha256"
ATTACHED = ("data", "models")
"""Folders of a run folder holding the files the run was given (:meth:`RunDir.attach`)."""
RUN_ROOT = "<run>"
"""A stored study's ``root`` meaning "this run's folder": its relative paths (data, model
files) name files attached to the run, so it resumes wherever the folder is moved."""
_CHECKSUM_LINE = re.compile(r"([0-9a-f]{64})  (\S.*)")

log = logging.getLogger("ablab")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def new_run_id(name: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "study"
    return f"{_now():%Y%m%d-%H%M%S}-{slug}-{secrets.token_hex(2)}"


@dataclass
class RunDir:
    """One run's folder."""

    path: Path
    _lock_fd: int | None = field(default=None, repr=False, compare=False)
    _verified: dict[Path, tuple[tuple[int, int], str | None]] = field(
        default_factory=dict, repr=False, compare=False
    )

    @property
    def run_id(self) -> str:
        return self.path.name

    @property
    def runs_dir(self) -> Path:
        return self.path.parent

    def cell_path(self, variant: str, chunk: int) -> Path:
        return self.path / "cells" / variant / f"chunk-{chunk:05d}.parquet"

    def probe_path(self, variant: str, chunk: int) -> Path:
        return self.path / "probes" / variant / f"chunk-{chunk:05d}.parquet"

    def cell_files(self) -> list[Path]:
        """Every history file on disk, damaged or not (:meth:`intact` filters)."""
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
            update_catalog(
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
        """Take this run's lock (``flock`` on ``.lock``, our pid inside); InputError if a
        live process holds it."""
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise InputError(
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

    def done_cells(self, probed: Collection[tuple[str, int]] = ()) -> set[tuple[str, int]]:
        """(variant, chunk) of every cell whose history is stored and intact -- and, for the
        ``probed`` cells, whose probe file is too."""
        done = {(f.parent.name, int(f.stem.split("-")[1])) for f in self.intact(self.cell_files())}
        recorded = self.checksums()
        return {
            c for c in done if c not in probed or self.damage(self.probe_path(*c), recorded) is None
        }

    def reopen(self, cells_done: int, cells_total: int) -> None:
        """Mark a resumed run running again (status and catalog)."""
        self.write_status("running", cells_done, cells_total)
        update_catalog(
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
            path = self.probe_path(variant, chunk)
            self._record(path, atomic_write_parquet(path, probes.add_column(0, "run_id", run_col)))
        run_col = pa.array([self.run_id] * table.num_rows, pa.string())
        path = self.cell_path(variant, chunk)
        self._record(path, atomic_write_parquet(path, table.add_column(0, "run_id", run_col)))

    def _record(self, path: Path, digest: str) -> None:
        """Append ``path``'s checksum to cells.sha256 (one ``write`` of one line, synced)."""
        line = f"{digest}  {path.relative_to(self.path).as_posix()}\n"
        fd = os.open(self.path / CHECKSUMS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE)
        try:
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        self._verified.pop(path, None)

    def attach(self, source: Path) -> None:
        """Copy every file under ``source`` (in :data:`ATTACHED` folders) into this run folder
        at the same relative path, each written atomically and its SHA-256 recorded."""
        for f in sorted(p for p in source.rglob("*") if p.is_file()):
            rel = f.relative_to(source)
            if rel.parts[0] not in ATTACHED:
                raise ValueError(f"{rel} is not under one of {ATTACHED}")
            data = f.read_bytes()
            atomic_write_bytes(self.path / rel, data)
            self._record(self.path / rel, hashlib.sha256(data).hexdigest())

    def attachment_damage(self) -> dict[str, str]:
        """``relative path -> why`` for every attached file (:meth:`attach`) that is missing
        or no longer matches its recorded checksum; {} when all are intact."""
        out = {}
        for rel, expected in self.checksums().items():
            if rel.split("/", 1)[0] not in ATTACHED:
                continue
            try:
                actual = sha256_file(self.path / rel)
            except OSError as exc:
                out[rel] = f"unreadable ({type(exc).__name__})"
                continue
            if actual != expected:
                out[rel] = f"checksum mismatch (recorded {expected[:12]}…, now {actual[:12]}…)"
        return out

    # -- verifying -----------------------------------------------------------------------
    def checksums(self) -> dict[str, str]:
        """``relative path -> SHA-256`` as recorded (the last line for a path wins; a line
        cut short by a kill is ignored)."""
        try:
            text = (self.path / CHECKSUMS).read_text(errors="replace")
        except FileNotFoundError:
            return {}
        found = (_CHECKSUM_LINE.fullmatch(line) for line in text.splitlines())
        return {m.group(2): m.group(1) for m in found if m}

    def damage(self, path: Path, recorded: dict[str, str] | None = None) -> str | None:
        """Why the cell file ``path`` cannot be trusted, or None if it is intact: its bytes
        must match its recorded checksum; a file without one (written by an older ablab, or
        its writer killed right after the write) must at least read as whole Parquet."""
        try:
            st = path.stat()
        except FileNotFoundError:
            return "missing"
        stamp = (st.st_size, st.st_mtime_ns)
        cached = self._verified.get(path)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        if recorded is None:
            recorded = self.checksums()
        expected = recorded.get(path.relative_to(self.path).as_posix())
        reason: str | None = None
        if expected is not None:
            try:
                actual = sha256_file(path)
            except OSError as exc:  # e.g. another user's 0600 file from an older ablab
                actual = f"unreadable ({type(exc).__name__}: {exc})"
            if actual.startswith("unreadable"):
                reason = actual
            elif actual != expected:
                reason = f"checksum mismatch (recorded {expected[:12]}…, now {actual[:12]}…)"
        else:
            try:
                pq.read_table(path)
            except Exception as exc:  # any reader error: the file is not whole Parquet
                reason = f"unreadable, no checksum recorded ({type(exc).__name__}: {exc})"
        if reason is not None:
            log.warning(
                "%s: %s is damaged: %s; skipped -- `ablab run --resume %s` re-trains it",
                self.run_id,
                path.relative_to(self.path).as_posix(),
                reason,
                self.run_id,
            )
        self._verified[path] = (stamp, reason)
        return reason

    def intact(self, files: list[Path]) -> list[Path]:
        """``files`` without the damaged ones (each named once in a warning)."""
        recorded = self.checksums()
        return [f for f in files if self.damage(f, recorded) is None]

    def damaged_files(self) -> dict[str, str]:
        """``relative path -> why`` for every damaged cell or probe file of this run."""
        recorded = self.checksums()
        out = {}
        for f in (*self.cell_files(), *self.probe_files()):
            reason = self.damage(f, recorded)
            if reason is not None:
                out[f.relative_to(self.path).as_posix()] = reason
        return out

    def finish(
        self, state: str, cells_done: int, cells_total: int, summary: Mapping[str, Any] | None
    ) -> None:
        """Mark the run ended: summary first, then status (the source of truth), then the
        catalog (best effort: another process may hold its lock)."""
        if summary is not None:
            atomic_write_json(self.path / "summary.json", {"version": FORMAT_VERSION, **summary})
        self.write_status(state, cells_done, cells_total)
        update_catalog(
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
        files = self.intact(files)
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
        done = {(f.parent.name, f.name) for f in self.intact(self.cell_files())}
        return self.intact([f for f in self.probe_files() if (f.parent.name, f.name) in done])

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
    raise InputError(
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
    for row in rows:
        folder = Path(row["run_dir"]) if row["run_dir"] else None
        if folder is None or not folder.is_dir():
            continue
        try:  # each run's status.json is the source of truth (the catalog is best effort)
            status = RunDir(folder).read_json("status.json")
            row["state"], row["cells_done"] = status["state"], status["cells_done"]
        except (OSError, ValueError, KeyError):
            pass
        if row["state"] == "running":  # but no live process holds its lock: killed
            row["state"] = "running" if RunDir(folder).is_running() else "killed"
    return rows


DEFAULT_RUNS_DIR = "runs"


def default_runs_dir() -> Path:
    """``$ABLAB_RUNS_DIR`` if set, else ``./runs``."""
    return Path(os.environ.get("ABLAB_RUNS_DIR", DEFAULT_RUNS_DIR))
