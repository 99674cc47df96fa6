"""Chunk and worker sizing (ablab.engine.sizing): chunks cover every seed once, the chunk size
follows the memory budget, workers are bounded by the cores and the budget."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from ablab.engine import sizing as _engine
from ablab.engine.program import VariantProgram
from ablab.engine.sizing import (
    MAX_DEFAULT_WORKERS,
    choose_chunk_size,
    chunk_size_alone,
    default_workers,
    even_cell_count,
    seed_chunks,
    usable_cores,
    workers_within_budget,
)


def test_seed_chunks_cover_every_seed_once_with_equal_lengths() -> None:
    chunks = list(seed_chunks(base=10, count=7, chunk=3))
    assert [len(ids) for _, ids, _ in chunks] == [3, 3, 3]
    real = np.concatenate([ids[:n] for _, ids, n in chunks])
    np.testing.assert_array_equal(real, np.arange(10, 17))


class _Sized:
    """A program as choose_chunk_size sees it: only its per-seed memory estimate."""

    def __init__(self, per_seed_bytes: int) -> None:
        self.bytes = per_seed_bytes

    def per_seed_bytes(self) -> int:
        return self.bytes


@pytest.mark.parametrize(
    ("budget_mb", "explicit", "expected"), [(2048.0, None, 500), (2048.0, 7, 7), (1e-3, None, 1)]
)
def test_chunk_size_choice(
    seed_programs: dict[str, VariantProgram], budget_mb: float, explicit: int | None, expected: int
) -> None:
    program = seed_programs["plain"]
    assert choose_chunk_size(program, 1000, budget_mb, explicit) == expected


def test_a_variant_with_enough_seeds_gets_two_cells(
    seed_programs: dict[str, VariantProgram],
) -> None:
    """One cell per variant left a worker idle (issue #17): 64 seeds and more make two cells
    of one size (one compiled program); fewer stay one cell. The study alone decides."""
    program = seed_programs["plain"]
    assert choose_chunk_size(program, 1000, 2048.0) == 500
    assert choose_chunk_size(program, 200, 2048.0) == 100
    assert choose_chunk_size(program, 65, 2048.0) == 33  # 2 cells, one padded seed
    assert choose_chunk_size(program, 63, 2048.0) == 63


def _one_variant_cut(per_seed_bytes: int, seeds: int) -> int:
    """A one-variant study's chunk size as a run cuts it: choose, then even the count."""
    return chunk_size_alone(_Sized(per_seed_bytes), seeds, 2048.0)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("per_seed_kib", "seeds", "chunk", "cells"),
    [
        # bench/peers.py's cases (per-seed estimates rounded), cells of at most 12 MiB:
        # choose_chunk_size cuts 7 and 3 cells for the MLPs below: an odd count leaves one of 2
        # workers idle for the last round.
        (370, 200, 25, 8),  # MLP 64-128-10: 7 cells of 29 chosen
        (128, 200, 50, 4),  # MLP 64-32-10: 3 cells of 67 chosen
        # MLP 64-512-10: 26 cells would be 25 of 8 again; 34 of 6 flip the parity (a quiet
        # hour, 2 workers, median of 7: 73 -> 81 runs/s)
        (1429, 200, 6, 34),
        (1454, 50, 7, 8),  # digits CNN: 7 cells of 8 -> 8 of 7 (186 -> 321 runs/s)
        (2479, 50, 7, 8),  # digits CNN + BN: the same (149 -> 227 runs/s)
        (33.4, 10_000, 358, 28),  # seed autoencoder + BN: already even, unchanged
        (18.7, 10_000, 625, 16),  # seed autoencoder: already even, unchanged
        (4, 200, 100, 2),  # two cells: unchanged
    ],
)
def test_an_odd_count_of_cells_gets_one_more(
    per_seed_kib: float, seeds: int, chunk: int, cells: int
) -> None:
    """Issue #17: MLP 64-128-10 on 2 workers ran 271 runs/s in 5 cells of 40, 303 in 6 of 34
    (median of 5 rounds): the sixth cell costs no round, and each cell is smaller."""
    got = _one_variant_cut(int(per_seed_kib * 2**10), seeds)
    assert (got, -(-seeds // got)) == (chunk, cells)


@pytest.mark.parametrize("seeds", range(1, 130))
def test_an_odd_count_of_cells_is_kept_only_when_no_smaller_cells_can_even_it(
    seeds: int,
) -> None:
    for per_seed_mib in (0.5, 1.0, 2.5, 6.0):
        chosen = choose_chunk_size(_Sized(int(per_seed_mib * 2**20)), seeds, 2048.0)  # type: ignore[arg-type]
        chunk = _one_variant_cut(int(per_seed_mib * 2**20), seeds)
        cells = -(-seeds // chunk)
        assert chunk * (cells - 1) < seeds  # no cell is only padding
        floor = min(_engine.MIN_EVEN_CHUNK, chosen)
        assert chunk >= floor and chunk <= chosen
        if cells > 1 and cells % 2:  # every smaller balanced size down to the floor: odd too
            smaller = {-(-seeds // k) for k in range(cells + 1, seeds + 1)}
            assert all((-(-seeds // c)) % 2 == 1 for c in smaller if c >= floor), (
                seeds,
                per_seed_mib,
                chunk,
            )


def test_the_study_count_of_cells_is_evened_across_variants(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every variant's cells share one queue: the study's total count is what is evened, by
    one more cell in the variant with the biggest cells that can take one."""
    kib = 2**10
    costs = {"a": 300 * kib, "b": 370 * kib, "c": 200 * kib}
    # 5 + 5 cells: already even, unchanged
    two = {"a": 40, "b": 40}
    assert even_cell_count(200, two, costs) == two
    # 5 + 5 + 5: b's cells are the biggest (40 x 370 KiB): 6 cells of 34
    assert even_cell_count(200, {**two, "c": 40}, costs) == {"a": 40, "b": 34, "c": 40}
    # 2 + 25 cells: 26 cells of 200 seeds are 25 again, so a (2 -> 3 cells of 67) it is
    assert even_cell_count(200, {"a": 100, "b": 8}, costs) == {"a": 67, "b": 8}
    # one cell stays one cell (fewer than 64 seeds)
    assert even_cell_count(63, {"a": 63}, costs) == {"a": 63}
    assert even_cell_count(60, {"a": 20}, costs) == {"a": 15}  # 3 cells -> 4 of 15
    # 7 cells of 8 (50 seeds; the peer benchmark's CNN) -> 8 cells of 7: the last call no
    # longer runs alone (it ran ~3.4x slower alone); down to MIN_EVEN_CHUNK seeds a cell
    assert even_cell_count(50, {"a": 8}, costs) == {"a": 7}
    assert even_cell_count(9, {"a": 3}, costs) == {"a": 3}  # 3 -> 4 cells would be 3 of 3
    assert even_cell_count(15, {"a": 5}, costs) == {"a": 4}  # 3 cells of 5 -> 4 of 4
    assert even_cell_count(14, {"a": 5}, costs) == {"a": 4}  # 3 -> 4 cells of 4 (2 padding)
    # 25 cells of 8 (200 seeds) have no size for exactly one more (26 cells -> 25 x 8): the
    # nearest balanced size whose count flips the parity, 34 cells of 6; here for the biggest
    # cells of three such variants (examples/digits_cnn.toml: 75 -> 84 cells)
    three = {"a": 8, "b": 8, "c": 8}
    assert even_cell_count(200, three, costs) == {"a": 8, "b": 6, "c": 8}
    assert math.ceil(200 / 6) == 34
    # an accelerator runs one big call at a time: nothing to even
    monkeypatch.setattr(_engine.jax, "default_backend", lambda: "gpu")
    assert even_cell_count(200, {**two, "c": 40}, costs) == {**two, "c": 40}


def test_a_cell_working_set_stays_in_the_caches_on_cpu(
    seed_programs: dict[str, VariantProgram], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a CPU backend a cell holds at most 12 MiB of per-seed memory (measured in issue #17:
    the digits CNN 1.8x, MLP 64-512-10 1.3x faster in cells of 16 MiB than of 100 seeds, the
    MLPs 0.99-1.09x faster again at 12 MiB), at least 8 seeds, then balanced; an accelerator
    keeps big cells (the 1,024 cap)."""
    program = seed_programs["plain"]
    per_seed = program.per_seed_bytes()
    cap = _engine.CELL_WORKING_SET_BYTES // per_seed  # the seed study's plain: ~650 seeds
    assert 500 < cap < 1024
    # 3,000 seeds: ceil(3000 / cap) = 5 balanced cells of 600 (without the cap: 3 of 1,000)
    assert choose_chunk_size(program, 3000, 2048.0) == 3000 // -(-3000 // cap)
    assert choose_chunk_size(program, 100_000, 2048.0) * per_seed <= 12 * 2**20
    # a CNN-sized seed (2.5 MiB: examples/digits_cnn.toml's bn variant is ~2.4 MiB): 4 seeds
    # fit 12 MiB, but a cell has at least 8; 200 seeds are 25 cells of 8
    cnn = _Sized(int(2.5 * 2**20))
    assert choose_chunk_size(cnn, 200, 2048.0) == 8  # type: ignore[arg-type]
    assert choose_chunk_size(cnn, 5, 2048.0) == 5  # type: ignore[arg-type]
    # 1 MiB a seed: 12 fit; 200 seeds are 17 cells of 12 (odd; no size makes exactly 18, 20
    # cells of 10 flip the parity)
    assert choose_chunk_size(_Sized(2**20), 200, 2048.0) == 12  # type: ignore[arg-type]
    assert _one_variant_cut(2**20, 200) == 10
    # the memory budget still wins when it is tighter
    assert choose_chunk_size(_Sized(2**20), 200, 4.0) == 4  # type: ignore[arg-type]
    # an accelerator: no cache cap; the 1,024 cap, then balanced (100,000 seeds: 98 x 1,021)
    monkeypatch.setattr(_engine.jax, "default_backend", lambda: "gpu")
    assert choose_chunk_size(cnn, 200, 2048.0) == 100  # type: ignore[arg-type]
    assert choose_chunk_size(program, 100_000, 2048.0) == 1021


def test_workers_within_budget() -> None:
    mb = 2**20
    assert workers_within_budget(2, [100 * mb, 300 * mb], 2048.0) == 2
    assert workers_within_budget(8, [300 * mb], 1000.0) == 3  # the biggest cell sets the bound
    assert workers_within_budget(4, [3000 * mb], 2048.0) == 1  # one cell over budget: one
    assert workers_within_budget(3, [], 2048.0) == 3


def test_default_workers_follow_the_usable_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_engine.jax, "default_backend", lambda: "cpu")
    monkeypatch.setattr(_engine, "usable_cores", lambda: 2)
    assert default_workers() == 2
    monkeypatch.setattr(_engine, "usable_cores", lambda: 64)
    assert default_workers() == MAX_DEFAULT_WORKERS
    monkeypatch.setattr(_engine.jax, "default_backend", lambda: "gpu")
    assert default_workers() == 1  # one device runs one program at a time


def test_usable_cores_respects_affinity_and_a_cgroup_quota(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(_engine.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5})
    quota = tmp_path / "cpu.max"
    monkeypatch.setattr(_engine, "CGROUP_CPU_MAX", quota)
    quota.write_text("max 100000\n")
    assert usable_cores() == 6  # no quota: the affinity mask
    quota.write_text("250000 100000\n")
    assert usable_cores() == 3  # 2.5 CPUs of quota: 3 calls
    quota.unlink()
    assert usable_cores() == 6  # no cgroup v2 file
