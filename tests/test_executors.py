"""The local executor: several chunk calls at once, the same bits as one at a time."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import ablab
from ablab._cli import main
from ablab._engine import MAX_DEFAULT_WORKERS, default_workers
from ablab._executors import Cell, CellResult, LocalExecutor
from ablab._run import _plan


class FakeProgram:
    """Stands in for a VariantProgram: ``run`` sleeps ``delays[chunk]`` seconds, records
    how many calls overlap, and fails for the chunks in ``fail``."""

    def __init__(self, delays: dict[int, float], fail: frozenset[int] = frozenset()) -> None:
        self.delays, self.fail = delays, fail
        self.started: list[int] = []
        self.running = 0
        self.most_at_once = 0
        self._lock = threading.Lock()

    def run(self, seed_ids: np.ndarray) -> CellResult:
        chunk = int(seed_ids[0])
        with self._lock:
            self.started.append(chunk)
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        try:
            time.sleep(self.delays.get(chunk, 0.01))
            if chunk in self.fail:
                raise RuntimeError(f"cell {chunk} failed")
            return {"loss": np.full((1, 1), float(chunk), np.float32)}, None, None
        finally:
            with self._lock:
                self.running -= 1


def fake_cells(n: int) -> list[Cell]:
    return [Cell("v", k, np.array([k], np.uint32), 1, False) for k in range(n)]


def test_concurrent_cells_are_bit_identical_to_one_at_a_time(tiny_study: Path) -> None:
    # Every history value of every cell, from 1, 2 and 3 workers, compared bit for bit: the
    # executor may train any cell in any thread, beside any other.
    plan = _plan(ablab.load_study(tiny_study), workers=1)
    results = {}
    for workers in (1, 2, 3):
        executor = LocalExecutor(plan.program_for, workers=workers)
        try:
            results[workers] = {c.key: out for c, (out, _, _) in executor.run_cells(plan.cells)}
        finally:
            executor.close()
    assert set(results[1]) == {c.key for c in plan.cells} and len(plan.cells) == 4
    for workers in (2, 3):
        assert set(results[workers]) == set(results[1])
        for key, history in results[1].items():
            for name, values in history.items():
                other = results[workers][key][name]
                assert values.dtype == other.dtype and values.tobytes() == other.tobytes(), (
                    workers,
                    key,
                    name,
                )


def test_in_flight_calls_never_exceed_the_workers_and_results_come_as_they_finish() -> None:
    # Cell 0 is slow: with 2 workers the quick cells 1, 2, 3 finish (and are handed out) first.
    program = FakeProgram({0: 0.6, 1: 0.05, 2: 0.05, 3: 0.05})
    executor = LocalExecutor(lambda cell: program, workers=2)
    try:
        order = [cell.chunk for cell, _ in executor.run_cells(fake_cells(4))]
    finally:
        executor.close()
    assert sorted(order) == [0, 1, 2, 3] and order[-1] == 0
    assert program.most_at_once == 2
    assert program.started == [0, 1, 2, 3]  # submitted in plan order


def test_a_failed_cell_raises_in_the_caller_and_the_rest_is_dropped() -> None:
    program = FakeProgram({k: 0.05 for k in range(20)}, fail=frozenset({1}))
    executor = LocalExecutor(lambda cell: program, workers=2)
    with pytest.raises(RuntimeError, match="cell 1 failed"):
        try:
            for _ in executor.run_cells(fake_cells(20)):
                pass
        finally:
            executor.close()
    assert program.running == 0  # close() waited for the calls in flight
    assert len(program.started) <= 5  # cells not started were cancelled, not trained


def test_close_during_iteration_waits_for_the_calls_in_flight() -> None:
    # What an interrupted run does: stop consuming, close; nothing keeps running after.
    program = FakeProgram({k: 0.2 for k in range(10)})
    executor = LocalExecutor(lambda cell: program, workers=2)
    cells = executor.run_cells(fake_cells(10))
    next(cells)
    executor.close()
    assert program.running == 0 and len(program.started) <= 4


def test_the_reference_engine_trains_one_cell_at_a_time() -> None:
    # model.fit per seed on one shared Keras model is not thread-safe.
    assert LocalExecutor(lambda cell: FakeProgram({}), reference=True, workers=4).workers == 1


def test_default_workers_is_one_per_usable_core_on_cpu() -> None:
    cores = len(os.sched_getaffinity(0))
    assert default_workers() == max(1, min(cores, MAX_DEFAULT_WORKERS))


def test_the_plan_bounds_workers_by_the_memory_budget(tiny_study: Path) -> None:
    study = ablab.load_study(tiny_study)
    assert _plan(study, workers=3).workers == 3
    assert _plan(study).workers == default_workers()
    pinned = study.model_copy(
        update={"engine": study.engine.model_copy(update={"workers": 2, "memory_budget_mb": 1e-3})}
    )
    plan = _plan(pinned)  # one cell alone is over this budget: one at a time
    assert plan.workers == 1 and plan.chunk_sizes == {"plain": 4, "bn": 4}  # chunks unchanged


def test_cli_workers_option(tiny_study: Path, tmp_path: Path) -> None:
    assert main(["run", str(tiny_study), "--runs-dir", str(tmp_path), "--workers", "2"]) == 0
    assert main(["run", str(tiny_study), "--runs-dir", str(tmp_path), "--workers", "0"]) == 2
    ray = ["run", str(tiny_study), "--runs-dir", str(tmp_path), "--workers", "2"]
    assert main([*ray, "--executor", "ray"]) == 2
