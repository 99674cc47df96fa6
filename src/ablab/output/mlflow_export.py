"""Export a stored run to MLflow: one MLflow run per variant.

Each variant's MLflow run gets the study as params (the resolved study with this variant's
own definition), the per-epoch history aggregated over seeds as metrics (``<name>/mean``,
``/median``, ``/q05``, ``/q95`` at step = epoch), the final-epoch summary and the paired
comparison against its baseline as metrics, the verdict and run facts as tags, and the HTML
report and the run's summary as artifacts. Runs of one export share the tag
``ablab.run_id``; exporting the same ablab run twice is refused unless ``replace``.

MLflow keys may hold only alphanumerics, ``_ - . /`` and spaces; a name with anything else
(a sweep arm's ``plain@learning_rate=0.01`` in ``vs_<baseline>/...``) is logged under a
sanitised, unique key (:func:`mlflow_keys`), and the run's ``ablab.keys`` tag holds the JSON
map from each such original name to its key. An export is all or nothing: its runs carry
``ablab.export = incomplete`` until every variant is logged, and if anything fails on the way
the MLflow runs it created are deleted. MLflow's own failures (a URI it cannot open, a server
that is not MLflow, an error half-way) come out as one :class:`AblabError` line: exit 2 for a
URI that cannot be used, 1 for a server that fails.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import posixpath
import re
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ablab.errors import AblabError, InputError
from ablab.stats.summary import spread
from ablab.store.rundir import RunDir

PARAM_LIMIT = 6000  # MLflow's longest param value
TAG_LIMIT = 5000  # MLflow tags hold up to 8000 characters
_BATCH = 900  # MLflow accepts at most 1000 metrics per log_batch
KEY_LIMIT = 250  # MLflow's longest param / metric / tag key
_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-. /]")  # what no MLflow version accepts in a key
_FILE_STORE_FIX = (
    "use a database store, e.g. --mlflow sqlite:///mlflow.db (`mlflow migrate-filestore` "
    "converts an existing ./mlruns), or set MLFLOW_ALLOW_FILE_STORE=true to use the file store"
)


def _is_http(uri: str) -> bool:
    return uri.lower().startswith(("http://", "https://"))


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message (MLflow's run to pages), at most 300 chars."""
    lines = str(exc).strip().splitlines()
    text = lines[0].strip() if lines else type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _valid_key(name: str) -> bool:
    """Whether MLflow (any version since 1.x) takes ``name`` as a param / metric key."""
    return (
        0 < len(name) <= KEY_LIMIT
        and not _KEY_BAD.search(name)
        and posixpath.normpath(name) == name  # no "a//b", "a/./b", trailing "/"
        and not name.startswith(("/", ".."))
        and name != "."
    )


def _sanitise(name: str) -> str:
    text = _KEY_BAD.sub("_", name)
    key = "/".join("_" if part in ("", ".", "..") else part for part in text.split("/"))
    if len(key) > KEY_LIMIT:  # cut, with a digest of the whole name to keep it distinct
        digest = hashlib.sha1(name.encode("utf-8")).hexdigest()[:10]
        key = f"{key[: KEY_LIMIT - 11]}-{digest}"
    return key


def mlflow_keys(names: Iterable[str]) -> dict[str, str]:
    """Each name's MLflow key: the name itself where MLflow accepts it, else the name with
    every character MLflow refuses as ``_`` (and empty, ``.`` or ``..`` path parts as ``_``),
    made unique by ``-2``, ``-3``, ... -- a name never takes another name's key, and the
    result does not depend on the order of ``names``."""
    unique = sorted(set(names))
    out = {name: name for name in unique if _valid_key(name)}
    used = set(out)
    for name in unique:
        if name in out:
            continue
        base = key = _sanitise(name)
        n = 1
        while key in used or not _valid_key(key):
            n += 1
            suffix = f"-{n}"
            key = base[: KEY_LIMIT - len(suffix)] + suffix
        out[name] = key
        used.add(key)
    return out


def _key_map_tags(keys: Mapping[str, str]) -> dict[str, str]:
    """``ablab.keys`` (then ``ablab.keys.2``, ... if it outgrows one tag): JSON objects that
    together map each renamed original name to its MLflow key."""
    renamed = {name: key for name, key in sorted(keys.items()) if name != key}
    chunks: list[dict[str, str]] = []
    for name, key in renamed.items():
        if not chunks or len(json.dumps({**chunks[-1], name: key})) > TAG_LIMIT:
            chunks.append({})
        chunks[-1][name] = key
    return {
        "ablab.keys" if i == 0 else f"ablab.keys.{i + 1}": json.dumps(chunk)
        for i, chunk in enumerate(chunks)
    }


def _client(uri: str) -> Any:
    if not uri.strip():
        raise InputError(
            where="ablab export",
            key="--mlflow",
            expected="an MLflow tracking URI",
            got="an empty string",
            fix="pass e.g. --mlflow sqlite:///mlflow.db or --mlflow http://127.0.0.1:5000",
        )
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
    if _is_http(uri):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10) as resp:
                resp.read()
        except (urllib.error.URLError, OSError) as exc:
            raise AblabError(
                f"ablab export: [--mlflow] the MLflow server at {uri} does not answer ({exc})",
                fix="start it (`mlflow server --host 127.0.0.1 --port 5000`) or pass the URI "
                "of one that runs",
            ) from exc
    try:
        return MlflowClient(tracking_uri=uri)
    except Exception as exc:
        raise _uri_error(uri, exc) from exc


def _uri_error(uri: str, exc: Exception) -> AblabError:
    """An error of MLflow's while opening ``uri``, as one line: a server that is not (a
    working) MLflow is a failure (exit 1); a URI MLflow cannot use is bad input (exit 2)."""
    if _is_http(uri):
        return AblabError(
            f"ablab export: [--mlflow] {uri} answers, but not as an MLflow tracking server: "
            f"{_first_line(exc)}",
            fix="pass the URI of an `mlflow server` (`mlflow server --host 127.0.0.1 "
            "--port 5000` starts one)",
        )
    if "MLFLOW_ALLOW_FILE_STORE" in str(exc):
        import mlflow

        return InputError(
            where="ablab export",
            key="--mlflow",
            expected="a tracking URI this MLflow accepts",
            got=f"{uri!r}, a file store (a path or file: URI), which MLflow "
            f"{mlflow.__version__} refuses by default",
            fix=_FILE_STORE_FIX,
        )
    if isinstance(exc, ImportError):
        return InputError(
            where="ablab export",
            key="--mlflow",
            expected="a tracking URI whose store MLflow can open",
            got=f"{uri!r}, whose store needs the Python module {exc.name or '?'}, "
            "which is not installed",
            fix=f"install the database driver that provides {exc.name or 'it'} (pip install ...)",
        )
    return InputError(
        where="ablab export",
        key="--mlflow",
        expected="a tracking URI MLflow can open (sqlite:///path.db, postgresql://..., "
        "http(s)://host:port, a path or file: URI)",
        got=f"{uri!r}: {_first_line(exc)}",
        fix="check the URI; `mlflow server --backend-store-uri URI` accepts the same ones",
    )


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        text = value if isinstance(value, str) else json.dumps(value)
        out[prefix] = text[:PARAM_LIMIT]


def variant_params(study: dict[str, Any], variant: str) -> dict[str, str]:
    """The resolved study flattened to ``section.key`` params, with only this variant's
    definition (under ``variant.``) instead of every variant's -- and in a swept study only
    this arm's variant and sweep point (``arm.variant``, ``arm.point.<axis>``) instead of
    every arm's. Keys are the study's names (see :func:`mlflow_keys` for MLflow's)."""
    out: dict[str, str] = {}
    for section, value in study.items():
        if section in ("variants", "arms"):
            continue
        _flatten(section, value, out)
    _flatten("variant", study.get("variants", {}).get(variant, {}), out)
    out["variant.name"] = variant
    arm = (study.get("arms") or {}).get(variant)
    if arm:
        _flatten("arm", arm, out)
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
    created: list[str],
) -> dict[str, str]:
    """One variant as one MLflow run, left RUNNING and tagged ``ablab.export = incomplete``
    (its id appended to ``created`` first thing): :func:`export_mlflow` completes the runs
    once every variant is logged, or deletes them."""
    from mlflow.entities import Metric, Param

    comparisons = [c for c in doc["comparisons"] if c["variant"] == variant]
    failed = [c["name"] for c in doc["checks"] if c["passed"] is False]
    if variant == doc["baseline"] and not comparisons:
        verdict = "baseline"
    else:
        verdict = ", ".join(c["verdict"] for c in comparisons) or "none"
    params = variant_params(doc["study"], variant)
    rows = variant_metrics(values, doc["variants"][variant], comparisons)
    keys = mlflow_keys([*params, *(name for name, _, _ in rows)])
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
        "ablab.export": "incomplete",
        **_key_map_tags(keys),
    }
    description = doc["study"]["variants"].get(variant, {}).get("description")
    if description:
        tags["mlflow.note.content"] = description[:TAG_LIMIT]
    run = client.create_run(exp_id, run_name=f"{doc['run_id']}/{variant}", tags=tags)
    run_id = run.info.run_id
    created.append(run_id)
    param_list = [Param(keys[k], v) for k, v in params.items()]
    for i in range(0, len(param_list), 100):
        client.log_batch(run_id, params=param_list[i : i + 100])
    now = int(time.time() * 1000)
    metrics = [Metric(keys[k], v, now, step) for k, v, step in rows]
    for i in range(0, len(metrics), _BATCH):
        client.log_batch(run_id, metrics=metrics[i : i + _BATCH])
    for path in artifacts:
        client.log_artifact(run_id, str(path))
    return {"variant": variant, "mlflow_run_id": run_id, "experiment_id": exp_id}


def _delete_runs(client: Any, run_ids: list[str], *, kill: bool) -> list[str]:
    """Delete (MLflow's soft delete) each run; return the ids that could not be deleted.
    ``kill``: mark those KILLED (this export's own runs, still tagged ``ablab.export =
    incomplete``), where the store lets us."""
    left: list[str] = []
    for run_id in run_ids:
        try:
            client.delete_run(run_id)
        except Exception:
            left.append(run_id)
            if kill:
                with contextlib.suppress(Exception):
                    client.set_terminated(run_id, "KILLED")
    return left


def _open_experiment(client: Any, uri: str, name: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is None:
        return str(client.create_experiment(name))
    if found.lifecycle_stage != "active":
        raise InputError(
            where=uri,
            key="--experiment",
            expected="an active MLflow experiment (or a new name)",
            got=f"experiment {name!r} (id {found.experiment_id}) is deleted",
            fix=f"restore it (`mlflow experiments restore --experiment-id "
            f"{found.experiment_id}`) or pass --experiment with another name",
        )
    return str(found.experiment_id)


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
        try:
            exp_id = _open_experiment(client, uri, name)
            previous = client.search_runs([exp_id], f"tags.`ablab.run_id` = '{doc['run_id']}'")
        except AblabError:
            raise
        except Exception as exc:
            raise _uri_error(uri, exc) from exc
        if previous and not replace:
            raise InputError(
                where=uri,
                key="RUN",
                expected="an ablab run not exported to this experiment yet",
                got=f"{doc['run_id']} is already there as {len(previous)} MLflow run(s) in "
                f"experiment {name!r}",
                fix="pass --replace to delete those MLflow runs and export again",
            )
        created: list[str] = []
        stage = "creating the runs"
        with tempfile.TemporaryDirectory() as tmp:
            report = Path(tmp) / "report.html"
            report.write_text(data.html(), encoding="utf-8")
            summary = Path(tmp) / "ablab_summary.json"
            summary.write_text(json.dumps(doc, indent=2, default=str), encoding="utf-8")
            try:
                out = []
                for variant, history in data.histories.items():
                    stage = f"logging variant {variant!r}"
                    row = _log_variant(
                        client, exp_id, doc, variant, history.values, (report, summary), created
                    )
                    out.append(row)
                stage = "completing the export"
                for run_id in created:  # complete only once every variant is in
                    client.set_tag(run_id, "ablab.export", "complete")
                    client.set_terminated(run_id, "FINISHED")
            except BaseException as exc:
                left = _delete_runs(client, created, kill=True)
                if isinstance(exc, (AblabError, KeyboardInterrupt, SystemExit)):
                    raise
                cleanup = (
                    f"the {len(created)} MLflow run(s) it had created were deleted"
                    if not left
                    else f"MLflow run(s) {', '.join(left)} could not be deleted and are "
                    "tagged ablab.export = incomplete"
                )
                raise AblabError(
                    f"ablab export: MLflow at {uri} failed while {stage}: {_first_line(exc)}; "
                    f"nothing was exported ({cleanup})",
                    fix="run the export again once the tracking server works"
                    + ("; delete the leftovers (`mlflow runs delete --run-id ID`)" if left else ""),
                ) from exc
        failed_old = _delete_runs(client, [old.info.run_id for old in previous], kill=False)
        if failed_old:  # the new export is complete; only the old one is left over
            raise AblabError(
                f"ablab export: exported {doc['run_id']} to {uri}, but the earlier export's "
                f"MLflow run(s) {', '.join(failed_old)} could not be deleted",
                fix="delete them by hand (`mlflow runs delete --run-id ID`)",
            )
    return out
