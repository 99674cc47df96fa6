"""Run a study: plan cells (variant x seed chunk), train them, store each as it finishes.

A swept study is first expanded into arms (``ablab.study.sweep``), so a cell is (variant, sweep
point, seed chunk). A killed or interrupted run is finished by :func:`resume`, which trains
only the cells whose history file is missing and then analyses the run from its store.

Everything that can be wrong with the input is checked before the run folder is
created: the study, the data, the split, and every variant's model (built,
compiled and shape-checked against the target). Each finished cell is written
atomically; Ctrl-C marks the run ``interrupted`` and keeps every finished cell.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ablab.analysis.checks import CheckResult, equivalence_jobs, run_checks
from ablab.analysis.document import stored_histories
from ablab.analysis.explain import bn_diagnosis, optimum_gaps
from ablab.engine.compiling import Prefetch
from ablab.engine.sizing import default_workers
from ablab.errors import InputError, RunInterrupted
from ablab.execution.env import environment
from ablab.execution.executors import EXECUTORS, Cell, Executor, LocalExecutor
from ablab.execution.plan import (
    Plan,
    check_same_plan,
    compile_all,
    declares_checks,
    make_plan,
    prepare_study,
    reference_engine_checks_skipped,
)
from ablab.execution.progress import Progress, Silent
from ablab.execution.result import RunResult
from ablab.stats.summary import summarize
from ablab.stats.verdicts import compare
from ablab.store.records import (
    epoch_probe_arrays,
    history_table,
    probe_table,
)
from ablab.store.rundir import RUN_ROOT, RunDir, default_runs_dir, resolve_run
from ablab.study.schema import Study


def _executor(plan: Plan, name: str | Executor, address: str | None) -> Executor:
    reference = plan.study.engine.kind == "reference"
    if not isinstance(name, str):
        return name
    if name == "local":
        return LocalExecutor(plan.program_for, reference=reference, workers=plan.workers)
    if name == "ray":
        from ablab.execution.ray_executor import RayExecutor

        return RayExecutor(plan.study, plan.data, address=address, reference=reference)
    raise InputError(
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
    started: float | None = None,
    attachments: Path | None = None,
) -> RunResult:
    """Train every variant (every sweep arm) of ``study`` over its seeds; store the results.

    study: a :class:`Study` or the path of a study TOML file. seeds: overrides
    ``[seeds] count``. remedies: add the BatchNormalization remedy variants
    (``ablab.study.remedies``). runs_dir: where the run folder goes (default ``./runs`` or
    ``$ABLAB_RUNS_DIR``). on_cell(done, total) is called after each stored cell.
    executor: "local" (this process), "ray" (a Ray cluster at ``address``; default
    ``ray.init()``'s) or an :class:`~ablab.execution.executors.Executor`. workers: chunk calls the
    local executor runs at once (overrides ``[engine] workers``; results do not change).
    started: ``time.perf_counter()`` when the user's command began (the CLI's start), from
    which ``wall_s`` counts; default: this call.
    attachments: a folder (``ablab.ablate``'s) of ``data/`` and ``models/`` files that the
    study's relative paths name (it is the study's root): copied into the run folder, their
    checksums recorded, and the study stored with ``root = "<run>"`` (``RUN_ROOT``), so a
    resume, ``show`` and ``report`` read them from the run folder.
    Raises StudyError / InputError (nothing written) on bad input, RunInterrupted on Ctrl-C;
    a killed or interrupted run is finished with :func:`resume`.
    """
    t0 = time.perf_counter() if started is None else started
    study = prepare_study(study, seeds, remedies)
    progress = progress or Silent()
    runs_root = Path(runs_dir) if runs_dir is not None else default_runs_dir()
    plan = make_plan(study, workers=workers)
    tc = time.perf_counter()
    compile_s = compile_all(plan, plan.cells, progress)
    compile_wall = time.perf_counter() - tc
    chosen = _executor(plan, executor, address)  # a Ray cluster that is not there: nothing written
    stored = study.resolved()
    if attachments is not None:
        stored["root"] = RUN_ROOT
    try:
        run_dir = RunDir.create(  # locked from before anything is visible
            runs_root, study.name, stored, environment(), len(plan.cells), plan.to_json()
        )
    except BaseException:
        chosen.close()
        raise
    if attachments is not None:
        try:
            run_dir.attach(attachments)
        except BaseException:
            chosen.close()
            with run_dir.locked():
                run_dir.finish("failed", 0, len(plan.cells), None)
            raise
        plan.study = study.model_copy(update={"root": str(run_dir.path)})
    with run_dir.locked():
        return _execute(
            plan, run_dir, plan.cells, chosen, progress, on_cell, t0, compile_s, compile_wall
        )


def resume(
    run_ref: str | Path | RunDir,
    *,
    runs_dir: str | Path | None = None,
    progress: Progress | None = None,
    on_cell: Callable[[int, int], None] | None = None,
    executor: str | Executor = "local",
    address: str | None = None,
    workers: int | None = None,
    started: float | None = None,
) -> RunResult:
    """Finish a killed, interrupted or failed run, or repair any run: train only its missing
    or damaged cells (a file that no longer matches its recorded checksum; the same cells,
    chunk sizes and seeds it planned), then analyse it as a whole. The result is
    bit-identical to an uninterrupted run of the same study and seeds.

    run_ref: a run folder, a run id (or unique prefix) in ``runs_dir``, or ``latest``.
    Raises InputError (exit 2) for a complete run whose cells are all intact, a run still
    running in another process, or a run folder this version cannot resume.
    """
    if isinstance(run_ref, RunDir):
        run_dir = run_ref
    else:
        root = Path(runs_dir) if runs_dir is not None else default_runs_dir()
        run_dir = resolve_run(root, str(run_ref))
    progress = progress or Silent()
    t0 = time.perf_counter() if started is None else started
    with run_dir.locked():
        return _resume_locked(run_dir, progress, on_cell, executor, address, workers, t0)


def _resume_locked(
    run_dir: RunDir,
    progress: Progress,
    on_cell: Callable[[int, int], None] | None,
    executor: str | Executor,
    address: str | None,
    workers: int | None,
    t0: float,
) -> RunResult:
    meta = run_dir.read_json("study.json")
    status = run_dir.read_json("status.json")  # read under the lock: final
    where = str(run_dir.path)
    stored_plan = meta.get("plan")
    if not stored_plan:
        raise InputError(
            where=where,
            key="study.json plan",
            expected="a run stored by an ablab that records its cell plan",
            got="no plan (an older run)",
            fix="run the study again",
        )
    try:
        study = Study.model_validate(meta["study"])
    except Exception as exc:
        raise InputError(
            where=where,
            key="study.json",
            expected="the stored study, loadable by this ablab version",
            got=f"{type(exc).__name__}: {str(exc).splitlines()[0]}",
            fix="resume with the ablab version that started the run, or run the study again",
        ) from exc
    builders = {"model.builder": study.model.builder} | {
        f"variants.{v}.builder": spec.builder for v, spec in study.variants.items()
    }
    for key, builder in builders.items():
        if isinstance(builder, str) and builder.startswith("<callable"):
            raise InputError(
                where=where,
                key=key,
                expected="a builder named by file or module (a stored run can rebuild it)",
                got=builder,
                fix="give the builder as 'file.py:function' or 'module:function' to resume "
                "(ablab.ablate stores the model of a function it cannot import)",
            )
    if study.root == RUN_ROOT:  # data / models attached to the run (ablab.ablate)
        damaged = run_dir.attachment_damage()
        if damaged:
            raise InputError(
                where=where,
                key="data",
                expected="the data and model files stored with the run, unchanged (their "
                "SHA-256 is recorded in cells.sha256)",
                got="; ".join(f"{name}: {why}" for name, why in damaged.items()),
                fix="restore them from a copy of the run folder, or run the study again: a "
                "resumed run must train on the data it started with",
            )
        study = study.model_copy(update={"root": str(run_dir.path)})
    plan = make_plan(study, stored_plan["chunk_sizes"], workers)
    check_same_plan(where, stored_plan, plan.to_json())
    run_dir.clean_partial_writes()
    done = run_dir.done_cells(probed={c.key for c in plan.cells if c.probes})
    todo = [c for c in plan.cells if c.key not in done]
    if status["state"] == "complete" and not todo:
        raise InputError(
            where=where,
            key="--resume",
            expected="a run that did not finish (killed, interrupted or failed), or one with "
            "damaged or missing cells",
            got="a complete run, every cell intact (checksums verified)",
            fix=f"nothing to resume or repair; see it with `ablab show {run_dir.run_id}`",
        )
    tc = time.perf_counter()
    compile_s = compile_all(plan, todo, progress)
    compile_wall = time.perf_counter() - tc
    chosen = _executor(plan, executor, address)
    try:
        run_dir.reopen(len(plan.cells) - len(todo), len(plan.cells))
    except BaseException:
        chosen.close()
        raise
    return _execute(plan, run_dir, todo, chosen, progress, on_cell, t0, compile_s, compile_wall)


def _execute(
    plan: Plan,
    run_dir: RunDir,
    todo: list[Cell],
    executor: Executor,
    progress: Progress,
    on_cell: Callable[[int, int], None] | None,
    t0: float,
    compile_s: dict[str, float],
    compile_wall: float,
) -> RunResult:
    """Train ``todo`` with ``executor``, storing each cell as it arrives, then analyse the
    whole run from its stored cells (the same path whether it ran in one go or resumed)."""
    total = len(plan.cells)
    done = total - len(todo)
    prefetch: Prefetch | None = None
    try:
        prefetch = _prefetch_checks(plan)
        t_train = time.perf_counter()
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
        train_s = time.perf_counter() - t_train
        trained = sum(c.real for c in todo)
        result = _analyse(plan, run_dir, progress, compile_s, prefetch)
        result.train_s, result.compile_wall_s = train_s, compile_wall
        result.wall_s = time.perf_counter() - t0  # everything: start, compile, train, analysis
        result.runs_per_s = trained / result.wall_s
        result.executor = {"name": executor.name}
        if isinstance(executor, LocalExecutor):
            result.executor["workers"] = executor.workers
        run_dir.finish("complete", done, total, result.to_json())
    except KeyboardInterrupt as exc:  # during training, checks or analysis
        if prefetch is not None:
            prefetch.cancel()
        run_dir.finish("interrupted", done, total, None)
        raise RunInterrupted(str(run_dir.path), done, total) from exc
    except BaseException:
        if prefetch is not None:
            prefetch.cancel()
        run_dir.finish("failed", done, total, None)
        raise
    return result


def _prefetch_checks(plan: Plan) -> Prefetch | None:
    """The declared equivalence checks' programs, compiled in the background while the
    seeds train and the verdicts are computed (on 2 cores a cold flagship spent ~5 s
    compiling them after everything else); None when the run has none to compile."""
    study = plan.study
    if study.engine.kind == "reference" or not declares_checks(study):
        return None
    jobs = equivalence_jobs(study, plan.programs)
    return Prefetch(jobs, min(len(jobs), default_workers())) if jobs else None


def _analyse(
    plan: Plan,
    run_dir: RunDir,
    progress: Progress,
    compile_s: dict[str, float],
    prefetch: Prefetch | None = None,
) -> RunResult:
    """Verdicts, checks and explanations of a run whose cells are all stored -- computed
    from the store, so a resumed run and an uninterrupted one give identical documents.
    The checks come last: their programs compile in the background (``prefetch``) until
    then."""
    from ablab.analysis.explain import divergence_summary

    study = plan.study
    histories = stored_histories(run_dir, list(plan.programs))
    epoch_probes = epoch_probe_arrays(run_dir.probes("epoch"))
    reference = study.engine.kind == "reference"
    explain = {}
    probed = {c.variant for c in plan.cells if c.probes}
    for v, program in plan.programs.items():
        epoch_p = epoch_probes.get(v)
        explain[v] = {
            "optimum": optimum_gaps(program, histories[v].values, epoch_p),
            "bn": bn_diagnosis(program, histories[v].values, epoch_p),
            "probes": v in probed,
        }
    summary = summarize(histories)
    comparisons = compare(histories, str(study.baseline), study.verdicts, study=study.resolved())
    divergence = divergence_summary(histories, study.resolved())
    checks: list[CheckResult] = []
    if declares_checks(study) and reference:
        checks = [reference_engine_checks_skipped(study)]
    elif declares_checks(study):
        if prefetch is not None:
            prefetch.wait()
        checks = run_checks(study, plan.programs, progress=progress)
    return RunResult(
        run_id=run_dir.run_id,
        run_dir=run_dir.path,
        study=study,
        state="complete",
        wall_s=0.0,  # set by the caller, once the analysis is done too
        runs_per_s=0.0,
        summary=summary,
        histories=histories,
        comparisons=comparisons,
        checks=checks,
        explain=explain,
        divergence=divergence,
        compile_s=compile_s,
    )
