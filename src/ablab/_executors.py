"""Executors: where a run's cells are trained.

A cell is one (variant, seed chunk) of a run -- a sweep's variants are its arms, so a cell
is (variant, sweep point, seed chunk). An executor takes the cells still to do and yields
each one's result as it finishes; the run (``ablab._run``) stores every result the moment it
arrives, so whatever an executor has finished survives an interruption.

* :class:`LocalExecutor` trains the cells in this process, one compiled program call each.
* ``ablab._ray.RayExecutor`` ships them to a Ray cluster as Ray core tasks.

A cell's result is a function of the study, the variant, the seed ids and the chunk size
only, so every executor produces the same numbers (the tests compare them bit for bit).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ablab._engine import VariantProgram
from ablab._reference import reference_history

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
    """Trains cells one after another in this process (each cell is one vmapped program
    call that already uses every core XLA gives it)."""

    name = "local"

    def __init__(
        self, program_for: Callable[[Cell], VariantProgram], *, reference: bool = False
    ) -> None:
        self._program_for = program_for
        self._reference = reference

    def run_cells(self, cells: Sequence[Cell]) -> Iterator[tuple[Cell, CellResult]]:
        for cell in cells:
            yield cell, train_cell(self._program_for(cell), cell, reference=self._reference)

    def close(self) -> None:
        pass
