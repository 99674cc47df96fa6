"""The local executor: several chunk calls at once, the same bits as one at a time."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import ablab
from ablab.cli import main
from ablab.engine.sizing import default_workers
from ablab.errors import InputError
from ablab.execution import executors as _executors
from ablab.execution.executors import Cell, CellResult, LocalExecutor
from ablab.execution.plan import make_plan
from ablab.store.rundir import RunDir
from tests.conftest import TINY_STUDY


class FakeProgram:
    """Stands in for a VariantProgram: ``run`` sleeps ``delays[chunk]`` seconds, records
    which calls started and how many overlap, and fails for the chunks in ``fail``."""

    def __init__(self, delays: dict[int, float], fail: frozenset[int] = frozenset()) -> None:
        self.delays, self.fail = delays, fail
        self.started: list[int] = []
        self.running = 0
        self.most_at_once = 0
        self._lock = threading.Lock()

    def compile(self, chunk_size: int) -> float:
        return 0.0

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


# Shuffled (a per-seed permutation each epoch), probed in its first chunk of 4 seeds and
# probe-free after (the plain twin), BN: every program kind a run mixes, 3 cells a variant.
MIXED_STUDY = (
    TINY_STUDY.replace("shuffle = false", "shuffle = true").replace("count = 6", "count = 10")
    + "[probes]\nenabled = true\nseeds = 4\n"
)


def test_concurrent_cells_are_bit_identical_to_one_at_a_time(tmp_path: Path) -> None:
    # Every array of every cell (history, step and epoch probes), from 1, 2 and 3 workers,
    # compared bit for bit: the executor may train any cell in any thread, beside any other.
    path = tmp_path / "mixed.toml"
    path.write_text(MIXED_STUDY)
    plan = make_plan(ablab.load_study(path), workers=1)
    assert len(plan.cells) == 6 and sum(c.probes for c in plan.cells) == 2
    results = {}
    for workers in (1, 2, 3):
        executor = LocalExecutor(plan.program_for, workers=workers)
        try:
            results[workers] = {c.key: r for c, r in executor.run_cells(plan.cells)}
        finally:
            executor.close()
    assert set(results[1]) == {c.key for c in plan.cells}
    for workers in (2, 3):
        assert set(results[workers]) == set(results[1])
        for key, parts in results[1].items():
            for part, theirs in zip(parts, results[workers][key], strict=True):
                assert (part is None) == (theirs is None), (workers, key)
                for name, values in (part or {}).items():
                    other = theirs[name]
                    assert values.dtype == other.dtype and values.shape == other.shape
                    assert values.tobytes() == other.tobytes(), (workers, key, name)


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
    # submitted in plan order (the first two start together, in either order)
    assert set(program.started[:2]) == {0, 1} and program.started[2:] == [2, 3]


def test_a_failed_cell_hands_out_the_cells_running_then_raises_and_drops_the_rest() -> None:
    # Cell 1 fails at once while cell 0 is still training: cell 0 is finished and handed out
    # (the run stores it), then the failure is raised; cells 2.. never start.
    program = FakeProgram({0: 0.3, 1: 0.01}, fail=frozenset({1}))
    executor = LocalExecutor(lambda cell: program, workers=2)
    got = []
    with pytest.raises(RuntimeError, match="cell 1 failed"):
        try:
            for cell, _ in executor.run_cells(fake_cells(20)):
                got.append(cell.chunk)
        finally:
            executor.close()
    assert got == [0]
    assert program.running == 0 and sorted(program.started) == [0, 1]


def test_a_second_failure_among_the_running_cells_is_noted_on_the_first() -> None:
    program = FakeProgram({0: 0.05, 1: 0.3}, fail=frozenset({0, 1}))
    executor = LocalExecutor(lambda cell: program, workers=2)
    with pytest.raises(RuntimeError, match="cell 0 failed") as info:
        for _ in executor.run_cells(fake_cells(6)):
            pass
    assert any("also failed: RuntimeError: cell 1 failed" in n for n in info.value.__notes__)


def test_ctrl_c_while_waiting_hands_out_the_cells_running_then_raises(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Ctrl-C arrives while the caller waits for the next cell: the cells running are
    # finished and handed out (an interrupted run keeps them), nothing new starts.
    program = FakeProgram({k: 0.2 for k in range(10)})
    real_wait = _executors.wait
    calls = {"n": 0}

    def interrupted_wait(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_wait(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(_executors, "wait", interrupted_wait)
    executor = LocalExecutor(lambda cell: program, workers=2)
    got = []
    with pytest.raises(KeyboardInterrupt):
        for cell, _ in executor.run_cells(fake_cells(10)):
            got.append(cell.chunk)
    # first wait: cell 0 and/or 1 finished, as many new cells submitted; the second wait
    # is interrupted at once: every cell that had started is finished and handed out, a
    # submitted one no thread had picked up yet is dropped, nothing more starts
    assert sorted(got) == sorted(program.started) and set(got) >= {0, 1} and len(got) <= 4
    assert program.running == 0


def test_close_during_iteration_waits_for_the_calls_in_flight() -> None:
    # A caller that stops consuming (its own exception while storing) closes the executor:
    # nothing keeps running after.
    program = FakeProgram({k: 0.2 for k in range(10)})
    executor = LocalExecutor(lambda cell: program, workers=2)
    cells = executor.run_cells(fake_cells(10))
    next(cells)
    executor.close()
    assert program.running == 0 and len(program.started) <= 4


def test_the_reference_engine_trains_one_cell_at_a_time() -> None:
    # model.fit per seed on one shared Keras model is not thread-safe.
    assert LocalExecutor(lambda cell: FakeProgram({}), reference=True, workers=4).workers == 1


def test_the_plan_bounds_workers_by_the_memory_budget(tiny_study: Path) -> None:
    study = ablab.load_study(tiny_study)
    free = study.model_copy(update={"engine": study.engine.model_copy(update={"chunk_size": None})})
    assert make_plan(free, workers=3).workers == 3
    assert make_plan(free).workers == default_workers()
    # the chunk size never depends on the workers (nor on the machine)
    assert make_plan(free, workers=1).chunk_sizes == make_plan(free, workers=8).chunk_sizes
    pinned = study.model_copy(
        update={"engine": study.engine.model_copy(update={"workers": 2, "memory_budget_mb": 0.1})}
    )
    plan = make_plan(pinned)  # one 4-seed cell (~62 KiB) fits this budget, two do not
    assert plan.workers == 1 and plan.chunk_sizes == {"plain": 4, "bn": 4}


def test_the_plan_evens_the_study_count_of_cells(
    tiny_study: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every variant's cells go to one queue: an odd total leaves a worker idle for the last
    round, so the plan cuts one variant into one more cell; not with an explicit chunk size,
    nor for a resumed run (its stored sizes), nor with the reference engine."""
    from ablab.execution import plan as _plan

    monkeypatch.setattr(_plan, "choose_chunk_size", lambda program, n, budget, explicit: 30)
    study = ablab.load_study(tiny_study)
    engine = study.engine.model_copy(update={"chunk_size": None})
    seeds = study.seeds.model_copy(update={"count": 150})
    free = study.model_copy(update={"engine": engine, "seeds": seeds})
    # plain and bn: 5 + 5 cells of 30, even already
    assert make_plan(free).chunk_sizes == {"plain": 30, "bn": 30}
    twin = free.variants["plain"].model_copy()
    three = free.model_copy(update={"variants": {**free.variants, "plain2": twin}})
    plan = make_plan(three)  # 15 cells: bn's (the biggest per seed) become 6 of 25
    assert plan.chunk_sizes == {"plain": 30, "bn": 25, "plain2": 30}
    assert len(plan.cells) == 16
    assert make_plan(three, chunk_sizes={"plain": 30, "bn": 30, "plain2": 30}).chunk_sizes == {
        "plain": 30,
        "bn": 30,
        "plain2": 30,
    }
    for update in ({"kind": "reference"}, {"chunk_size": 30}):
        other = three.model_copy(update={"engine": engine.model_copy(update=update)})
        assert make_plan(other).chunk_sizes == {"plain": 30, "bn": 30, "plain2": 30}, update


def test_workers_refused_where_they_cannot_apply(tiny_study: Path) -> None:
    study = ablab.load_study(tiny_study)
    with pytest.raises(InputError, match="positive number"):
        make_plan(study, workers=0)
    reference = study.model_copy(
        update={"engine": study.engine.model_copy(update={"kind": "reference", "workers": 2})}
    )
    with pytest.raises(InputError, match="reference engine"):
        make_plan(reference, workers=2)  # asked for explicitly: refused
    # the study's own [engine] workers under --engine reference (the way out of a compile
    # error): one cell at a time, no error
    assert make_plan(reference).workers == 1


def test_cli_workers_option(
    tiny_study: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = ["run", str(tiny_study), "--runs-dir", str(tmp_path), "--json"]
    assert main([*run, "--workers", "3"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["executor"] == {"name": "local", "workers": 3}  # what trained the cells
    assert main([*run, "--workers", "0"]) == 2
    assert main([*run, "--workers", "2", "--executor", "ray"]) == 2
    assert main([*run, "--workers", "2", "--engine", "reference"]) == 2


def test_an_interrupted_run_stores_the_cells_that_were_running(
    tiny_study: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Ctrl-C while `ablab run` waits on two workers: the cells running are finished and
    # stored, the run is "interrupted" with exactly those cells done, and resume finishes it.
    real_wait = _executors.wait
    calls = {"n": 0}

    def interrupted_wait(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] == 1:
            time.sleep(0.5)  # both workers have picked up their cell by now
            raise KeyboardInterrupt
        return real_wait(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(_executors, "wait", interrupted_wait)
    runs = tmp_path / "runs"
    with pytest.raises(ablab.RunInterrupted) as info:
        ablab.run(tiny_study, runs_dir=runs, workers=2)
    run = RunDir(Path(info.value.run_dir))
    status = run.read_json("status.json")
    assert status["state"] == "interrupted"
    # the two cells submitted first were running (or done) when Ctrl-C came: both stored
    assert status["cells_done"] == len(run.cell_files()) == 2
    monkeypatch.setattr(_executors, "wait", real_wait)
    result = ablab.resume("latest", runs_dir=runs, workers=2)
    assert result.state == "complete" and len(run.cell_files()) == 4
