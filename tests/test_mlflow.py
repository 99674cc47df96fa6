"""`ablab export RUN --mlflow URI`: against a real `mlflow server` started on 127.0.0.1."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import ablab
from ablab.cli import main
from ablab.output.mlflow_export import variant_metrics, variant_params
from tests.conftest import require_extra


def test_params_are_the_study_with_only_this_variant() -> None:
    study = {
        "name": "s",
        "train": {"epochs": 3, "optimizer": "adam", "metrics": []},
        "variants": {
            "plain": {"layers": [{"layer": "Dense", "units": 8}], "description": "p"},
            "bn": {"layers": [{"layer": "BatchNormalization"}]},
        },
        "seeds": {"count": 12, "base": 0},
    }
    params = variant_params(study, "plain")
    assert params["train.epochs"] == "3" and params["seeds.count"] == "12"
    assert params["train.metrics"] == "[]" and params["name"] == "s"
    assert json.loads(params["variant.layers"]) == [{"layer": "Dense", "units": 8}]
    assert params["variant.name"] == "plain"
    assert not any("BatchNormalization" in v for v in params.values())


def test_metrics_aggregate_over_seeds_per_epoch() -> None:
    values = {"val_loss": np.array([[1.0, 0.5], [3.0, np.nan], [2.0, 0.7]])}
    summary = {
        "metric": "val_loss",
        "n_seeds": 3,
        "diverged": 1,
        "final_val_loss": {"mean": 0.6, "median": 0.6, "q05": None, "q95": 0.7},
    }
    cmp = {"baseline": "plain", "diff_mean": -0.1, "p_adjusted": 0.01, "n": 3}
    rows = variant_metrics(values, summary, [cmp])
    by_key = {(k, step): v for k, v, step in rows}
    assert by_key[("val_loss/median", 1)] == 2.0 and by_key[("val_loss/mean", 1)] == 2.0
    assert by_key[("val_loss/median", 2)] == pytest.approx(0.6)  # the NaN seed is left out
    assert by_key[("val_loss/q95", 1)] == pytest.approx(np.quantile([1.0, 2.0, 3.0], 0.95))
    assert ("final_val_loss/q05", 0) not in by_key
    assert by_key[("vs_baseline/diff_mean", 0)] == -0.1
    assert by_key[("diverged_seeds", 0)] == 1
    two = variant_metrics(values, summary, [cmp, {**cmp, "baseline": "other"}])
    assert {k for k, _, _ in two if k.endswith("/diff_mean")} == {
        "vs_plain/diff_mean",
        "vs_other/diff_mean",
    }


def test_an_unreachable_server_is_a_clear_failure(
    report_run: ablab.RunResult, capsys: pytest.CaptureFixture[str]
) -> None:
    require_extra("mlflow", "mlflow")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = main(["export", str(report_run.run_dir), "--mlflow", f"http://127.0.0.1:{port}"])
    assert code == 1
    assert "does not answer" in capsys.readouterr().err


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real MLflow tracking server (SQLite store, proxied artifacts) on 127.0.0.1."""
    require_extra("mlflow", "mlflow")
    root = tmp_path_factory.mktemp("mlflow")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = (root / "server.log").open("w")
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=root,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(uri + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                pytest.fail(f"mlflow server did not start:\n{(root / 'server.log').read_text()}")
            time.sleep(0.5)
        yield uri
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_export_logs_each_variant_as_an_mlflow_run(
    report_run: ablab.RunResult,
    mlflow_server: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from mlflow.tracking import MlflowClient

    run = str(report_run.run_dir)
    assert main(["export", run, "--mlflow", mlflow_server, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)  # MLflow's own chatter went to stderr
    assert [r["variant"] for r in doc["runs"]] == ["plain", "plain_id", "bn"]

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("report")  # the study's name
    runs = {r.data.tags["ablab.variant"]: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {"plain", "plain_id", "bn"}
    verdicts = {c.variant: c.verdict for c in report_run.comparisons}
    assert runs["bn"].data.tags["ablab.verdict"] == verdicts["bn"]
    assert runs["plain"].data.tags["ablab.verdict"] == "baseline"
    assert runs["plain"].data.tags["ablab.checks"] == "1 of 1 passed"
    assert runs["bn"].data.tags["ablab.run_id"] == report_run.run_id
    assert runs["bn"].data.params["train.epochs"] == "3"
    assert "BatchNormalization" in runs["bn"].data.params["variant.layers"]
    assert runs["bn"].info.status == "FINISHED"

    history = client.get_metric_history(runs["bn"].info.run_id, "val_loss/median")
    values = report_run.histories["bn"].values["val_loss"]
    assert [m.step for m in history] == [1, 2, 3]
    np.testing.assert_allclose([m.value for m in history], np.median(values, axis=0))
    cmp = next(c for c in report_run.comparisons if c.variant == "bn")
    assert runs["bn"].data.metrics["vs_baseline/diff_mean"] == pytest.approx(cmp.diff_mean)

    artifacts = {a.path for a in client.list_artifacts(runs["bn"].info.run_id)}
    assert {"report.html", "ablab_summary.json"} <= artifacts
    local = client.download_artifacts(runs["bn"].info.run_id, "report.html", str(tmp_path))
    assert 'data-plot="forest"' in Path(local).read_text()

    # a second export of the same run is refused (exit 2, nothing logged) unless --replace
    assert main(["export", run, "--mlflow", mlflow_server]) == 2
    assert "--replace" in capsys.readouterr().err
    assert len(client.search_runs([exp.experiment_id])) == 3
    assert main(["export", run, "--mlflow", mlflow_server, "--replace"]) == 0
    again = client.search_runs([exp.experiment_id])
    assert len(again) == 3 and {r.info.run_id for r in again}.isdisjoint(
        r.info.run_id for r in runs.values()
    )
