"""The Ray executor on a real local cluster: a head node and a second node, each a separate
`ray start` process with 1 CPU, on 127.0.0.1. Cells trained there must equal the local
executor's bit for bit."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest

import ablab
from ablab.engine.build import build_program
from ablab.engine.data import load_dataset
from ablab.engine.program import VariantProgram
from ablab.engine.sizing import seed_chunks
from ablab.errors import InputError, StudyError
from ablab.execution.executors import Cell, CellResult, LocalExecutor
from tests.conftest import TINY_STUDY, require_extra

START_TIMEOUT_S = 120  # a cold `ray start` takes ~10 s here; CI machines may be slower


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop one `ray start --block` node and every process it started.

    SIGTERM makes the --block command stop its node's processes. Ray's workers sit in
    process groups of their own but keep the session the node was started in (its pid), so
    any straggler is found by that session id -- this cluster's processes and no others.
    """
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if p.pid != os.getpid() and os.getsid(p.pid) == proc.pid:
                p.kill()
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[str]:
    """A real two-node Ray cluster on this machine; yields its address ``127.0.0.1:PORT``.

    Each node is a `ray start --block` in its own session (process group) with its own
    temp dir, so tearing down stops exactly these processes -- unlike `ray stop`, which stops
    every Ray process of this user on the machine (another test run's, a developer's).
    Draining on SIGTERM is switched off: there is nothing to drain, and it waits 30 s.
    """
    require_extra("ray", "ray")
    import ray

    ray_bin = str(Path(sys.executable).parent / "ray")
    port = _free_port()
    address = f"127.0.0.1:{port}"
    # Short and private: Ray's unix sockets live in it (path length limit ~107 bytes), and
    # its ray_current_cluster file stays out of /tmp/ray, where a bare ray.init() looks.
    temp = tempfile.mkdtemp(prefix="ablab-ray-", dir="/tmp")
    env = {**os.environ, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    common = ["--num-cpus=1", "--disable-usage-stats", "--block", f"--temp-dir={temp}"]
    head_cmd = [ray_bin, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}"]
    head_cmd += ["--include-dashboard=false", *common]
    node_cmd = [ray_bin, "start", f"--address={address}", "--node-ip-address=127.0.0.1"]
    node_cmd += common
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[Path] = []

    def start(cmd: list[str], name: str) -> None:
        log = Path(temp) / f"{name}.log"
        logs.append(log)
        with log.open("wb") as out:
            procs.append(
                subprocess.Popen(
                    cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
                )
            )

    def fail(why: str) -> None:
        text = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in logs if p.exists())
        pytest.fail(f"the test's Ray cluster did not start: {why}\n{text}")

    t0 = time.monotonic()
    try:
        start(head_cmd, "head")
        while True:  # the head's GCS accepts connections
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if procs[0].poll() is not None or time.monotonic() - t0 > START_TIMEOUT_S:
                    fail("the head node never listened")
                time.sleep(0.2)
        start(node_cmd, "node")
        ray.init(address=address, log_to_driver=False, logging_level="ERROR")
        try:
            while sum(n["Alive"] for n in ray.nodes()) < 2:
                if any(p.poll() is not None for p in procs):
                    fail("a node exited")
                if time.monotonic() - t0 > START_TIMEOUT_S:
                    fail(f"{sum(n['Alive'] for n in ray.nodes())} node(s) alive")
                time.sleep(0.2)
        finally:
            ray.shutdown()
        print(f"ray cluster at {address}: 2 nodes up in {time.monotonic() - t0:.1f} s")
        yield address
    finally:
        for proc in reversed(procs):  # the second node first, then the head
            _stop(proc)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def tiny(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[ablab.Study, object, dict[str, VariantProgram], list[Cell]]:
    """The tiny study (2 variants x 6 seeds, chunks of 4: 4 cells), its rows, its local
    programs and its cells, planned as the run does."""
    path = tmp_path_factory.mktemp("ray") / "tiny.toml"
    path.write_text(TINY_STUDY)
    study = ablab.load_study(path)
    data = load_dataset(study)
    programs = {v: build_program(study, v, data) for v in study.variants}
    chunk = study.engine.chunk_size
    assert chunk is not None
    cells = [
        Cell(v, k, ids, real, programs[v].probes)
        for v in study.variants
        for k, ids, real in seed_chunks(study.seeds.base, study.seeds.count, chunk)
    ]
    return study, data, programs, cells


def _assert_identical(a: CellResult, b: CellResult) -> None:
    for part_a, part_b in zip(a, b, strict=True):
        assert (part_a is None) == (part_b is None)
        if part_a is None or part_b is None:
            continue
        assert part_a.keys() == part_b.keys()
        for name in part_a:
            x, y = part_a[name], part_b[name]
            assert x.dtype == y.dtype and x.shape == y.shape, name
            assert np.array_equal(x, y, equal_nan=True), name
            assert x.tobytes() == y.tobytes(), name  # the bits, -0.0 and NaN payloads too


@pytest.mark.slow
def test_cells_on_two_nodes_equal_the_local_executor_bit_for_bit(ray_cluster: str, tiny) -> None:
    from ablab.execution.ray_executor import RayExecutor

    study, data, programs, cells = tiny
    assert len(cells) == 4 and all(c.probes for c in cells)  # probes travel too
    local = {c.key: r for c, r in LocalExecutor(lambda c: programs[c.variant]).run_cells(cells)}
    executor = RayExecutor(study, data, address=ray_cluster)
    try:
        remote = {c.key: r for c, r in executor.run_cells(cells)}
    finally:
        executor.close()
    assert remote.keys() == local.keys()
    for key in local:
        _assert_identical(local[key], remote[key])
        assert remote[key][0]["loss"].flags.writeable  # own arrays, not object-store views
    placements = executor.placements.values()
    assert len({w["node"] for w in placements}) == 2  # both nodes trained cells
    assert len({(w["node"], w["pid"]) for w in placements}) >= 2
    assert all(w["pid"] != os.getpid() for w in placements)


@pytest.mark.slow
def test_ablab_run_with_ray_executor_stores_the_local_run(ray_cluster: str, tmp_path: Path) -> None:
    """End to end: `ablab run STUDY --executor ray --address ADDR` stores the same history
    and probes, and prints the same verdicts, as the local executor."""
    import json

    from ablab.store.rundir import RunDir

    path = tmp_path / "tiny.toml"
    path.write_text(TINY_STUDY)
    local = ablab.run(path, runs_dir=tmp_path / "local")
    ablab_cli = str(Path(sys.executable).parent / "ablab")
    cmd = [ablab_cli, "run", str(path), "--runs-dir", str(tmp_path / "ray"), "--json"]
    done = subprocess.run(
        [*cmd, "--executor", "ray", "--address", ray_cluster],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    remote = RunDir(Path(doc["run_dir"]))

    def rows(run: RunDir, probes: bool = False) -> object:
        table = (run.probes() if probes else run.history()).drop_columns(["run_id"])
        keys = ["variant", "seed", "epoch"] + (["kind", "probe", "step"] if probes else [])
        return table.sort_by([(k, "ascending") for k in keys])

    assert rows(remote).equals(rows(RunDir(local.run_dir)))
    assert rows(remote, True).equals(rows(RunDir(local.run_dir), True))
    assert doc["comparisons"] == json.loads(json.dumps(local.to_json()["comparisons"]))


def test_driver_refuses_a_worker_with_other_versions(ray_cluster: str, tiny) -> None:
    """The worker compares before training (nothing compiled) and the driver refuses."""
    from ablab.execution.ray_executor import RayExecutor, WorkerMismatch, environment_fingerprint

    study, data, _, cells = tiny
    executor = RayExecutor(study, data, address=ray_cluster)
    try:
        executor._fingerprint = {**environment_fingerprint(), "jax": "0.0.1"}
        with pytest.raises(WorkerMismatch, match=r"jax: worker \S+, driver 0\.0\.1"):
            list(executor.run_cells(cells))
    finally:
        executor.close()


def test_a_failing_cell_raises_the_original_error(ray_cluster: str, tiny) -> None:
    from ablab.execution.ray_executor import RayExecutor

    study, data, _, cells = tiny
    bad = Cell("no_such_variant", 0, cells[0].seed_ids, cells[0].real, False)
    executor = RayExecutor(study, data, address=ray_cluster)
    try:
        with pytest.raises(KeyError, match="no_such_variant") as info:
            list(executor.run_cells([bad]))
    finally:
        executor.close()
    assert "raised in a Ray worker" in "".join(getattr(info.value, "__notes__", []))


def test_check_worker_names_every_difference() -> None:
    from ablab.execution.ray_executor import WorkerMismatch, check_worker, environment_fingerprint

    driver = environment_fingerprint()
    check_worker(driver, dict(driver), {})  # equal: accepted
    worker = {**driver, "keras": "3.99.0", "XLA_FLAGS": "--xla_cpu_enable_fast_math=true"}
    where = {"host": "node7", "pid": 42, "node": "abc"}
    with pytest.raises(WorkerMismatch) as info:
        check_worker(driver, worker, where)
    text = str(info.value)
    assert f"keras: worker 3.99.0, driver {driver['keras']}" in text
    assert "XLA_FLAGS: worker --xla_cpu_enable_fast_math=true" in text
    assert "node7" in text and "how to fix" in text
    assert isinstance(info.value, ablab.AblabError) and info.value.exit_code == 1
    with pytest.raises(WorkerMismatch, match="ablab_source"):
        check_worker(driver, {k: v for k, v in driver.items() if k != "ablab_source"}, where)


def test_errors_keep_their_type_and_fields_across_the_wire() -> None:
    """ablab's StudyError (keyword-only __init__) does not survive plain pickling; the
    executor's own transport rebuilds it whole."""
    from ablab.execution.ray_executor import _Failure

    err = StudyError(where="s.toml", key="train.epochs", expected="a", got="b", fix="c")
    back = _Failure.of(err).rebuild({"host": "h", "pid": 1})
    assert type(back) is StudyError and str(back) == str(err)
    assert (back.where, back.key, back.fix) == ("s.toml", "train.epochs", "c")

    class Local(Exception):  # not importable by name: falls back to a RuntimeError
        pass

    back = _Failure.of(Local("boom")).rebuild({})
    assert isinstance(back, RuntimeError) and "Local: boom" in str(back)


def test_unreachable_cluster_fails_fast(tiny) -> None:
    require_extra("ray", "ray")
    import ray

    from ablab.execution.ray_executor import RayExecutor, RayExecutorError

    study, data, _, _ = tiny
    t0 = time.monotonic()
    with pytest.raises(RayExecutorError, match="cannot reach the Ray cluster"):
        RayExecutor(study, data, address=f"127.0.0.1:{_free_port()}")
    assert time.monotonic() - t0 < 15
    assert not ray.is_initialized()


def test_missing_ray_is_an_input_error(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    from ablab.execution.ray_executor import RayExecutor

    study, data, _, _ = tiny
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(InputError, match=r"pip install 'ablab\[ray\]'") as info:
        RayExecutor(study, data)
    assert info.value.exit_code == 2
