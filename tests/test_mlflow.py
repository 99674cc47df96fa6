"""`ablab export RUN --mlflow URI`: against a real `mlflow server` started on 127.0.0.1."""

from __future__ import annotations

import http.server
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ablab
from ablab.cli import main
from ablab.output.mlflow_export import variant_metrics, variant_params
from tests.conftest import TINY_STUDY, require_extra

# MLflow's SQLite store (in this process, not behind a server) uses a SQLAlchemy loader
# strategy that SQLAlchemy 2.1 deprecates; third-party and harmless.
SQLITE_WARNING = "ignore:The ``noload`` loader strategy is deprecated:DeprecationWarning"

# Three variants at one sweep point, 2 seeds, 1 epoch; `bn` is compared with two baselines
# (`[verdicts] pairs`), so its comparison metrics are named after arms: `vs_plain@...`.
SWEPT_STUDY = (
    TINY_STUDY.replace("epochs = 3", "epochs = 1")
    .replace("count = 6", "count = 2")
    .replace(
        "[variants.bn]",
        "[variants.twin]\n"
        'layers = [{ layer = "Dense", units = 8 }, { layer = "Dense", units = 12 }]\n'
        "[variants.bn]",
    )
    .replace("[engine]", "[probes]\nenabled = false\n[engine]")
    + '[verdicts]\npairs = [["bn", "plain"], ["bn", "twin"]]\n[sweep]\nlearning_rate = [0.01]\n'
)


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


def _experiment_id(client: Any, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    assert exp is not None, name
    return str(exp.experiment_id)


def _one_line_error(err: str) -> str:
    """The error line of a clean failure: no traceback, one `error:` line (and its fix)."""
    assert "Traceback" not in err and "mlflow.exceptions" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_mlflow_keys_are_valid_unique_and_keep_valid_names() -> None:
    require_extra("mlflow", "mlflow")
    from mlflow.utils.validation import _validate_metric_name, _validate_param_name

    from ablab.output.mlflow_export import mlflow_keys

    names = [
        "train.epochs",
        "val_loss/median",
        "plain@learning_rate=0.001",
        "plain_learning_rate_0.001",  # what the one above sanitises to: kept as it is
        "plain#learning_rate=0.001",  # sanitises to the same: must get another key
        "vs_plain@batch_size=16,learning_rate=0.01/diff_mean",
        "a//b",
        "/abs",
        "..",
        "x/./y",
        "",
        "é" * 300,
    ]
    keys = mlflow_keys(names)
    assert set(keys) == set(names)
    assert keys["train.epochs"] == "train.epochs" and keys["val_loss/median"] == "val_loss/median"
    assert keys["plain_learning_rate_0.001"] == "plain_learning_rate_0.001"
    assert keys["plain@learning_rate=0.001"].startswith("plain_learning_rate_0.001")
    assert len(set(keys.values())) == len(names)  # two names never share a key
    for key in keys.values():
        assert len(key) <= 250
        _validate_param_name(key)
        _validate_metric_name(key)
    assert mlflow_keys(reversed(names)) == keys  # the same whatever the order


def test_an_unknown_or_empty_uri_is_bad_input(
    report_run: ablab.RunResult, capsys: pytest.CaptureFixture[str]
) -> None:
    require_extra("mlflow", "mlflow")
    for uri in ("foo://bar", ""):
        assert main(["export", str(report_run.run_dir), "--mlflow", uri]) == 2
        assert "[--mlflow]" in _one_line_error(capsys.readouterr().err)


def test_a_file_store_uri_exports_or_is_refused_in_one_line(
    report_run: ablab.RunResult,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A plain path or file: URI is MLflow's file store; MLflow 3.x (newer ones) refuses it
    unless MLFLOW_ALLOW_FILE_STORE=true: exit 2 and the way out, never a traceback."""
    require_extra("mlflow", "mlflow")
    from mlflow.tracking import MlflowClient

    run = str(report_run.run_dir)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    try:
        MlflowClient(f"file://{tmp_path / 'probe'}").search_experiments()
        refused = False
    except Exception:
        refused = True
    for uri in (f"file://{tmp_path / 'fs'}", str(tmp_path / "plain")):
        code = main(["export", run, "--mlflow", uri])
        err = capsys.readouterr().err
        if refused:
            assert code == 2
            line = _one_line_error(err)
            assert "[--mlflow]" in line and "file store" in line
            assert "MLFLOW_ALLOW_FILE_STORE=true" in err and "sqlite:///" in err
        else:
            assert code == 0, err
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = f"file://{tmp_path / 'allowed'}"
    assert main(["export", run, "--mlflow", uri, "--experiment", "fs"]) == 0
    client = MlflowClient(uri)
    runs = client.search_runs([_experiment_id(client, "fs")])
    assert sorted(r.data.tags["ablab.variant"] for r in runs) == ["bn", "plain", "plain_id"]
    assert {r.info.status for r in runs} == {"FINISHED"}


@pytest.mark.filterwarnings(SQLITE_WARNING)
def test_a_sqlite_uri_exports_and_a_broken_one_is_one_line(
    report_run: ablab.RunResult,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    require_extra("mlflow", "mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)  # a SQLite store keeps its artifacts in ./mlruns
    run = str(report_run.run_dir)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["export", run, "--mlflow", uri]) == 0
    client = MlflowClient(uri)
    runs = client.search_runs([_experiment_id(client, "report")])
    assert len(runs) == 3 and {r.info.status for r in runs} == {"FINISHED"}
    capsys.readouterr()

    (tmp_path / "notes.txt").write_text("not a database\n" * 100)
    assert main(["export", run, "--mlflow", f"sqlite:///{tmp_path / 'notes.txt'}"]) == 2
    assert "[--mlflow]" in _one_line_error(capsys.readouterr().err)


class _NotMlflow(http.server.BaseHTTPRequestHandler):
    """A web server that answers /health but is no MLflow tracking server."""

    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
        self.wfile.write(b"OK" if self.path == "/health" else b"not found")

    do_POST = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_a_server_that_is_not_mlflow_is_a_one_line_failure(
    report_run: ablab.RunResult,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    require_extra("mlflow", "mlflow")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotMlflow)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        uri = f"http://127.0.0.1:{server.server_address[1]}"
        assert main(["export", str(report_run.run_dir), "--mlflow", uri]) == 1
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    line = _one_line_error(capsys.readouterr().err)
    assert uri in line and "MLflow" in line


@pytest.fixture(scope="module")
def swept_run(tmp_path_factory: pytest.TempPathFactory) -> ablab.RunResult:
    root = tmp_path_factory.mktemp("swept")
    (root / "swept.toml").write_text(SWEPT_STUDY)
    return ablab.run(root / "swept.toml", runs_dir=root / "runs")


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
    exp_id = _experiment_id(client, "report")  # the study's name
    runs = {r.data.tags["ablab.variant"]: r for r in client.search_runs([exp_id])}
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
    assert len(client.search_runs([exp_id])) == 3
    assert main(["export", run, "--mlflow", mlflow_server, "--replace"]) == 0
    again = client.search_runs([exp_id])
    assert len(again) == 3 and {r.info.run_id for r in again}.isdisjoint(
        r.info.run_id for r in runs.values()
    )


def test_a_swept_run_exports_with_valid_keys_and_their_map(
    swept_run: ablab.RunResult, mlflow_server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Arm names (`bn@learning_rate=0.01`) hold `@` and `=`, which MLflow keys may not."""
    from mlflow.tracking import MlflowClient

    run = str(swept_run.run_dir)
    assert main(["export", run, "--mlflow", mlflow_server, "--experiment", "swept"]) == 0, (
        capsys.readouterr().err
    )
    client = MlflowClient(mlflow_server)
    exp_id = _experiment_id(client, "swept")
    runs = {r.data.tags["ablab.variant"]: r for r in client.search_runs([exp_id])}
    arm = "bn@learning_rate=0.01"
    assert set(runs) == {arm, "plain@learning_rate=0.01", "twin@learning_rate=0.01"}
    assert {r.info.status for r in runs.values()} == {"FINISHED"}
    bn = runs[arm].data
    # this arm's own definition, as the variant's own definition is
    assert bn.params["arm.variant"] == "bn" and bn.params["arm.point.learning_rate"] == "0.01"
    assert bn.params["variant.name"] == arm
    assert "BatchNormalization" in bn.params["variant.layers"]
    assert not any("plain@" in k or "twin@" in k for k in bn.params)
    # each original name that needed a new key is in the map, and the map leads to the value
    keys = json.loads(bn.tags["ablab.keys"])
    for baseline in ("plain", "twin"):
        cmp = next(
            c for c in swept_run.comparisons if c.variant == arm and c.baseline.startswith(baseline)
        )
        key = keys[f"vs_{baseline}@learning_rate=0.01/diff_mean"]
        assert "@" not in key and "=" not in key
        assert bn.metrics[key] == pytest.approx(cmp.diff_mean)
    assert bn.tags["ablab.export"] == "complete"


def test_a_failed_export_leaves_no_run_behind(
    report_run: ablab.RunResult,
    mlflow_server: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The tracking server fails half-way (the second variant's metrics): the runs this export
    created are deleted, and the failure is one line (exit 1)."""
    from mlflow.entities import ViewType
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    original = MlflowClient.log_batch
    seen: list[str] = []

    def failing(self: MlflowClient, run_id: str, **kwargs: Any) -> Any:
        if run_id not in seen:
            seen.append(run_id)
        if len(seen) == 2 and kwargs.get("metrics"):
            raise MlflowException("the tracking server broke")
        return original(self, run_id, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", failing)
    run = str(report_run.run_dir)
    assert main(["export", run, "--mlflow", mlflow_server, "--experiment", "broken"]) == 1
    assert "the tracking server broke" in _one_line_error(capsys.readouterr().err)
    monkeypatch.setattr(MlflowClient, "log_batch", original)

    client = MlflowClient(mlflow_server)
    exp_id = _experiment_id(client, "broken")
    assert client.search_runs([exp_id]) == []
    gone = client.search_runs([exp_id], run_view_type=ViewType.ALL)
    assert len(gone) == 2 and {r.info.lifecycle_stage for r in gone} == {"deleted"}
    # nothing stands in the way of exporting it again
    assert main(["export", run, "--mlflow", mlflow_server, "--experiment", "broken"]) == 0
    assert len(client.search_runs([exp_id])) == 3
