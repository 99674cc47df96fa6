"""Sizing: how many seeds one compiled call trains (chunks) and how many calls run at once
(workers), from the memory budget and the machine's usable cores."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import numpy as np

if TYPE_CHECKING:
    from ablab.engine.program import VariantProgram

# Largest chunk the engine compiles by default, measured on the seed study (2-core CPU):
# throughput per call is flat from ~512 seeds up, larger chunks only raise peak memory, and
# more, smaller cells keep every worker busy to the end (10,000 seeds = 10 cells of 1,000,
# 5 rounds on 2 workers; with 2,048: 5 cells, 3 rounds, the last one half idle).
DEFAULT_MAX_CHUNK = 1024

# Chunk calls one process runs at once by default on a CPU backend: one per core, at most
# this many. One call of the engine's program keeps only ~1.3 of 2 cores busy (its ops are
# thousands of tiny per-seed products and elementwise passes, each split across XLA's thread
# pool and joined again); two calls at once keep both busy. Measured on the seed study
# (2-core CPU, bench/throughput.py times 1 and 2 workers in turn): 1.2-2.4x runs/s, median
# ~1.6x (plain 2,630 -> 4,639, bn 2,601 -> 3,952 in one run), bit-identical results; 3 or 4
# workers on 2 cores were no faster than 2.
MAX_DEFAULT_WORKERS = 8

# A variant's seeds are cut into at least this many cells when it has MIN_CELLS x
# MIN_CELL_SEEDS seeds or more: one cell per variant left a core idle (one call keeps ~1.3 of
# 2 cores busy); two cells of 100 seeds on 2 workers ran 1.07-1.26x a single cell of 200
# (the peer benchmark of issue #17). Both cells have one size, so one compiled program serves
# them; below 64 seeds a second call's fixed cost outweighs the idle core.
MIN_CELLS = 2
MIN_CELL_SEEDS = 32

# On a CPU backend a cell's working set -- seeds x the engine's per-seed memory estimate
# (weights, optimizer slots, gradients, one step's activations, logs) -- is kept within this
# many bytes, so a step's tensors stay in the processor's caches instead of streaming from
# memory. Measured with bench/peers.py's cases on 2 cores (AMD EPYC, 2 workers, runs/s by
# chunk size, median of 3): digits CNN 200 seeds 94.6 (chunk 100) -> 169 (25; the rule: 11),
# CNN+BN 50.6 (100) -> 80.6 (8; the rule: 6), MLP 64-512-10 38.6 (100) -> 49.3 (11),
# MLP 64-128-10 201 (100) -> 313 (25), Dense-BN 128 154 (100) -> 188 (25), seed autoencoder
# + BN 10,000 seeds 9,020 (1,000) -> 9,379 (500); flat below ~16 MiB. 16 -> 12 MiB (2026-12-03,
# same-process A/B of the two chunk sizes each case gets, 2 calls at once, 6 + 8 alternated
# rounds, per-seed time): MLP 64-128-10 34 -> 25 seeds 1.05x / 1.09x, MLP + BN 128 25 -> 17
# 1.03x / 1.07x, MLP 64-512-10 10 -> 8 1.05x / 1.06x, MLP 64-32-10 100 -> 50 0.99x / 1.09x, seed
# autoencoder 834 -> 625 1.00x, + BN 455 -> 358 1.04x, CNN 9 -> 8 1.01x. An accelerator wants
# big calls instead, so the cap applies to CPU backends only.
CELL_WORKING_SET_BYTES = 12 * 2**20
# ... but never below this many seeds per cell: each call has a fixed cost (dispatch, the
# cell's results copied out and stored), and below ~8 seeds the CNN cases stopped gaining.
MIN_WORKING_SET_CHUNK = 8
# Evening the study's count of cells may cut a variant's cells down to this many seeds (the
# digits CNN, 50 seeds on 2 workers: 8 cells of 7 321 runs/s, 10 of 5 345, against 7 of 8
# 186: the odd count's last call runs alone, and alone it ran 3.4x slower -- below).
MIN_EVEN_CHUNK = 4


CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def usable_cores() -> int:
    """CPU cores this process may use: its affinity mask, further limited by a cgroup v2 CPU
    quota (``cpu.max``, as containers set it) where there is one."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def default_workers() -> int:
    """How many chunk calls to run at once: the usable CPU cores (at most
    ``MAX_DEFAULT_WORKERS``) on a CPU backend, 1 on an accelerator (one device runs one
    program at a time anyway)."""
    if jax.default_backend() != "cpu":
        return 1
    return min(usable_cores(), MAX_DEFAULT_WORKERS)


def choose_chunk_size(
    program: VariantProgram,
    n_seeds: int,
    memory_budget_mb: float,
    chunk_size: int | None = None,
    max_chunk: int = DEFAULT_MAX_CHUNK,
) -> int:
    """Seeds per compiled call: the explicit ``chunk_size``, else what fits the memory budget.

    Capped at ``max_chunk`` (measured: bigger chunks do not run faster), at ``n_seeds`` and,
    on a CPU backend, at a working set of ``CELL_WORKING_SET_BYTES`` (at least
    ``MIN_WORKING_SET_CHUNK`` seeds); a variant of at least ``MIN_CELLS * MIN_CELL_SEEDS``
    seeds is cut into at least ``MIN_CELLS`` cells; then evened out so the last chunk carries
    little padding. The rule depends on the study and the kind of backend only (never on the
    core count, the cache sizes or the workers), so a study cuts the same cells -- and
    computes the same bits -- on every CPU machine. A run then evens the study's count of
    cells across its variants (:func:`even_cell_count`).
    """
    if chunk_size is not None:
        return max(1, min(chunk_size, n_seeds))
    per_seed = max(1, program.per_seed_bytes())
    fit = int(memory_budget_mb * 2**20 // per_seed)
    cap = max(1, min(fit, max_chunk, n_seeds))
    if jax.default_backend() == "cpu":
        cap = min(cap, max(MIN_WORKING_SET_CHUNK, CELL_WORKING_SET_BYTES // per_seed))
    if n_seeds >= MIN_CELLS * MIN_CELL_SEEDS:  # at least two cells: every worker gets one
        cap = min(cap, math.ceil(n_seeds / MIN_CELLS))
    # Balance the chunks (10,000 seeds at cap 1,024 -> 10 x 1,000, not 10 x 1,024 with padding).
    n_chunks = math.ceil(n_seeds / cap)
    return math.ceil(n_seeds / n_chunks)


def even_cell_count(
    n_seeds: int, chunks: dict[str, int], per_seed_bytes: dict[str, int]
) -> dict[str, int]:
    """The study's chunk sizes (``{variant: seeds per cell}``, each variant ``n_seeds``
    seeds), with one variant cut into more, smaller cells where that makes the study's count
    of cells even; on a CPU backend only.

    Every variant's cells go to one queue of workers. An odd count leaves a worker idle for
    the queue's last round (5 cells on 2 workers: 3 rounds, the last half empty), and worse:
    a call running alone ran ~3.4x slower than beside another on this 2-core VM (the digits
    CNN's 8-seed call, 143 ms alone, 42 ms for two at once: XLA's threads, split between two
    calls, wait less for each other). More, smaller cells take no more rounds on an even
    number of workers (the usual 2, 4, 8 cores), and each round is shorter. A variant's
    smallest change of count that flips its parity is taken: the fewest cells past its own
    count ``k`` with balanced sizes (``ceil(n / k')`` seeds for ``k' = k + 1, k + 2, ..``)
    whose count is odd apart from ``k``, at least ``MIN_EVEN_CHUNK`` seeds a cell (or the
    size it had, if smaller). Among the variants that can, the one with the biggest cells
    (seeds x per-seed memory, the proxy for a call's time) is cut; a variant in one cell
    keeps it (below ``MIN_CELLS * MIN_CELL_SEEDS`` seeds a second call costs more than it
    gives). Like :func:`choose_chunk_size`, it depends on the study and the kind of backend
    only. Measured (issue #17, MLP 64-128-10, 200 seeds, 2 workers, median of 5 rounds): 5
    cells of 40 seeds 271 runs/s, 6 cells of 34 303 runs/s (1.12x), 8 of 25 303; the digits
    CNN, 50 seeds (7 cells of 8 -> 8 of 7): 186 -> 321 runs/s in a quiet hour.
    """
    evened = dict(chunks)
    counts = {v: math.ceil(n_seeds / c) for v, c in chunks.items()}
    if jax.default_backend() != "cpu" or sum(counts.values()) % 2 == 0:
        return evened
    candidates = []
    for variant, chunk in chunks.items():
        k = counts[variant]
        if k < 2:
            continue
        floor = min(MIN_EVEN_CHUNK, chunk)
        target = k + 1
        while (smaller := math.ceil(n_seeds / target)) >= floor:
            if (math.ceil(n_seeds / smaller) - k) % 2:  # 200 seeds: 26 cells -> 25 x 8
                candidates.append((chunk * per_seed_bytes[variant], variant, smaller))
                break
            target += 1
    if candidates:
        # the biggest cells; ties: the first variant (max keeps the first maximum)
        _, variant, smaller = max(candidates, key=lambda c: c[0])
        evened[variant] = smaller
    return evened


def chunk_size_alone(
    program: VariantProgram,
    n_seeds: int,
    memory_budget_mb: float,
    max_chunk: int = DEFAULT_MAX_CHUNK,
) -> int:
    """A one-variant study's chunk size as a run cuts it: :func:`choose_chunk_size`, then
    :func:`even_cell_count` over that one variant (what the benchmarks time)."""
    chunk = choose_chunk_size(program, n_seeds, memory_budget_mb, max_chunk=max_chunk)
    return even_cell_count(n_seeds, {"": chunk}, {"": program.per_seed_bytes()})[""]


def workers_within_budget(wanted: int, cell_bytes: list[int], memory_budget_mb: float) -> int:
    """How many of ``wanted`` chunk calls may run at once when each in-flight cell holds up
    to ``max(cell_bytes)``: as many as the memory budget holds, at least one.

    The chunk size itself never depends on the worker count (nor on the machine), so a
    study cuts the same cells, and computes the same numbers, everywhere.
    """
    biggest = max(cell_bytes, default=0)
    if biggest <= 0:
        return max(1, wanted)
    return max(1, min(wanted, int(memory_budget_mb * 2**20 // biggest)))


def seed_chunks(base: int, count: int, chunk: int) -> Iterator[tuple[int, np.ndarray, int]]:
    """Yield ``(chunk index, seed ids padded to chunk, number of real seeds)``.

    Every chunk has the same length so one compiled program serves them all; the
    last one is padded with extra seed ids whose results are dropped.
    """
    n_chunks = math.ceil(count / chunk)
    for k in range(n_chunks):
        start = base + k * chunk
        real = min(chunk, base + count - start)
        yield k, np.arange(start, start + chunk, dtype=np.uint32), real
