"""Planning a run: the study prepared (seeds, remedies, sweep), data and every variant's program
built, compiled and checked, and the cells (variant x seed chunk) cut -- all before anything is
written, so bad input leaves nothing behind."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ablab.analysis.checks import CheckResult
from ablab.engine.build import build_program
from ablab.engine.compiling import compile_programs
from ablab.engine.data import Dataset, load_dataset
from ablab.engine.program import VariantProgram
from ablab.engine.sizing import (
    choose_chunk_size,
    default_workers,
    even_cell_count,
    seed_chunks,
    workers_within_budget,
)
from ablab.errors import InputError, StudyError
from ablab.execution.env import differing_keys, environment_fingerprint, study_data_digest
from ablab.execution.executors import Cell
from ablab.execution.progress import Progress
from ablab.study.keras_names import DATA_LOSS
from ablab.study.loading import load_study
from ablab.study.remedies import with_remedies
from ablab.study.schema import Study
from ablab.study.sweep import expand_sweep


def declares_checks(study: Study) -> bool:
    """Does the study ask for any check (run by ``ablab run`` after training)?"""
    c = study.checks
    return bool(c.equivalent or c.identity_probe or c.backends)


@dataclass
class Plan:
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
            "data": study_data_digest(self.study, self.data),
        }


def _history_names(study: Study) -> set[str]:
    names: set[str] = set()
    for variant in study.variants:
        train = study.variant_train(variant)
        mine = {"loss", DATA_LOSS, *train.metric_names()}
        names |= mine
        if train.validation_split > 0 or study.data.validation is not None:
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
    for variant, base in study.comparison_pairs():
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


def make_plan(
    study: Study, chunk_sizes: dict[str, int] | None = None, workers: int | None = None
) -> Plan:
    """Validate everything and return the programs and the cells, without writing anything.

    chunk_sizes: the stored plan's (a resumed run cuts exactly the cells it started with);
    else each variant's from the memory budget (``choose_chunk_size``), the study's count of
    cells then made even where smaller cells do it (``even_cell_count``). A probed variant
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
    if chunk_sizes is None and study.engine.chunk_size is None and not reference:
        sizes = even_cell_count(
            study.seeds.count, sizes, {v: p.per_seed_bytes() for v, p in programs.items()}
        )
    for variant, program in programs.items():
        chunk = sizes[variant]
        for k, ids, real in seed_chunks(study.seeds.base, study.seeds.count, chunk):
            probed = program.probes and k * chunk < study.probes.seeds
            cells.append(Cell(variant, k, ids, real, probed))
        if program.probes and any(c.variant == variant and not c.probes for c in cells):
            plain[variant] = VariantProgram(program.prepared, program.split, probes=False)
            plain[variant].model_description = program.model_description  # same model
    if workers is not None and (workers < 1 or (reference and workers > 1)):
        raise InputError(
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
    return Plan(study, data, programs, plain, cells, sizes, workers)


def untraceable(
    study: Study, variant: str, program: VariantProgram, exc: BaseException
) -> StudyError | None:
    """A failure to compile ``variant``'s program as bad input, named by the layer to blame,
    with the way out (``--engine reference``); None when no layer is to blame (a real
    failure, raised as it is)."""
    layer = program.culprit(exc)
    if layer is None:
        return None
    first_line = str(exc).splitlines()[0] if str(exc) else ""
    return StudyError(
        where=study.source,
        key=f"variants.{variant}",
        expected="layers the vectorized engine can run (JAX-traceable under vmap and scan)",
        got=f"layer {layer} failed: {type(exc).__name__}: {first_line}",
        fix='run this study with `--engine reference` ([engine] kind = "reference"): '
        "plain model.fit per seed, slower, same tables and verdicts",
    )


def reference_engine_checks_skipped(study: Study) -> CheckResult:
    """The checks compare the vectorized engine's trajectories; a reference-engine run (a
    model that engine may not run at all) reports them skipped, with the reason."""
    return CheckResult.skipped(
        "declared checks",
        "equivalence",
        study.checks.tolerance,
        "skipped: this run used the reference engine (model.fit per seed); the checks "
        "compare the vectorized engine's trajectories -- run `ablab check STUDY` if it can",
    )


def prepare_study(study: Study | str | Path, seeds: int | None, remedies: bool) -> Study:
    if not isinstance(study, Study):
        study = load_study(study)
    if seeds is not None:
        study = study.with_seeds(count=seeds)
    if remedies:
        if study.sweep:
            raise InputError(
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


def compile_all(plan: Plan, todo: list[Cell], progress: Progress) -> dict[str, float]:
    """Compile every program the cells in ``todo`` need (before anything is written on a new
    run: a model the engine cannot trace is bad input), up to ``plan.workers`` at once, each
    distinct program once (``ablab.engine.compiling``: twins such as an identity layer's
    are a cache hit). Returns seconds per variant (lowering + compile, overlapping when
    concurrent); a failure is the first failing variant's, in study order."""
    reference = plan.study.engine.kind == "reference"
    jobs: list[tuple[str, VariantProgram]] = []
    started = []
    for variant in plan.programs:
        mine = [c for c in todo if c.variant == variant]
        if not mine:
            continue
        progress.variant_started(variant, len(mine), plan.chunk_sizes[variant])
        started.append(variant)
        if not reference:
            unique = {id(p): p for p in map(plan.program_for, mine)}.values()
            jobs += [(variant, p) for p in unique]
    if reference:  # model.fit per seed: nothing to compile
        for variant in started:
            progress.compiled(variant, 0.0)
        return {}
    compile_s: dict[str, float] = {}
    left = {v: sum(1 for w, _ in jobs if w == v) for v, _ in jobs}

    def done(i: int, seconds: float) -> None:
        variant = jobs[i][0]
        compile_s[variant] = compile_s.get(variant, 0.0) + seconds
        left[variant] -= 1
        if not left[variant]:
            progress.compiled(variant, compile_s[variant])

    def wrap_error(i: int, exc: BaseException) -> BaseException | None:
        variant, program = jobs[i]
        return untraceable(plan.study, variant, program, exc)

    compile_programs(
        [(p, "train", plan.chunk_sizes[v]) for v, p in jobs],
        max(1, plan.workers),
        done=done,
        wrap_error=wrap_error,
    )
    return compile_s


def check_same_plan(where: str, stored: dict[str, Any], now: dict[str, Any]) -> None:
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
        for k in differing_keys(old_fp, new_fp)
    ]
    if diffs:
        raise InputError(
            where=where,
            key="--resume",
            expected="the software, settings and data the run started with (its cells must "
            "be bit-identical to an uninterrupted run's)",
            got="; ".join(diffs),
            fix="resume in the environment that started the run (same versions, ablab code, "
            "XLA flags, $ABLAB_LOWERINGS and a C++ compiler if it had one, and data), or run "
            "the study again",
        )
