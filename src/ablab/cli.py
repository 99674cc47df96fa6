"""The ``ablab`` command line: a thin layer over the library (``main(argv)`` returns the exit code).

Exit codes: 0 ok, 1 failure, 2 bad input (nothing written), 130 interrupted.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click
from rich.console import Console
from rich.markup import escape

from ablab._startup import import_keras_lean
from ablab.errors import (
    EXIT_BAD_INPUT,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    AblabError,
)

_runs_dir_option = click.option(
    "--runs-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Where runs are stored (default: $ABLAB_RUNS_DIR or ./runs).",
)
_json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print exactly one JSON document on stdout."
)
_all_metrics_option = click.option(
    "--all-metrics",
    is_flag=True,
    help="A table of final values per recorded metric (default: the verdict metric's).",
)


RESULT_SUFFIXES = (".csv", ".parquet", ".pq")
"""``ablab compare X``: X is a results file when it is a file or names one of these (missing,
it is reported as a file); anything else is a stored run."""


def _runs_dir(runs_dir: Path | None) -> Path:
    from ablab.store.rundir import default_runs_dir

    return runs_dir if runs_dir is not None else default_runs_dir()


def _stdout() -> Console:
    console = Console(highlight=False)
    if not console.is_terminal:  # a pipe or a log file: no reason to wrap at 80 columns
        console = Console(highlight=False, width=140)
    return console


def _show_progress(quiet: bool, as_json: bool) -> bool:
    """Progress bars go to stderr, and only for a person watching a terminal: never under
    --quiet or --json, nor when stdout or stderr is a pipe or a file."""
    return not (quiet or as_json) and sys.stdout.isatty() and Console(stderr=True).is_terminal


def _dump(doc: Any) -> None:
    from ablab.store.io import dumps

    sys.stdout.write(dumps(doc) + "\n")
    sys.stdout.flush()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ablab")
def cli() -> None:
    """Does this layer / setting actually help my network? Many seeds, paired, vectorized."""


@cli.command("run")
@click.argument("study", type=click.Path(path_type=Path), required=False)
@click.option(
    "--seeds", type=int, default=None, help="Seeds per variant (overrides [seeds] count)."
)
@_runs_dir_option
@_json_option
@_all_metrics_option
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@click.option(
    "--remedies",
    is_flag=True,
    help="Add variants that address a BatchNormalization diagnosis (momentum, batch "
    "size, epochs, placement) and compare them too.",
)
@click.option(
    "--engine",
    type=click.Choice(["vectorized", "reference"]),
    default=None,
    help="vectorized (default: all seeds in one compiled program) or reference (plain "
    "model.fit per seed, slower, for models the vectorized engine cannot run).",
)
@click.option(
    "--report",
    "with_report",
    is_flag=True,
    help="Write the HTML report (RUN/report.html) when the run ends.",
)
@click.option(
    "--resume",
    "resume_ref",
    default=None,
    metavar="RUN",
    help="Finish a killed, interrupted or failed run, or repair a damaged one (a run folder, "
    "id, unique prefix or 'latest'): train only its missing or damaged cells, then analyse "
    "it. Takes no STUDY.",
)
@click.option(
    "--executor",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="Where cells train: this process, or a Ray cluster (needs ablab[ray]).",
)
@click.option(
    "--address",
    default=None,
    metavar="HOST:PORT",
    help="The Ray cluster for --executor ray (default: $RAY_ADDRESS, else a local Ray).",
)
@click.option(
    "--no-compilation-cache",
    "no_cache",
    is_flag=True,
    help="Compile every program afresh (default: reuse them from the persistent compilation "
    "cache in ~/.cache/ablab/xla; also $ABLAB_COMPILATION_CACHE=0). Results are identical.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="Chunk calls to run at once in this process (default: [engine] workers, else one "
    "per usable CPU core, at most 8), as many as the memory budget holds. Results do not "
    "depend on it.",
)
def run_cmd(
    study: Path | None,
    seeds: int | None,
    runs_dir: Path | None,
    as_json: bool,
    all_metrics: bool,
    quiet: bool,
    remedies: bool,
    engine: str | None,
    with_report: bool,
    resume_ref: str | None,
    executor: str,
    address: str | None,
    no_cache: bool,
    workers: int | None,
) -> None:
    """Train every variant of STUDY over many seeds; print a summary; store everything.

    `ablab run --resume RUN` finishes a run that was killed or interrupted, and repairs a
    run whose cell files are damaged (re-trained to the same bits)."""
    from ablab.output.terminal import RichProgress

    if address is not None and executor != "ray":
        raise click.UsageError("--address needs --executor ray")
    if workers is not None and executor != "local":
        raise click.UsageError(
            "--workers sets the local executor (a Ray cluster runs one cell per task CPU)"
        )
    if no_cache:  # read when the engine is imported, below
        os.environ["ABLAB_COMPILATION_CACHE"] = "0"
    where = {"runs_dir": _runs_dir(runs_dir), "executor": executor, "address": address}
    where["workers"] = workers
    where["started"] = _STARTED[0]
    if resume_ref is not None:
        start = _resume_start(resume_ref, study, seeds, remedies, engine, where)
    else:
        start = _run_start(study, seeds, remedies, engine, where)
    if _show_progress(quiet, as_json):
        with RichProgress(Console(stderr=True)) as bars:
            result = start(progress=bars)
    else:
        result = start()
    _print_result(result, as_json, with_report, all_metrics)


def _resume_start(
    ref: str,
    study: Path | None,
    seeds: int | None,
    remedies: bool,
    engine: str | None,
    where: dict[str, Any],
) -> Callable[..., Any]:
    """`ablab run --resume RUN`: the run continues as planned, so no planning option. The
    options and the run are checked before the engine (Keras, JAX) is imported."""
    from ablab.store.rundir import resolve_run

    given = [
        name
        for name, value in (
            ("STUDY", study),
            ("--seeds", seeds),
            ("--remedies", remedies or None),
            ("--engine", engine),
        )
        if value is not None
    ]
    if given:
        raise click.UsageError(
            f"--resume RUN continues the run as it was planned; drop {', '.join(given)}"
        )
    run_dir = resolve_run(where["runs_dir"], ref)  # a bad reference fails here, in a second

    import_keras_lean()
    from ablab.execution.pipeline import resume

    return functools.partial(resume, run_dir, **where)


def _run_start(
    study: Path | None,
    seeds: int | None,
    remedies: bool,
    engine: str | None,
    where: dict[str, Any],
) -> Callable[..., Any]:
    """`ablab run STUDY`: the study file, with the command line's overrides. A bad study file
    fails before the engine (Keras, JAX) is imported."""
    from ablab.study.loading import load_study

    if study is None:
        raise click.UsageError("give a STUDY file, or --resume RUN")
    spec = load_study(study)
    if engine is not None:
        spec = spec.model_copy(update={"engine": spec.engine.model_copy(update={"kind": engine})})

    import_keras_lean()
    from ablab.execution.pipeline import run

    return functools.partial(run, spec, seeds=seeds, remedies=remedies, **where)


def _print_result(result: Any, as_json: bool, with_report: bool, all_metrics: bool = False) -> None:
    """The run's document (JSON or tables), its report if asked, and exit code 1 when a
    declared check failed or a baseline diverged on every seed."""
    from ablab.output.terminal import print_run

    doc: dict[str, Any] = dict(result.to_json())
    if with_report:
        from ablab.output.report import write_report
        from ablab.store.rundir import RunDir

        doc["report"] = str(write_report(RunDir(result.run_dir)))
    if as_json:
        _dump(doc)
    else:
        print_run(_stdout(), doc, all_metrics)
        if with_report:
            _stdout().print(f"report: {doc['report']}", soft_wrap=True)
    failed = [c["name"] for c in doc["checks"] if c["passed"] is False]
    if failed:
        Console(stderr=True).print(
            f"[bold red]{len(failed)} check(s) failed[/bold red] ({', '.join(failed)}): the run "
            "is stored, but a framework or model bug may be behind its numbers.",
            soft_wrap=True,
        )
    diverged = result.diverged_baselines  # nothing can be judged against such a baseline
    # a failure only when no comparison could be judged: one diverged point of a swept
    # learning rate is a finding (a warning), not a failed run
    baselines = {c["baseline"] for c in doc["comparisons"]} or {doc.get("baseline")}
    hopeless = bool(diverged) and len(diverged) >= len(baselines)
    for message in diverged:
        label = "[bold red]error:[/bold red]" if hopeless else "[yellow]warning:[/yellow]"
        Console(stderr=True, highlight=False).print(
            f"{label} {escape(message)}; the run is stored", soft_wrap=True
        )
    if failed or hopeless:
        raise SystemExit(EXIT_FAILURE)


@cli.command("check")
@click.argument("study", type=click.Path(path_type=Path))
@click.option(
    "--backends",
    default=None,
    help="Comma-separated Keras backends for model.fit checks (jax,torch,tensorflow), "
    "or 'none'. Default: the study's [checks] backends, else all three.",
)
@click.option(
    "--identity-probe/--no-identity-probe",
    default=None,
    help="Probe every variant with identity activations (default: the study's option).",
)
@click.option("--seeds", type=int, default=None, help="Seeds per check (default [checks] seeds).")
@_json_option
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def check_cmd(
    study: Path,
    backends: str | None,
    identity_probe: bool | None,
    seeds: int | None,
    as_json: bool,
    quiet: bool,
) -> None:
    """Run STUDY's checks: declared equivalences, identity probes, model.fit on each backend."""
    import_keras_lean()
    from ablab.analysis.checks import all_passed, check
    from ablab.output.terminal import RichProgress, checks_table

    chosen = None
    if backends is not None:
        chosen = [] if backends == "none" else [b.strip() for b in backends.split(",") if b]
    options: dict[str, Any] = {"backends": chosen, "identity_probe": identity_probe}
    options["seeds"] = seeds
    if _show_progress(quiet, as_json):
        with RichProgress(Console(stderr=True)) as bars:
            results = check(study, **options, progress=bars)
    else:
        results = check(study, **options)
    doc = {"checks": [r.to_json() for r in results]}
    if as_json:
        _dump(doc)
    else:
        _stdout().print(checks_table(doc["checks"]))
    if not all_passed(results):
        raise SystemExit(EXIT_FAILURE)


@cli.command("compare")
@click.argument("file", metavar="FILE|RUN")
@click.option(
    "--metric",
    default=None,
    help="The metric column (default: the only column besides variant and seed); for a "
    "RUN, any recorded History name (default: the run's verdict metric).",
)
@click.option("--baseline", default=None, help="The baseline variant (default: the first).")
@click.option(
    "--higher-is-better/--lower-is-better",
    "higher_is_better",
    default=None,
    help="Direction (default: from the metric's name, losses lower, accuracy-like higher; "
    "a RUN re-judged on its own metric keeps its study's direction).",
)
@click.option(
    "--margin",
    type=float,
    default=None,
    help="Equivalence margin in metric units (default: 0.1 x the baseline's SD).",
)
@click.option(
    "--margin-pct",
    type=float,
    default=None,
    help="Equivalence margin in percent of the baseline's |median|.",
)
@click.option(
    "--alpha", type=float, default=None, help="Significance level (default 0.05; a RUN: its own)."
)
@click.option("--unpaired", is_flag=True, help="Do not pair seeds across variants.")
@_runs_dir_option
@_json_option
@_all_metrics_option
def compare_cmd(
    file: str,
    metric: str | None,
    baseline: str | None,
    higher_is_better: bool | None,
    margin: float | None,
    margin_pct: float | None,
    alpha: float | None,
    unpaired: bool,
    runs_dir: Path | None,
    as_json: bool,
    all_metrics: bool,
) -> None:
    """Verdicts for per-seed results made anywhere: FILE is a .csv or .parquet table in long
    format (columns `variant`, `seed` and the metric; nan / inf = diverged), judged with the
    same rule and output as `ablab run`.

    Given a stored RUN instead (id, unique prefix, path or 'latest'; anything that is not a
    file), re-judge it without retraining: `ablab compare RUN --metric val_accuracy` compares
    the final values of any metric the run recorded (`--json`: the run document)."""
    from ablab.output.terminal import print_compare
    from ablab.stats.compare import compare
    from ablab.store.results import read_results

    path = Path(file)
    if path.is_dir() or not (path.is_file() or path.suffix.lower() in RESULT_SUFFIXES):
        if unpaired:
            raise click.UsageError("--unpaired compares a results FILE; a RUN stays paired")
        _rejudge(file, runs_dir, as_json, all_metrics, metric=metric, baseline=baseline,
                 higher_is_better=higher_is_better, margin=margin, margin_pct=margin_pct,
                 alpha=alpha)  # fmt: skip
        return
    result = compare(
        read_results(Path(file)),
        metric=metric,
        baseline=baseline,
        lower_is_better=None if higher_is_better is None else not higher_is_better,
        margin=margin,
        margin_pct=margin_pct,
        alpha=alpha,
        paired=False if unpaired else None,
        source=str(file),
    )
    if as_json:
        _dump(result.to_json())
    else:
        print_compare(_stdout(), result.to_json())


def _rejudge(
    ref: str, runs_dir: Path | None, as_json: bool, all_metrics: bool, **verdicts: Any
) -> None:
    """`ablab compare RUN`: the stored run's document with its verdicts recomputed on another
    metric / margin / alpha (``ablab.analysis.document.rejudge``); no retraining."""
    from ablab.analysis.document import rejudge
    from ablab.output.terminal import print_run
    from ablab.store.rundir import resolve_run

    doc = rejudge(resolve_run(_runs_dir(runs_dir), ref), **verdicts)
    if as_json:
        _dump(doc)
    else:
        print_run(_stdout(), doc, all_metrics)


@cli.command("show")
@click.argument("run_ref", metavar="[RUN]", required=False)
@_runs_dir_option
@_json_option
@_all_metrics_option
def show_cmd(run_ref: str | None, runs_dir: Path | None, as_json: bool, all_metrics: bool) -> None:
    """List stored runs, or summarise RUN (id, unique prefix, path or 'latest')."""
    from ablab.store.rundir import list_runs, resolve_run

    root = _runs_dir(runs_dir)
    if run_ref is None:  # the list needs the catalog only, not the statistics
        from ablab.output.terminal import runs_table

        rows = list_runs(root)
        if as_json:
            _dump({"runs": rows})
        elif rows:
            _stdout().print(runs_table(rows))
        else:
            _stdout().print(f"no runs under {root}")
        return
    from ablab.analysis.document import load_result
    from ablab.output.terminal import print_show

    doc = load_result(resolve_run(root, run_ref))
    if as_json:
        _dump(doc)
    else:
        print_show(_stdout(), doc, all_metrics)


@cli.command("query")
@click.argument("sql")
@_runs_dir_option
@_json_option
def query_cmd(sql: str, runs_dir: Path | None, as_json: bool) -> None:
    """Run SQL (DuckDB) over every stored run: tables `runs`, `history` and `probes`."""
    from ablab.output.terminal import query_table
    from ablab.store.catalog import query

    columns, rows = query(_runs_dir(runs_dir), sql)
    if as_json:
        _dump({"columns": columns, "rows": [list(r) for r in rows]})
    else:
        _stdout().print(query_table(columns, rows))


@cli.command("report")
@click.argument("run_ref", metavar="RUN")
@click.option(
    "--output",
    "-o",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Where to write the HTML file (default: RUN/report.html).",
)
@_runs_dir_option
def report_cmd(run_ref: str, output: Path | None, runs_dir: Path | None) -> None:
    """Write RUN's report: one self-contained HTML page with the verdicts, checks and figures."""
    from ablab.output.report import write_report
    from ablab.store.rundir import resolve_run

    path = write_report(resolve_run(_runs_dir(runs_dir), run_ref), output)
    _stdout().print(f"report written to {path}", soft_wrap=True)


@cli.command("export")
@click.argument("run_ref", metavar="RUN")
@click.option(
    "--mlflow",
    "mlflow_uri",
    required=True,
    help="MLflow tracking URI: http://127.0.0.1:5000 (an `mlflow server`), "
    "sqlite:///mlflow.db, or any other MLflow accepts.",
)
@click.option("--experiment", default=None, help="MLflow experiment (default: the study's name).")
@click.option(
    "--replace", is_flag=True, help="Delete MLflow runs of an earlier export of RUN first."
)
@_runs_dir_option
@_json_option
def export_cmd(
    run_ref: str,
    mlflow_uri: str,
    experiment: str | None,
    replace: bool,
    runs_dir: Path | None,
    as_json: bool,
) -> None:
    """Log each variant of RUN as an MLflow run: study params, per-epoch metrics aggregated
    over seeds, verdicts as tags, the HTML report as an artifact."""
    from ablab.output.mlflow_export import export_mlflow
    from ablab.store.rundir import resolve_run

    rows = export_mlflow(
        resolve_run(_runs_dir(runs_dir), run_ref),
        mlflow_uri,
        experiment=experiment,
        replace=replace,
    )
    if as_json:
        _dump({"mlflow": mlflow_uri, "runs": rows})
    else:
        for row in rows:
            _stdout().print(
                f"{row['variant']}: MLflow run {row['mlflow_run_id']} "
                f"(experiment {row['experiment_id']})"
            )


_STARTED = [time.perf_counter()]
"""When the current command began (``wall_s`` counts from there)."""


def main(argv: list[str] | None = None) -> int:
    """Run the CLI with ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    _STARTED[0] = time.perf_counter()
    err = Console(stderr=True, highlight=False)
    try:
        rv = cli.main(args=argv, prog_name="ablab", standalone_mode=False)
    except AblabError as exc:
        text = escape(str(exc))
        if exc.exit_code == EXIT_INTERRUPTED:
            err.print(f"[yellow]{text}[/yellow]", soft_wrap=True)
        else:
            err.print(f"[bold red]error:[/bold red] {text}", soft_wrap=True)
        return exc.exit_code
    except (click.exceptions.Abort, KeyboardInterrupt):
        err.print("[yellow]interrupted[/yellow]")
        return EXIT_INTERRUPTED
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_FAILURE
    except click.exceptions.ClickException as exc:
        exc.show(file=sys.stderr)
        return EXIT_BAD_INPUT if isinstance(exc, click.exceptions.UsageError) else EXIT_FAILURE
    return rv if isinstance(rv, int) else 0


def run_main() -> NoReturn:
    """Console-script entry point."""
    exit_now(main())


def exit_now(code: int) -> NoReturn:
    """Leave the process with ``code`` as ``sys.exit`` would -- atexit handlers run, output
    flushed -- but without the interpreter's teardown: freeing every module and JAX's and
    XLA's objects took ~0.9 s after the flagship had finished (bench/latency.py: its warm
    run is ~7 s). Done the usual way while another non-daemon thread is still at work, or
    under a profiler, tracer or coverage tool (they write their results at teardown)."""
    others = [
        t
        for t in threading.enumerate()
        if t is not threading.main_thread() and not t.daemon and t.is_alive()
    ]
    if others or sys.getprofile() is not None or sys.gettrace() is not None:
        sys.exit(code)
    atexit._run_exitfuncs()  # what the interpreter runs at exit (logging, temp folders, ...)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe (`ablab show | head`)
            stream.flush()
    os._exit(code)
