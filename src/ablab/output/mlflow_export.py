"""Export a stored run to MLflow: one MLflow run per variant.

Each variant's MLflow run gets the study as params (the resolved study with this variant's
own definition), the per-epoch history aggregated over seeds as metrics (``<name>/mean``,
``/median``, ``/q05``, ``/q95`` at step = epoch), the final-epoch summary and the paired
comparison against its baseline as metrics, the verdict and run facts as tags, and the HTML
report and the run's summary as artifacts. Runs of one export share the tag
``ablab.run_id``; exporting the same ablab run twice is refused unless ``replace``.
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ablab.errors import AblabError, InputError
from ablab.stats.summary import spread
from ablab.store.rundir import RunDir

PARAM_LIMIT = 6000  # MLflow's longest param value
TAG_LIMIT = 5000  # MLflow tags hold up to 8000 characters
_BATCH = 900  # MLflow accepts at most 1000 metrics per log_batch


def _client(uri: str) -> Any:
    try:
        from mlflow.tracking import MlflowClient
    except ImportError as exc:
        raise InputError(
            where="ablab export",
            key="--mlflow",
            expected="the mlflow package",
            got="it is not installed",
            fix="pip install 'ablab[mlflow]'",
        ) from exc
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10) as resp:
                resp.read()
        except (urllib.error.URLError, OSError) as exc:
            raise AblabError(
                f"ablab export: [--mlflow] the MLflow server at {uri} does not answer ({exc})",
                fix="start it (`mlflow server --host 127.0.0.1 --port 5000`) or pass the URI "
                "of one that runs",
            ) from exc
    return MlflowClient(tracking_uri=uri)


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        text = value if isinstance(value, str) else json.dumps(value)
        out[prefix] = text[:PARAM_LIMIT]


def variant_params(study: dict[str, Any], variant: str) -> dict[str, str]:
    """The resolved study flattened to ``section.key`` params, with only this variant's
    definition (under ``variant.``) instead of every variant's."""
    out: dict[str, str] = {}
    for section, value in study.items():
        if section == "variants":
            continue
        _flatten(section, value, out)
    _flatten("variant", study.get("variants", {}).get(variant, {}), out)
    out["variant.name"] = variant
    return out


def variant_metrics(
    values: dict[str, np.ndarray], summary: dict[str, Any], comparisons: list[dict[str, Any]]
) -> list[tuple[str, float, int]]:
    """(key, value, step) rows: per-epoch quantiles over seeds of every history name, the
    final summary, and each comparison of this variant (``vs_baseline/...`` for its one
    baseline; ``vs_<baseline>/...`` when ``[verdicts] pairs`` gives it several). Non-finite
    values are left out."""
    rows: list[tuple[str, float, int]] = []
    for name, arr in values.items():
        clean = np.where(np.isfinite(arr), arr, np.nan)
        for epoch in range(clean.shape[1]):
            col = clean[:, epoch]
            if not np.isfinite(col).any():
                continue
            q05, q50, q95 = spread(col)
            for stat, v in (("mean", np.nanmean(col)), ("median", q50), ("q05", q05), ("q95", q95)):
                rows.append((f"{name}/{stat}", float(v), epoch + 1))
    metric = summary["metric"]
    for stat, v in summary[f"final_{metric}"].items():
        if v is not None:
            rows.append((f"final_{metric}/{stat}", float(v), 0))
    rows.append(("n_seeds", float(summary["n_seeds"]), 0))
    rows.append(("diverged_seeds", float(summary["diverged"]), 0))
    for comparison in comparisons:
        prefix = "vs_baseline" if len(comparisons) == 1 else f"vs_{comparison['baseline']}"
        for key in (
            "diff_mean",
            "ci_low",
            "ci_high",
            "diff_median",
            "rel_diff",
            "prob_better",
            "cliffs_delta",
            "p_value",
            "p_adjusted",
            "p_tost",
            "margin",
            "seeds_needed",
            "diverged",
            "baseline_diverged",
            "p_diverged",
        ):
            if comparison.get(key) is not None:
                rows.append((f"{prefix}/{key}", float(comparison[key]), 0))
    return [r for r in rows if np.isfinite(r[1])]


def _log_variant(
    client: Any,
    exp_id: str,
    doc: Mapping[str, Any],
    variant: str,
    values: dict[str, np.ndarray],
    artifacts: tuple[Path, ...],
) -> dict[str, str]:
    """One variant as one MLflow run; marked FAILED if logging breaks half-way."""
    from mlflow.entities import Metric, Param

    comparisons = [c for c in doc["comparisons"] if c["variant"] == variant]
    failed = [c["name"] for c in doc["checks"] if c["passed"] is False]
    if variant == doc["baseline"] and not comparisons:
        verdict = "baseline"
    else:
        verdict = ", ".join(c["verdict"] for c in comparisons) or "none"
    tags = {
        "ablab.run_id": doc["run_id"],
        "ablab.study": str(doc["name"]),
        "ablab.variant": variant,
        "ablab.baseline": ", ".join(c["baseline"] for c in comparisons) or str(doc["baseline"]),
        "ablab.verdict": verdict,
        "ablab.verdict_metric": comparisons[0]["metric"] if comparisons else "",
        "ablab.state": doc["state"],
        "ablab.checks": (
            f"{len(doc['checks']) - len(failed)} of {len(doc['checks'])} passed"
            + (f"; failed: {', '.join(failed)}" if failed else "")
        )[:TAG_LIMIT],
        "ablab.keras": str(doc["environment"]["versions"].get("keras")),
        "ablab.jax": str(doc["environment"]["versions"].get("jax")),
    }
    description = doc["study"]["variants"].get(variant, {}).get("description")
    if description:
        tags["mlflow.note.content"] = description[:TAG_LIMIT]
    run = client.create_run(exp_id, run_name=f"{doc['run_id']}/{variant}", tags=tags)
    run_id = run.info.run_id
    try:
        params = [Param(k, v) for k, v in variant_params(doc["study"], variant).items()]
        for i in range(0, len(params), 100):
            client.log_batch(run_id, params=params[i : i + 100])
        now = int(time.time() * 1000)
        metrics = [
            Metric(k, v, now, step)
            for k, v, step in variant_metrics(values, doc["variants"][variant], comparisons)
        ]
        for i in range(0, len(metrics), _BATCH):
            client.log_batch(run_id, metrics=metrics[i : i + _BATCH])
        for path in artifacts:
            client.log_artifact(run_id, str(path))
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return {"variant": variant, "mlflow_run_id": run_id, "experiment_id": exp_id}


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """MLflow prints "View run ..." links on stdout; keep stdout for ablab's own output."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def export_mlflow(
    run_dir: RunDir,
    uri: str,
    *,
    experiment: str | None = None,
    replace: bool = False,
) -> list[dict[str, str]]:
    """Log every variant of ``run_dir`` as an MLflow run on the tracking server ``uri``.

    experiment: the MLflow experiment (default: the study's name; created if missing).
    Returns ``[{"variant", "mlflow_run_id", "experiment_id"}]``.
    """
    from ablab.output.report import ReportData

    data = ReportData.from_run(run_dir)
    doc = data.doc
    name = experiment or doc["name"] or doc["run_id"]
    with _stdout_to_stderr():
        client = _client(uri)
        found = client.get_experiment_by_name(name)
        exp_id = found.experiment_id if found is not None else client.create_experiment(name)
        previous = client.search_runs([exp_id], f"tags.`ablab.run_id` = '{doc['run_id']}'")
        if previous and not replace:
            raise InputError(
                where=uri,
                key="RUN",
                expected="an ablab run not exported to this experiment yet",
                got=f"{doc['run_id']} is already there as {len(previous)} MLflow run(s) in "
                f"experiment {name!r}",
                fix="pass --replace to delete those MLflow runs and export again",
            )
        with tempfile.TemporaryDirectory() as tmp:
            report = Path(tmp) / "report.html"
            report.write_text(data.html(), encoding="utf-8")
            summary = Path(tmp) / "ablab_summary.json"
            summary.write_text(json.dumps(doc, indent=2, default=str), encoding="utf-8")
            out = [
                _log_variant(client, exp_id, doc, variant, history.values, (report, summary))
                for variant, history in data.histories.items()
            ]
        for old in previous:  # only once the new export is complete
            client.delete_run(old.info.run_id)
    return out
