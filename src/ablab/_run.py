"""Run a study: plan cells (variant x seed chunk), train them, store each as it finishes.

A swept study is first expanded into arms (``ablab._sweep``), so a cell is (variant, sweep
point, seed chunk). A killed or interrupted run is finished by :func:`resume`, which trains
only the cells whose history file is missing and then analyses the run from its store.

Everything that can be wrong with the input is checked before the run folder is
created: the study, the data, the split, and every variant's model (built,
compiled and shape-checked against the target). Each finished cell is written
atomically; Ctrl-C marks the run ``interrupted`` and keeps every finished cell.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import keras
import numpy as np
import pyarrow as pa

from ablab._checks import CheckResult, run_checks
from ablab._data import Dataset, load_dataset
from ablab._engine import (
    VariantProgram,
    choose_chunk_size,
    default_workers,
    seed_chunks,
    workers_within_budget,
)
from ablab._env import data_digest, environment, environment_fingerprint
from ablab._errors import RunInterrupted, StudyError
from ablab._executors import EXECUTORS, Cell, Executor, LocalExecutor
from ablab._explain import bn_diagnosis, optimum_gaps
from ablab._program import build_program
from ablab._records import (
    VariantHistory,
    epoch_probe_arrays,
    history_table,
    probe_table,
    variant_histories,
)
from ablab._remedies import with_remedies
from ablab._store import RunDir, resolve_run
from ablab._study import Study, VerdictSpec, load_study
from ablab._summary import summarize
from ablab._sweep import expand_sweep, sweep_effects
from ablab._verdict import RULE, Comparison, compare, paired_curve, resolve_metric

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from ablab._report import ReportData

DEFAULT_RUNS_DIR = "runs"


def default_runs_dir() -> Path:
    """``$ABLAB_RUNS_DIR`` if set, else ``./runs``."""
    return Path(os.environ.get("ABLAB_RUNS_DIR", DEFAULT_RUNS_DIR))


class Progress(Protocol):
    """What a run tells whoever is watching (the CLI's progress bars; tests)."""

    def variant_started(self, variant: str, chunks: int, chunk_size: int) -> None: ...
    def compiled(self, variant: str, seconds: float) -> None: ...
    def chunk_done(self, variant: str, chunk: int, seeds: int) -> None: ...

    # optional (see ablab._checks.CheckProgress): told about the checks after training


class _Silent:
    def variant_started(self, variant: str, chunks: int, chunk_size: int) -> None:
        pass

    def compiled(self, variant: str, seconds: float) -> None:
        pass

    def chunk_done(self, variant: str, chunk: int, seeds: int) -> None:
        pass

    def checks_started(self, total: int) -> None:
        pass

    def check_done(self, label: str) -> None:
        pass


@dataclass
class RunResult:
    """What a run produced. ``histories[variant].values[name]`` is (seeds, epochs)."""

    run_id: str
    run_dir: Path
    study: Study
    state: str
    wall_s: float
    runs_per_s: float
    summary: dict[str, dict[str, Any]]
    histories: dict[str, VariantHistory]
    comparisons: list[Comparison] = field(default_factory=list)
    checks: list[CheckResult] = field(default_factory=list)
    explain: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per variant: "optimum" (analytic baseline and gaps, or None), "bn" (diagnoses)."""
    compile_s: dict[str, float] = field(default_factory=dict)
    executor: dict[str, Any] = field(default_factory=dict)
    """Where the cells trained: ``{"name": "local", "workers": 2}`` or ``{"name": "ray"}``."""
    _report: Any = field(default=None, init=False, repr=False, compare=False)

    def report_data(self) -> ReportData:
        """The stored run's report data (figures, HTML), computed once from the run folder."""
        from ablab._report import ReportData

        if self._report is None:
            self._report = ReportData.from_run(RunDir(self.run_dir))
        return self._report

    def plot(self, kind: str | None = None) -> Figure:
        """A matplotlib Figure: by default the overview (headline metric per epoch, final
        distribution over seeds, forest plot of the paired differences); ``kind`` names one
        of the report's figures (``ablab._report.FIGURES``: curves, paired, distributions,
        forest, weights, bn, optimum, checks)."""
        return self.report_data().plot(kind)

    def write_report(self, path: str | Path | None = None) -> Path:
        """Write the self-contained HTML report (default ``<run_dir>/report.html``)."""
        from ablab._report import write_report

        return write_report(RunDir(self.run_dir), Path(path) if path is not None else None)

    def _repr_html_(self) -> str:
        from ablab._report import summary_html

        return summary_html(self.to_json())

    @property
    def history(self) -> pa.Table:
        """Every stored history row (variant, seed, epoch, ...) as an Arrow table."""
        return RunDir(self.run_dir).history()

    def curve(self, variant: str, metric: str | None = None) -> dict[str, np.ndarray]:
        """Per-epoch paired difference of ``variant`` vs the baseline with a 95 % bootstrap band
        (``{"epoch", "diff_mean", "ci_low", "ci_high"}``); metric defaults to the verdicts'."""
        spec = self.study.verdicts
        metric = metric or resolve_metric(spec, self.histories)
        # its own baseline: the [verdicts] pair (a sweep's: the baseline at the same point)
        base = next((b for v, b in spec.pairs if v == variant), str(self.study.baseline))
        return paired_curve(
            self.histories,
            variant,
            base,
            metric,
            np.random.default_rng(spec.random_seed),
            confidence=spec.confidence,
        )

    @property
    def probes(self) -> pa.Table:
        """Every stored probe row (variant, seed, kind, step, epoch, probe, value)."""
        return RunDir(self.run_dir).probes()

    def to_json(self) -> dict[str, Any]:
        """The ``ablab run --json`` document."""
        comparisons = [c.to_json() for c in self.comparisons]
        return {
            "run_id": self.run_id,
            "run_dir": str(self.run_dir),
            "name": self.study.name,
            "state": self.state,
            "wall_s": self.wall_s,
            "runs_per_s": self.runs_per_s,
            "executor": self.executor,
            "baseline": self.study.baseline,
            "variants": self.summary,
            "comparisons": comparisons,
            "verdict_rule": RULE,
            "checks": [c.to_json() for c in self.checks],
            "explain": self.explain,
            "sweep": sweep_effects(self.study.resolved(), comparisons),
        }


def declares_checks(study: Study) -> bool:
    """Does the study ask for any check (run by ``ablab run`` after training)?"""
    c = study.checks
    return bool(c.equivalent or c.identity_probe or c.backends)


@dataclass
class _Plan:
    """A run's programs and cells, validated before anything is written."""

    study: Study
    data: Dataset
    programs: dict[str, VariantProgram]
    """Per variant, the program with the study's probe setting (checks and explain use it)."""
    plain: dict[str, VariantProgram]
    """Per probed variant, a probe-free twin for its chunks beyond ``[probes] seeds``."""
    cells: list[Cell]
    chunk_sizes: dict[str, int]
    workers: int
    """Chunk calls the local executor runs at once (no effect on the numbers)."""

    def program_for(self, cell: Cell) -> VariantProgram:
        program = self.programs[cell.variant]
        return program if cell.probes == program.probes else self.plain[cell.variant]

    def to_json(self) -> dict[str, Any]:
        """What a resumed run needs to cut the same cells and compute the same bits (stored
        in study.json): the cells, and the numerics fingerprint and data digest."""
        return {
            "chunk_sizes": self.chunk_sizes,
            "cells_total": len(self.cells),
            "probed_chunks": {
                v: sum(c.probes for c in self.cells if c.variant == v) for v in self.programs
            },
            "fingerprint": environment_fingerprint(),
            "data": data_digest(self.data.x, self.data.y),
        }


def _history_names(study: Study) -> set[str]:
    names: set[str] = set()
    for variant in study.variants:
        train = study.variant_train(variant)
        mine = {"loss", *train.metric_names()}
        names |= mine
        if train.validation_split > 0:
            names |= {f"val_{n}" for n in mine}
    return names


def _validate_pairs(study: Study) -> None:
    names = _history_names(study)
    if study.verdicts.metric is not None and study.verdicts.metric not in names:
        raise StudyError(
            where=study.source,
            key="verdicts.metric",
            expected=f"a recorded history name, one of {sorted(names)}",
            got=repr(study.verdicts.metric),
            fix="name the loss or a metric listed in [train] metrics",
        )
    pairs = study.verdicts.pairs or [(v, str(study.baseline)) for v in study.variants]
    for variant, base in pairs:
        if variant == base:
            continue
        a, b = study.variant_train(variant), study.variant_train(base)
        if a.validation_split != b.validation_split:
            raise StudyError(
                where=study.source,
                key=f"variants.{variant}.train.validation_split",
                expected=f"the validation_split of {base!r} ({b.validation_split}), so that "
                "paired seeds are scored on the same rows",
                got=repr(a.validation_split),
                fix="override validation_split in [train] for every variant, not per variant",
            )


def _plan(
    study: Study, chunk_sizes: dict[str, int] | None = None, workers: int | None = None
) -> _Plan:
    """Validate everything and return the programs and the cells, without writing anything.

    chunk_sizes: the stored plan's (a resumed run cuts exactly the cells it started with);
    else each variant's from the memory budget (``choose_chunk_size``). A probed variant
    probes its first chunks covering ``[probes] seeds`` seeds; the rest run probe-free.
    workers: overrides ``[engine] workers`` (default: ``default_workers()``), then bounded so
    the cells in flight together fit the memory budget.
    """
    _validate_pairs(study)
    data = load_dataset(study)
    reference = study.engine.kind == "reference"
    programs: dict[str, VariantProgram] = {}
    plain: dict[str, VariantProgram] = {}
    cells: list[Cell] = []
    sizes: dict[str, int] = {}
    for variant in study.variants:
        program = build_program(study, variant, data, probes=False if reference else None)
        if chunk_sizes is not None:
            chunk = chunk_sizes[variant]
        else:
            chunk = choose_chunk_size(
                program, study.seeds.count, study.engine.memory_budget_mb, study.engine.chunk_size
            )
        programs[variant], sizes[variant] = program, chunk
        for k, ids, real in seed_chunks(study.seeds.base, study.seeds.count, chunk):
            probed = program.probes and k * chunk < study.probes.seeds
            cells.append(Cell(variant, k, ids, real, probed))
        if program.probes and any(c.variant == variant and not c.probes for c in cells):
            plain[variant] = VariantProgram(program.prepared, program.split, probes=False)
    if workers is not None and (workers < 1 or (reference and workers > 1)):
        raise StudyError(
            where=study.source,
            key="--workers",
            expected="a positive number of chunk calls at once; 1 with the reference engine "
            "(model.fit on one shared Keras model runs one cell at a time)",
            got=repr(workers),
            fix="drop --workers (default: one per CPU core; the reference engine runs one "
            "cell at a time)",
        )
    # [engine] workers of a study run with --engine reference: one at a time, no error (the
    # reference engine is the way out the compile error suggests for that very study).
    wanted = 1 if reference else (workers or study.engine.workers or default_workers())
    cell_bytes = [p.per_seed_bytes() * sizes[v] for v, p in programs.items()]
    workers = workers_within_budget(wanted, cell_bytes, study.engine.memory_budget_mb)
    return _Plan(study, data, programs, plain, cells, sizes, workers)


def _compile(study: Study, variant: str, program: VariantProgram, chunk_size: int) -> float:
    """Compile ``variant``'s program; a model the vectorized engine cannot trace is bad
    input, named by its layer, with the way out (``--engine reference``)."""
    filtering = keras.config.is_traceback_filtering_enabled()
    keras.config.disable_traceback_filtering()  # keep Keras' frames: they name the layer
    try:
        return program.compile(chunk_size)
    except Exception as exc:
        layer = program.culprit(exc)
        if layer is None:  # not the model's fault as far as we can tell: a real failure
            raise
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        raise StudyError(
            where=study.source,
            key=f"variants.{variant}",
            expected="layers the vectorized engine can run (JAX-traceable under vmap and scan)",
            got=f"layer {layer} failed: {type(exc).__name__}: {first_line}",
            fix='run this study with `--engine reference` ([engine] kind = "reference"): '
            "plain model.fit per seed, slower, same tables and verdicts",
        ) from exc
    finally:
        if filtering:
            keras.config.enable_traceback_filtering()


def reference_engine_checks_skipped(study: Study) -> CheckResult:
    """The checks compare the vectorized engine's trajectories; a reference-engine run (a
    model that engine may not run at all) reports them skipped, with the reason."""
    return CheckResult(
        "declared checks",
        "equivalence",
        None,
        None,
        None,
        None,
        study.checks.tolerance,
        "skipped: this run used the reference engine (model.fit per seed); the checks "
        "compare the vectorized engine's trajectories -- run `ablab check STUDY` if it can",
    )


def _prepare(study: Study | str | Path, seeds: int | None, remedies: bool) -> Study:
    if not isinstance(study, Study):
        study = load_study(study)
    if seeds is not None:
        study = study.with_seeds(count=seeds)
    if remedies:
        if study.sweep:
            raise StudyError(
                where=study.source,
                key="--remedies",
                expected="a study without [sweep] (remedies change batch size, epochs and BN "
                "momentum, which a sweep may be varying itself)",
                got=f"[sweep] over {', '.join(study.sweep)}",
                fix="sweep the remedy's setting instead, e.g. "
                '"BatchNormalization.momentum" = [0.5, 0.9, 0.99], or drop --remedies',
            )
        study = with_remedies(study)
    return expand_sweep(study)


def _compile_all(plan: _Plan, todo: list[Cell], progress: Progress) -> dict[str, float]:
    """Compile every program the cells in ``todo`` need (before anything is written on a new
    run: a model the engine cannot trace is bad input). Returns seconds per variant."""
    reference = plan.study.engine.kind == "reference"
    compile_s: dict[str, float] = {}
    for variant in plan.programs:
        mine = [c for c in todo if c.variant == variant]
        if not mine:
            continue
        progress.variant_started(variant, len(mine), plan.chunk_sizes[variant])
        if not reference:
            needed = {id(plan.program_for(c)): plan.program_for(c) for c in mine}
            compile_s[variant] = sum(
                _compile(plan.study, variant, p, plan.chunk_sizes[variant]) for p in needed.values()
            )
        progress.compiled(variant, compile_s.get(variant, 0.0))
    return compile_s


def _executor(plan: _Plan, name: str | Executor, address: str | None) -> Executor:
    reference = plan.study.engine.kind == "reference"
    if not isinstance(name, str):
        return name
    if name == "local":
        return LocalExecutor(plan.program_for, reference=reference, workers=plan.workers)
    if name == "ray":
        from ablab._ray import RayExecutor

        return RayExecutor(plan.study, plan.data, address=address, reference=reference)
    raise StudyError(
        where="executor",
        key="--executor",
        expected=f"one of {list(EXECUTORS)}",
        got=repr(name),
        fix="use --executor local or --executor ray",
    )


def run(
    study: Study | str | Path,
    *,
    seeds: int | None = None,
    runs_dir: str | Path | None = None,
    remedies: bool = False,
    progress: Progress | None = None,
    on_cell: Callable[[int, int], None] | None = None,
    executor: str | Executor = "local",
    address: str | None = None,
    workers: int | None = None,
) -> RunResult:
    """Train every variant (every sweep arm) of ``study`` over its seeds; store the results.

    study: a :class:`Study` or the path of a study TOML file. seeds: overrides
    ``[seeds] count``. remedies: add the BatchNormalization remedy variants
    (``ablab._remedies``). runs_dir: where the run folder goes (default ``./runs`` or
    ``$ABLAB_RUNS_DIR``). on_cell(done, total) is called after each stored cell.
    executor: "local" (this process), "ray" (a Ray cluster at ``address``; default
    ``ray.init()``'s) or an :class:`~ablab._executors.Executor`. workers: chunk calls the
    local executor runs at once (overrides ``[engine] workers``; results do not change).
    Raises StudyError (nothing written) on bad input, RunInterrupted on Ctrl-C; a killed or
    interrupted run is finished with :func:`resume`.
    """
    study = _prepare(study, seeds, remedies)
    progress = progress or _Silent()
    runs_root = Path(runs_dir) if runs_dir is not None else default_runs_dir()
    t0 = time.perf_counter()
    plan = _plan(study, workers=workers)
    compile_s = _compile_all(plan, plan.cells, progress)
    chosen = _executor(plan, executor, address)  # a Ray cluster that is not there: nothing written
    try:
        run_dir = RunDir.create(  # locked from before anything is visible
            runs_root, study.name, study.resolved(), environment(), len(plan.cells), plan.to_json()
        )
    except BaseException:
        chosen.close()
        raise
    with run_dir.locked():
        return _execute(plan, run_dir, plan.cells, chosen, progress, on_cell, t0, compile_s)


def resume(
    run_ref: str | Path | RunDir,
    *,
    runs_dir: str | Path | None = None,
    progress: Progress | None = None,
    on_cell: Callable[[int, int], None] | None = None,
    executor: str | Executor = "local",
    address: str | None = None,
    workers: int | None = None,
) -> RunResult:
    """Finish a killed, interrupted or failed run: train only its missing cells (the same
    cells, chunk sizes and seeds it planned), then analyse it as a whole. The result is
    bit-identical to an uninterrupted run of the same study and seeds.

    run_ref: a run folder, a run id (or unique prefix) in ``runs_dir``, or ``latest``.
    Raises StudyError (exit 2) for a complete run, a run still running in another
    process, or a run folder this version cannot resume.
    """
    if isinstance(run_ref, RunDir):
        run_dir = run_ref
    else:
        root = Path(runs_dir) if runs_dir is not None else default_runs_dir()
        run_dir = resolve_run(root, str(run_ref))
    progress = progress or _Silent()
    with run_dir.locked():
        return _resume_locked(run_dir, progress, on_cell, executor, address, workers)


def _resume_locked(
    run_dir: RunDir,
    progress: Progress,
    on_cell: Callable[[int, int], None] | None,
    executor: str | Executor,
    address: str | None,
    workers: int | None,
) -> RunResult:
    meta = run_dir.read_json("study.json")
    status = run_dir.read_json("status.json")  # read under the lock: final
    where = str(run_dir.path)
    if status["state"] == "complete":
        raise StudyError(
            where=where,
            key="--resume",
            expected="a run that did not finish (killed, interrupted or failed)",
            got="a complete run",
            fix=f"nothing to resume; see it with `ablab show {run_dir.run_id}`",
        )
    stored_plan = meta.get("plan")
    if not stored_plan:
        raise StudyError(
            where=where,
            key="study.json plan",
            expected="a run stored by an ablab that records its cell plan",
            got="no plan (an older run)",
            fix="run the study again",
        )
    try:
        study = Study.model_validate(meta["study"])
    except Exception as exc:
        raise StudyError(
            where=where,
            key="study.json",
            expected="the stored study, loadable by this ablab version",
            got=f"{type(exc).__name__}: {str(exc).splitlines()[0]}",
            fix="resume with the ablab version that started the run, or run the study again",
        ) from exc
    if isinstance(study.model.builder, str) and study.model.builder.startswith("<callable"):
        raise StudyError(
            where=where,
            key="model.builder",
            expected="a builder named by file or module (a stored run can rebuild it)",
            got=study.model.builder,
            fix="give the builder as 'file.py:function' or 'module:function' to resume",
        )
    t0 = time.perf_counter()
    plan = _plan(study, stored_plan["chunk_sizes"], workers)
    _check_same_plan(where, stored_plan, plan.to_json())
    run_dir.clean_partial_writes()
    done = run_dir.done_cells()
    todo = [c for c in plan.cells if c.key not in done]
    compile_s = _compile_all(plan, todo, progress)
    chosen = _executor(plan, executor, address)
    try:
        run_dir.reopen(len(plan.cells) - len(todo), len(plan.cells))
    except BaseException:
        chosen.close()
        raise
    return _execute(plan, run_dir, todo, chosen, progress, on_cell, t0, compile_s)


def _check_same_plan(where: str, stored: dict[str, Any], now: dict[str, Any]) -> None:
    """A resumed run must cut the same cells and compute the same bits as the run it
    finishes: same cells, same data, same versions / source / numerics settings."""
    diffs = [
        f"{k}: stored {stored.get(k)!r}, now {now.get(k)!r}"
        for k in ("chunk_sizes", "cells_total", "probed_chunks", "data")
        if stored.get(k) != now.get(k)
    ]
    old_fp, new_fp = stored.get("fingerprint") or {}, now["fingerprint"]
    diffs += [
        f"{k}: stored {old_fp.get(k)!r}, now {new_fp.get(k)!r}"
        for k in sorted(set(old_fp) | set(new_fp))
        if old_fp.get(k) != new_fp.get(k)
    ]
    if diffs:
        raise StudyError(
            where=where,
            key="--resume",
            expected="the software, settings and data the run started with (its cells must "
            "be bit-identical to an uninterrupted run's)",
            got="; ".join(diffs),
            fix="resume in the environment that started the run (same versions, ablab code, "
            "XLA flags and data), or run the study again",
        )


def _execute(
    plan: _Plan,
    run_dir: RunDir,
    todo: list[Cell],
    executor: Executor,
    progress: Progress,
    on_cell: Callable[[int, int], None] | None,
    t0: float,
    compile_s: dict[str, float],
) -> RunResult:
    """Train ``todo`` with ``executor``, storing each cell as it arrives, then analyse the
    whole run from its stored cells (the same path whether it ran in one go or resumed)."""
    total = len(plan.cells)
    done = total - len(todo)
    try:
        try:
            for cell, (out, step_p, epoch_p) in executor.run_cells(todo):
                program = plan.program_for(cell)
                seed_ids = cell.seed_ids[: cell.real].astype(np.int64)
                values = {k: v[: cell.real] for k, v in out.items()}
                probes = None
                if step_p is not None and epoch_p is not None:
                    step_p = {k: v[: cell.real] for k, v in step_p.items()}
                    epoch_p = {k: v[: cell.real] for k, v in epoch_p.items()}
                    probes = probe_table(
                        cell.variant, seed_ids, step_p, epoch_p, program.layout.steps_per_epoch
                    )
                run_dir.write_cell(
                    cell.variant, cell.chunk, history_table(cell.variant, seed_ids, values), probes
                )
                done += 1
                run_dir.write_status("running", done, total)
                progress.chunk_done(cell.variant, cell.chunk, cell.real)
                if on_cell is not None:
                    on_cell(done, total)
        finally:
            executor.close()
        wall = time.perf_counter() - t0
        trained = sum(c.real for c in todo)
        result = _analyse(plan, run_dir, progress, wall, trained / wall, compile_s)
        result.executor = {"name": executor.name}
        if isinstance(executor, LocalExecutor):
            result.executor["workers"] = executor.workers
        run_dir.finish("complete", done, total, result.to_json())
    except KeyboardInterrupt as exc:  # during training, checks or analysis
        run_dir.finish("interrupted", done, total, None)
        raise RunInterrupted(str(run_dir.path), done, total) from exc
    except BaseException:
        run_dir.finish("failed", done, total, None)
        raise
    return result


def _analyse(
    plan: _Plan,
    run_dir: RunDir,
    progress: Progress,
    wall: float,
    runs_per_s: float,
    compile_s: dict[str, float],
) -> RunResult:
    """Verdicts, checks and explanations of a run whose cells are all stored -- computed
    from the store, so a resumed run and an uninterrupted one give identical documents."""
    study = plan.study
    histories = stored_histories(run_dir, list(plan.programs))
    epoch_probes = epoch_probe_arrays(run_dir.probes("epoch"))
    reference = study.engine.kind == "reference"
    checks: list[CheckResult] = []
    if declares_checks(study) and reference:
        checks = [reference_engine_checks_skipped(study)]
    elif declares_checks(study):
        checks = run_checks(study, plan.programs, progress=progress)
    explain = {}
    for v, program in plan.programs.items():
        epoch_p = epoch_probes.get(v)
        explain[v] = {
            "optimum": optimum_gaps(program, histories[v].values, epoch_p),
            "bn": bn_diagnosis(program, histories[v].values, epoch_p),
            "probes": epoch_p is not None,
        }
    return RunResult(
        run_id=run_dir.run_id,
        run_dir=run_dir.path,
        study=study,
        state="complete",
        wall_s=wall,
        runs_per_s=runs_per_s,
        summary=summarize(histories),
        histories=histories,
        comparisons=compare(histories, str(study.baseline), study.verdicts),
        checks=checks,
        explain=explain,
        compile_s=compile_s,
    )


def stored_histories(run_dir: RunDir, variants: list[str]) -> dict[str, VariantHistory]:
    """The stored histories of ``variants`` (each must have a finished cell), read one variant
    at a time so the peak memory follows one arm, not the whole run."""
    return {v: variant_histories(run_dir.history(v, run_id=False))[v] for v in variants}


def load_run(run_dir: RunDir) -> tuple[dict[str, Any], dict[str, VariantHistory]]:
    """A stored run as ``ablab show RUN`` sees it: the document (metadata, state, a summary and
    comparisons recomputed from the finished cells) and the histories, in study order."""
    meta = run_dir.read_json("study.json")
    status = run_dir.read_json("status.json")
    if status["state"] == "running" and not run_dir.is_running():
        status = {**status, "state": "killed"}  # marked running, but its process is gone
    present = list(dict.fromkeys(f.parent.name for f in run_dir.cell_files()))
    declared = list(meta["study"].get("variants", {}))
    order = [v for v in declared if v in present] + [v for v in present if v not in declared]
    histories = stored_histories(run_dir, order)
    saved = run_dir.read_json("summary.json") if (run_dir.path / "summary.json").exists() else {}
    meta = {**meta, "run_id": run_dir.run_id, "run_dir": str(run_dir.path)}
    return run_document(meta, status, saved, histories), histories


def run_document(
    meta: dict[str, Any],
    status: dict[str, Any],
    saved: dict[str, Any],
    histories: dict[str, VariantHistory],
) -> dict[str, Any]:
    """The document of a run from its parts: ``meta`` (study.json plus run_id / run_dir),
    ``status`` (status.json), ``saved`` (summary.json, {} if the run never finished) and the
    histories of its finished cells; summary and comparisons are recomputed from these."""
    baseline = meta["study"].get("baseline")
    spec = VerdictSpec.model_validate(meta["study"].get("verdicts") or {})
    comparable = spec.pairs or baseline in histories  # a sweep's pairs: any finished point
    comparisons = compare(histories, baseline, spec) if comparable and len(histories) > 1 else []
    comparison_docs = [c.to_json() for c in comparisons]
    return {
        "run_id": meta["run_id"],
        "run_dir": meta["run_dir"],
        "name": meta["study"].get("name"),
        "description": meta["study"].get("description"),
        "created_at": meta.get("created_at"),
        "state": status["state"],
        "cells_done": status["cells_done"],
        "cells_total": status["cells_total"],
        "wall_s": saved.get("wall_s"),
        "runs_per_s": saved.get("runs_per_s"),
        "executor": saved.get("executor"),
        "baseline": baseline,
        "environment": meta["environment"],
        "study": meta["study"],
        "variants": summarize(histories),
        "comparisons": comparison_docs,
        "verdict_rule": RULE,
        "checks": saved.get("checks", []),
        "explain": saved.get("explain", {}),
        "sweep": sweep_effects(meta["study"], comparison_docs),
        "analysed": bool(saved),  # checks and explain exist only for a run that finished
        "resumable": status["state"] in ("interrupted", "failed", "killed"),
    }


def load_result(run_dir: RunDir) -> dict[str, Any]:
    """What ``ablab show RUN`` shows: metadata, state and a summary recomputed from the cells."""
    return load_run(run_dir)[0]
