"""The run document: one typed JSON document of a run, built by one function.

``ablab run --json`` prints it, ``summary.json`` stores it, ``ablab show RUN --json`` rebuilds it
from a run folder (summary and comparisons recomputed from the finished cells), and the
terminal, the HTML report, MLflow export and the figures read it. Its parts are typed here
(``RunDocument`` and friends); the JSON keys are the field names.
"""

from __future__ import annotations

from typing import Any, TypedDict

from pydantic import ValidationError

from ablab.analysis.dynamics import training_dynamics
from ablab.analysis.explain import divergence_summary
from ablab.errors import InputError
from ablab.stats.summary import summarize
from ablab.stats.verdicts import RULE, compare
from ablab.store.records import VariantHistory, variant_histories
from ablab.store.rundir import RunDir
from ablab.study.loading import to_study_error
from ablab.study.schema import VerdictSpec
from ablab.study.sweep import sweep_effects


class FinalDistribution(TypedDict):
    """Final-epoch values of one metric over seeds (non-finite seeds left out)."""

    mean: float | None
    median: float | None
    q05: float | None
    q95: float | None


class VariantSummary(TypedDict, total=False):
    """One variant: ``n_seeds``, ``diverged``, ``metric`` (the headline one) and
    ``final_<metric>`` (a :class:`FinalDistribution`) -- the last key is named by the metric,
    so it is not declared here."""

    n_seeds: int
    diverged: int
    metric: str


class CheckDoc(TypedDict):
    """``ablab.analysis.checks.CheckResult.to_json()``."""

    name: str
    kind: str
    passed: bool | None
    max_abs_dev: float | None
    max_rel_dev: float | None
    first_bad_step: int | None
    tolerance: float
    detail: str


class ComparisonDoc(TypedDict, total=False):
    """``ablab.stats.verdicts.Comparison.to_json()``: its fields, by name."""

    variant: str
    baseline: str
    metric: str
    n: int
    verdict: str
    reason: str
    diff_mean: float | None
    ci_low: float | None
    ci_high: float | None
    p_value: float | None
    p_adjusted: float | None
    margin: float | None
    margin_rule: str
    seeds_needed: int | None
    lower_is_better: bool
    paired: bool


class CauseDoc(TypedDict):
    """The setting that likely made a variant diverge (``ablab.analysis.explain``)."""

    setting: str
    value: float
    baseline_value: float | None
    text: str


class DivergenceDoc(TypedDict):
    """A variant with diverged seeds: ``ablab.analysis.explain.divergence_summary``."""

    n_seeds: int
    diverged: int
    first_epoch: int
    last_epoch: int
    median_epoch: float
    values: dict[str, int]
    baseline: str | None
    is_baseline: bool
    cause: CauseDoc | None
    text: str


class RunDocument(TypedDict):
    """A run, as every reader of it sees it."""

    run_id: str
    run_dir: str
    name: str | None
    description: str | None
    created_at: str | None
    state: str
    cells_done: int | None
    cells_total: int | None
    wall_s: float | None
    """Seconds from the command's start to the stored result: compile, training, analysis."""
    runs_per_s: float | None
    """Seeds trained / wall_s."""
    train_s: float | None
    """Seconds training only (the compiled programs running)."""
    compile_s: float | None
    """Seconds compiling (all variants)."""
    executor: dict[str, Any] | None
    baseline: str | None
    environment: dict[str, Any] | None
    study: dict[str, Any]
    variants: dict[str, VariantSummary]
    comparisons: list[ComparisonDoc]
    verdict_metric: str | None
    """The History name the verdicts compare (its final values lead the summary)."""
    metric_note: str
    """Why the verdict metric is not Keras' val_loss (``ablab.stats.metric_choice``), or ""."""
    metric_warning: str
    """What makes the verdict metric mislead (a regularisation penalty in val_loss, loss
    functions that differ), or ""."""
    verdict_rule: str
    checks: list[CheckDoc]
    explain: dict[str, Any]
    divergence: dict[str, DivergenceDoc]
    """Only the variants with a diverged seed, recomputed from the finished cells."""
    dynamics: dict[str, dict[str, Any]]
    """Per variant: generalisation gap, trend at the last epoch and seed sensitivity of the
    verdict metric (``ablab.analysis.dynamics.training_dynamics``), from the finished cells."""
    sweep: dict[str, Any] | None
    analysed: bool
    resumable: bool


def build_document(
    *,
    run_id: str,
    run_dir: str,
    study: dict[str, Any],
    state: str,
    variants: dict[str, Any],
    comparisons: list[dict[str, Any]],
    checks: list[dict[str, Any]],
    explain: dict[str, Any],
    wall_s: float | None = None,
    runs_per_s: float | None = None,
    train_s: float | None = None,
    compile_s: float | None = None,
    executor: dict[str, Any] | None = None,
    created_at: str | None = None,
    environment: dict[str, Any] | None = None,
    cells_done: int | None = None,
    cells_total: int | None = None,
    analysed: bool = True,
    divergence: dict[str, Any] | None = None,
    dynamics: dict[str, Any] | None = None,
) -> RunDocument:
    """The one builder of a :class:`RunDocument` (``study``: the resolved study, as stored in
    study.json; ``variants``: ``ablab.stats.summary.summarize``; ``comparisons`` / ``checks``:
    their ``to_json()``; ``divergence``: ``ablab.analysis.explain.divergence_summary``;
    ``dynamics``: ``ablab.analysis.dynamics.training_dynamics``)."""
    choice = verdict_metric(variants, comparisons)
    return {
        "run_id": run_id,
        "run_dir": run_dir,
        "name": study.get("name"),
        "description": study.get("description"),
        "created_at": created_at,
        "state": state,
        "cells_done": cells_done,
        "cells_total": cells_total,
        "wall_s": wall_s,
        "runs_per_s": runs_per_s,
        "train_s": train_s,
        "compile_s": compile_s,
        "executor": executor,
        "baseline": study.get("baseline"),
        "environment": environment,
        "study": study,
        "variants": variants,
        "comparisons": comparisons,  # type: ignore[typeddict-item]
        "verdict_metric": choice["verdict_metric"],
        "metric_note": choice["metric_note"],
        "metric_warning": choice["metric_warning"],
        "verdict_rule": RULE,
        "checks": checks,  # type: ignore[typeddict-item]
        "explain": explain,
        "divergence": divergence or {},
        "dynamics": dynamics or {},
        "sweep": sweep_effects(study, comparisons),
        "analysed": analysed,  # checks and explain exist only for a run that finished
        "resumable": state in ("interrupted", "failed", "killed"),
    }


def verdict_metric(variants: dict[str, Any], comparisons: list[dict[str, Any]]) -> dict[str, Any]:
    """``verdict_metric``, ``metric_note`` and ``metric_warning`` of a document: the
    comparisons' (``ablab.stats.verdicts.compare``), else the summary's headline metric."""
    if comparisons:
        first = comparisons[0]
        return {
            "verdict_metric": first["metric"],
            "metric_note": first.get("metric_note") or "",
            "metric_warning": first.get("metric_warning") or "",
        }
    headline = next(iter(variants.values()))["metric"] if variants else None
    return {"verdict_metric": headline, "metric_note": "", "metric_warning": ""}


def stored_histories(run_dir: RunDir, variants: list[str]) -> dict[str, VariantHistory]:
    """The stored histories of ``variants`` (each must have a finished cell), read one variant
    at a time so the peak memory follows one arm, not the whole run."""
    return {v: variant_histories(run_dir.history(v, run_id=False))[v] for v in variants}


def load_run(run_dir: RunDir) -> tuple[RunDocument, dict[str, VariantHistory]]:
    """A stored run as ``ablab show RUN`` sees it: the document (metadata, state, a summary and
    comparisons recomputed from the finished cells) and the histories, in study order."""
    meta, status, saved, histories = _stored_parts(run_dir)
    return run_document(meta, status, saved, histories), histories


def load_finished_run(
    run_dir: RunDir, verb: str = "open"
) -> tuple[RunDocument, dict[str, VariantHistory]]:
    """:func:`load_run` of a run with at least one finished cell (else ``InputError``:
    nothing to ``verb``)."""
    doc, histories = load_run(run_dir)
    if not histories:
        raise InputError(
            where=str(run_dir.path),
            key="cells",
            expected="a run with at least one finished cell",
            got=f"state {doc['state']!r} with no finished cell",
            fix=f"{verb} a run that trained at least one seed chunk (`ablab show` lists runs)",
        )
    return doc, histories


def rejudge(
    run_dir: RunDir,
    *,
    metric: str | None = None,
    baseline: str | None = None,
    higher_is_better: bool | None = None,
    margin: float | None = None,
    margin_pct: float | None = None,
    alpha: float | None = None,
) -> RunDocument:
    """A stored run's document with its verdicts recomputed from the stored histories (no
    retraining) on ``metric`` (any recorded History name) and, where given, another baseline,
    direction, margin or alpha -- ``ablab compare RUN --metric NAME``. Raises
    ``ablab.InputError`` for a name the run did not record or a variant it does not have."""
    meta, status, saved, histories = _stored_parts(run_dir)
    where = str(run_dir.path)
    recorded = list(dict.fromkeys(n for h in histories.values() for n in h.values))
    if metric is not None and not all(metric in h.values for h in histories.values()):
        raise InputError(
            where=where,
            key="--metric",
            expected=f"a History name every variant recorded, one of {recorded}",
            got=repr(metric),
            fix=f"use one of {', '.join(recorded)}",
        )
    if baseline is not None and baseline not in histories:
        raise InputError(
            where=where,
            key="--baseline",
            expected=f"a variant of the run, one of {list(histories)}",
            got=repr(baseline),
            fix="use one of the run's variant names",
        )
    study = dict(meta["study"])
    updates: dict[str, Any] = {"metric": metric, "higher_is_better": higher_is_better}
    updates.update(alpha=alpha)
    if margin is not None or margin_pct is not None:  # one replaces the other
        updates.update(margin=margin, margin_pct=margin_pct, force=True)
    force = updates.pop("force", False)
    verdicts = dict(study.get("verdicts") or {})
    if metric is not None and metric != verdicts.get("metric"):
        # another metric: the stored direction, margin and effect were in the old metric's
        # terms (accuracy's "higher is better" would invert a loss), so they go back to
        # their defaults for the new one unless given here
        for key in ("higher_is_better", "margin", "margin_pct", "effect"):
            verdicts.pop(key, None)
    verdicts.update({k: v for k, v in updates.items() if v is not None or force})
    try:
        VerdictSpec.model_validate(verdicts)
    except ValidationError as exc:
        raise to_study_error(exc, where, prefix="verdicts") from exc
    study["verdicts"] = verdicts
    if baseline is not None:
        study["baseline"] = baseline
    return run_document({**meta, "study": study}, status, saved, histories)


def _stored_parts(
    run_dir: RunDir,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, VariantHistory]]:
    """``(meta, status, saved, histories)`` of a stored run, for :func:`run_document`."""
    meta = run_dir.read_json("study.json")
    status = run_dir.read_json("status.json")
    if status["state"] == "running" and not run_dir.is_running():
        status = {**status, "state": "killed"}  # marked running, but its process is gone
    cells = run_dir.intact(run_dir.cell_files())  # a damaged cell: skipped, with a warning
    present = list(dict.fromkeys(f.parent.name for f in cells))
    declared = list(meta["study"].get("variants", {}))
    order = [v for v in declared if v in present] + [v for v in present if v not in declared]
    histories = stored_histories(run_dir, order)
    saved = run_dir.read_json("summary.json") if (run_dir.path / "summary.json").exists() else {}
    meta = {**meta, "run_id": run_dir.run_id, "run_dir": str(run_dir.path)}
    return meta, status, saved, histories


def run_document(
    meta: dict[str, Any],
    status: dict[str, Any],
    saved: dict[str, Any],
    histories: dict[str, VariantHistory],
) -> RunDocument:
    """The document of a stored run from its parts: ``meta`` (study.json plus run_id /
    run_dir), ``status`` (status.json), ``saved`` (summary.json, {} if the run never finished)
    and the histories of its finished cells; summary, comparisons and divergence are
    recomputed."""
    baseline = meta["study"].get("baseline")
    spec = VerdictSpec.model_validate(meta["study"].get("verdicts") or {})
    comparable = spec.pairs or baseline in histories  # a sweep's pairs: any finished point
    comparisons = (
        compare(histories, baseline, spec, study=meta["study"])
        if comparable and len(histories) > 1
        else []
    )
    rows = [c.to_json() for c in comparisons]
    return build_document(
        run_id=meta["run_id"],
        run_dir=meta["run_dir"],
        study=meta["study"],
        state=status["state"],
        variants=summarize(histories),
        comparisons=rows,
        checks=saved.get("checks", []),
        explain=saved.get("explain", {}),
        wall_s=saved.get("wall_s"),
        runs_per_s=saved.get("runs_per_s"),
        train_s=saved.get("train_s"),
        compile_s=saved.get("compile_s"),
        executor=saved.get("executor"),
        created_at=meta.get("created_at"),
        environment=meta["environment"],
        cells_done=status["cells_done"],
        cells_total=status["cells_total"],
        analysed=bool(saved),
        divergence=divergence_summary(histories, meta["study"]),
        dynamics=training_dynamics(
            histories,
            rows,
            metric=rows[0]["metric"] if rows else spec.metric,
            higher_is_better=spec.higher_is_better,
            confidence=spec.confidence,
        ),
    )


def load_result(run_dir: RunDir) -> RunDocument:
    """What ``ablab show RUN`` shows: metadata, state and a summary recomputed from the cells."""
    return load_run(run_dir)[0]
