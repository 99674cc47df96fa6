"""Executors: where a run's cells are trained.

A cell is one (variant, seed chunk) of a run -- a sweep's variants are its arms, so a cell
is (variant, sweep point, seed chunk). An executor takes the cells still to do and yields
each one's result as it finishes; the run (``ablab.execution.pipeline``) stores every
result the moment it arrives, so whatever an executor has finished survives an interruption.

* :class:`LocalExecutor` trains the cells in this process, one compiled program call each,
  ``workers`` calls at a time.
* ``ablab.execution.ray_executor.RayExecutor`` ships them to a Ray cluster as Ray core tasks.

A cell's result is a function of the study, the variant, the seed ids and the chunk size
only, so every executor produces the same numbers (the tests compare them bit for bit).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ablab.engine.program import VariantProgram
from ablab.engine.reference import reference_history

History = dict[str, np.ndarray]
CellResult = tuple[History, History | None, History | None]
"""``(history, step probes, epoch probes)``, each ``{name: (chunk seeds, epochs or steps)}``;
the probes are None for a cell without them."""

EXECUTORS = ("local", "ray")


@dataclass(frozen=True, eq=False)
class Cell:
    """One unit of work: ``seed_ids`` (padded to the chunk size; the first ``real`` count).
    Compared by identity (it holds an array); ``key`` names it."""

    variant: str
    chunk: int
    seed_ids: np.ndarray
    real: int
    probes: bool

    @property
    def key(self) -> tuple[str, int]:
        return self.variant, self.chunk


class Executor(Protocol):
    """Trains cells; yields ``(cell, result)`` in completion order (any order)."""

    name: str

    def run_cells(self, cells: Sequence[Cell]) -> Iterator[tuple[Cell, CellResult]]: ...

    def close(self) -> None: ...


def train_cell(program: VariantProgram, cell: Cell, *, reference: bool = False) -> CellResult:
    """Train one cell with ``program`` (whose probe setting matches ``cell.probes``)."""
    if reference:
        return reference_cell(program, cell.seed_ids[: cell.real])
    return program.run(cell.seed_ids)


def reference_cell(program: VariantProgram, seed_ids: np.ndarray) -> CellResult:
    """One cell with plain ``model.fit`` per seed (``[engine] kind = "reference"``): from
    the engine's initial weights and data order, History as ``{name: (seeds, epochs)}``."""
    rows = [reference_history(program, int(s)) for s in seed_ids]
    return {k: np.stack([r[k] for r in rows]).astype(np.float32) for k in rows[0]}, None, None


class LocalExecutor:
    """Trains cells in this process, ``workers`` program calls at a time (threads: XLA runs
    each call outside the GIL), yielding them in completion order.

    Why more than one: a single call of the engine's program keeps only part of the CPU busy
    (see ``ablab.engine.sizing.default_workers``). Each cell's numbers are the same whichever
    thread trains it, alone or beside another (tests/test_executors.py compares the bits).
    The reference engine (``model.fit`` per seed on one shared Keras model) runs one cell
    at a time.

    On Ctrl-C while waiting, or when a cell fails, the cells already running are finished
    and handed out before the exception is re-raised (the caller stores them: an
    interrupted run keeps them); cells not started are dropped.
    """

    name = "local"

    def __init__(
        self,
        program_for: Callable[[Cell], VariantProgram],
        *,
        reference: bool = False,
        workers: int = 1,
    ) -> None:
        self._program_for = program_for
        self._reference = reference
        self.workers = 1 if reference else max(1, int(workers))
        self._pool: ThreadPoolExecutor | None = None

    def _train(self, cell: Cell) -> CellResult:
        return train_cell(self._program_for(cell), cell, reference=self._reference)

    def run_cells(self, cells: Sequence[Cell]) -> Iterator[tuple[Cell, CellResult]]:
        if self.workers == 1 or len(cells) <= 1:
            for cell in cells:
                yield cell, self._train(cell)
            return
        # Compile here, in the caller's thread (its JAX / Keras settings apply; a no-op for
        # programs `ablab run` compiled up front): the workers only run executables.
        sizes = {(id(self._program_for(c)), len(c.seed_ids)): c for c in cells}
        for cell in sizes.values():
            self._program_for(cell).compile(len(cell.seed_ids))
        # Submit in plan order, at most `workers` in flight (each holds a chunk's buffers);
        # the next cell is submitted before a result is handed out, so the workers keep
        # training while the caller stores it.
        pool = self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="ablab-cell")
        queue = iter(cells)
        order = {id(cell): i for i, cell in enumerate(cells)}
        pending: dict[Future[CellResult], Cell] = {}

        def submit() -> None:
            cell = next(queue, None)
            if cell is not None:
                pending[pool.submit(self._train, cell)] = cell

        def in_order(futures: Iterable[Future[CellResult]]) -> list[Future[CellResult]]:
            return sorted(futures, key=lambda f: order[id(pending[f])])

        also_failed: list[str] = []

        def drain() -> Iterator[tuple[Cell, CellResult]]:
            """Finish the cells already running and hand out those that succeed (the
            failures are noted on the exception the caller gets)."""
            running = [f for f in in_order(pending) if not f.cancel()]
            for future in running:
                cell = pending.pop(future)
                err = future.exception()
                if err is None:
                    yield cell, future.result()
                else:
                    also_failed.append(f"cell {cell.key} also failed: {type(err).__name__}: {err}")
            pending.clear()

        def note(exc: BaseException) -> None:
            for line in also_failed:
                exc.add_note(line)

        try:
            for _ in range(self.workers):
                submit()
            while pending:
                try:
                    finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                except KeyboardInterrupt as interrupt:
                    yield from drain()
                    note(interrupt)
                    raise
                for future in in_order(finished):
                    failed = future.exception()
                    if failed is not None:
                        pending.pop(future)
                        # Ctrl-C while the others finish: the cell's error still wins
                        # (the run failed; it was not merely stopped)
                        with contextlib.suppress(KeyboardInterrupt):
                            yield from drain()
                        note(failed)
                        future.result()  # raises the cell's exception, its traceback kept
                    cell = pending.pop(future)
                    submit()
                    yield cell, future.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def close(self) -> None:
        """Stop a ``run_cells`` the caller left unfinished: drop the cells not started, wait
        for the ones running (a thread cannot be stopped mid-call: at most one cell's time
        per worker); their results are not handed out."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
