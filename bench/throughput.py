"""Throughput of the vectorized engine vs ``model.fit`` on the seed study, in one process.

Measures, for the seed study (examples/bn_yes_or_no.toml):
  * engine runs/s at 10,000 seeds for `plain` (no BN) and `bn`, compile excluded
    (compile is reported separately), chunked and run as `ablab run` runs them (the local
    executor, ``default_workers()`` chunk calls at once); also with one worker (calls one
    after another) to show what the concurrent calls add -- the two timed in turn, three
    times each, medians;
  * `model.fit` runs/s on the same machine in the same process, the way a user
    trains one seed: build + compile + fit a fresh model per seed (the seed
    question's workflow); also the warm figure (one compiled model, weights reset
    and fit again), which excludes Keras' per-model tracing;
  * initialization time for 10,000 seeds after compile; compile time; peak RSS.

The last line printed is JSON:
{"engine_runs_per_s", "engine_bn_runs_per_s", "engine_1worker_runs_per_s", "workers",
 "fit_runs_per_s", "speedup", "init_10k_s", "compile_s", "peak_rss_mb", ...}
With --engine-only, only the two engine figures without probes are measured (a quick A/B
of an engine change); the JSON then carries the engine keys only.
Usage: python bench/throughput.py [--seeds 10000] [--fit-runs 5] [--workers N] [--engine-only]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax
import keras
import numpy as np

import ablab
from ablab.engine.build import build_program
from ablab.engine.data import load_dataset, split
from ablab.engine.program import VariantProgram
from ablab.engine.sizing import (
    DEFAULT_MAX_CHUNK,
    chunk_size_alone,
    default_workers,
    seed_chunks,
    workers_within_budget,
)
from ablab.execution.env import cpu_model
from ablab.execution.executors import Cell, LocalExecutor

STUDY = Path(__file__).resolve().parents[1] / "examples" / "bn_yes_or_no.toml"


def train_cells(program: VariantProgram, cells: list[Cell], workers: int) -> None:
    """Train ``cells`` of one program the way `ablab run` does: the local executor,
    ``workers`` chunk calls at once."""
    executor = LocalExecutor(lambda cell: program, workers=workers)
    try:
        for _ in executor.run_cells(cells):
            pass
    finally:
        executor.close()


def prepared_cells(
    program: VariantProgram,
    seeds: int,
    budget_mb: float,
    workers: tuple[int, ...],
    max_chunk: int = DEFAULT_MAX_CHUNK,
) -> tuple[list[Cell], float, list[int]]:
    """``seeds`` seeds of ``program`` cut into cells as `ablab run` cuts them (chunk size
    from the memory budget), the program compiled for them and warmed up (its first call
    allocates), and each worker count in ``workers`` bounded by the budget as `ablab run`
    bounds it. Returns ``(cells, compile seconds, bounded worker counts)``."""
    chunk = chunk_size_alone(program, seeds, budget_mb, max_chunk=max_chunk)
    compile_s = program.compile(chunk)
    cells = [
        Cell("bench", k, ids, real, program.probes) for k, ids, real in seed_chunks(0, seeds, chunk)
    ]
    cell_bytes = [chunk * program.per_seed_bytes()]
    bounded = [workers_within_budget(w, cell_bytes, budget_mb) for w in workers]
    program.train(cells[0].seed_ids)
    return cells, compile_s, bounded


def engine_figures(
    study: ablab.Study,
    variant: str,
    seeds: int,
    probes: bool = False,
    workers: tuple[int, ...] = (1,),
    repeats: int = 1,
) -> dict[str, Any]:
    """Engine runs/s for ``seeds`` seeds of ``variant`` with each worker count in
    ``workers`` (bounded by the memory budget, as `ablab run` bounds them), timed
    ``repeats`` times in turn (A/B/A/B: a shared machine's drift hits every count alike);
    the median per count. ``runs_per_s`` is the first count's."""
    program = build_program(study, variant, probes=probes)
    cells, compile_s, bounded = prepared_cells(
        program, seeds, study.engine.memory_budget_mb, workers
    )
    times: dict[int, list[float]] = {w: [] for w in bounded}
    for _ in range(repeats):
        for w in bounded:
            t0 = time.perf_counter()
            train_cells(program, cells, w)
            times[w].append(time.perf_counter() - t0)
    by_workers = {w: seeds / statistics.median(t) for w, t in times.items()}
    ids = np.arange(seeds, dtype=np.uint32)
    program.initial_weights(ids)  # compile the init program for this size
    t0 = time.perf_counter()
    tv, ntv = program.initial_weights(ids)
    jax.block_until_ready((tv, ntv))
    init_s = time.perf_counter() - t0
    return {
        "runs_per_s": by_workers[bounded[0]],
        "runs_per_s_by_workers": by_workers,
        "compile_s": compile_s,
        "init_s": init_s,
        "chunk": len(cells[0].seed_ids),
        "workers": bounded[0],
    }


def fit_harness(
    study: ablab.Study, variant: str
) -> tuple[Callable[[], keras.Model], Callable[[keras.Model], None]]:
    """``(fresh, fit)``: build + compile a fresh Keras model of ``variant`` the way a user
    writes it, and ``model.fit`` it with the study's [train] settings."""
    parts = split(load_dataset(study), 0.0)
    t = study.variant_train(variant)
    layers = study.variant_layers(variant)
    assert layers is not None

    def fresh() -> keras.Model:
        model = keras.Sequential(
            [keras.Input(parts.x_train.shape[1:])]
            + [
                getattr(keras.layers, s["layer"])(**{k: v for k, v in s.items() if k != "layer"})
                for s in layers
            ]
        )
        model.compile(optimizer=keras.optimizers.get(t.optimizer_config()), loss=t.loss)
        return model

    def fit(model: keras.Model) -> None:
        model.fit(
            parts.x_train,
            parts.y_train,
            epochs=t.epochs,
            batch_size=t.batch_size,
            validation_split=t.validation_split,
            shuffle=t.shuffle,
            verbose=0,
        )

    return fresh, fit


def fresh_fit_runs_per_s(study: ablab.Study, variant: str, runs: int) -> float:
    """model.fit runs/s with a fresh model per seed (build + compile + fit: the seed
    question's workflow), after one warm-up fit (first-use costs of Keras/JAX)."""
    fresh, fit = fit_harness(study, variant)
    fit(fresh())
    t0 = time.perf_counter()
    for _ in range(runs):
        fit(fresh())
    return runs / (time.perf_counter() - t0)


def fit_figures(study: ablab.Study, variant: str, runs: int) -> dict[str, float]:
    """Fresh-model runs/s, and warm runs/s: one compiled model re-fit (no per-model tracing)."""
    cold = fresh_fit_runs_per_s(study, variant, runs)
    fresh, fit = fit_harness(study, variant)
    model = fresh()
    fit(model)
    weights = model.get_weights()
    t0 = time.perf_counter()
    for _ in range(runs):
        model.set_weights(weights)  # timing only: the optimizer state carries over
        fit(model)
    warm = runs / (time.perf_counter() - t0)
    return {"runs_per_s": cold, "warm_runs_per_s": warm}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10_000)
    parser.add_argument("--fit-runs", type=int, default=5)
    parser.add_argument(
        "--workers", type=int, default=None, help="chunk calls at once (default: as ablab run)"
    )
    parser.add_argument(
        "--engine-only", action="store_true", help="only engine plain and bn, no probes, no fit"
    )
    args = parser.parse_args()

    study = ablab.load_study(STUDY)
    wanted = args.workers or default_workers()
    eng = engine_figures(study, "plain", args.seeds, workers=(wanted, 1), repeats=3)
    eng_bn = engine_figures(study, "bn", args.seeds, workers=(wanted, 1), repeats=3)
    workers = eng["workers"]
    one_plain, one_bn = eng["runs_per_s_by_workers"][1], eng_bn["runs_per_s_by_workers"][1]
    engine_doc = {  # the engine's figures, in both the --engine-only and the full JSON
        "seeds": args.seeds,
        "engine_runs_per_s": round(eng["runs_per_s"], 1),
        "engine_bn_runs_per_s": round(eng_bn["runs_per_s"], 1),
        "engine_1worker_runs_per_s": round(one_plain, 1),
        "engine_bn_1worker_runs_per_s": round(one_bn, 1),
        "workers": workers,
        "chunk": eng["chunk"],
        "compile_s": round(eng["compile_s"], 2),
        "compile_bn_s": round(eng_bn["compile_s"], 2),
        "device": jax.devices()[0].platform,
    }
    if args.engine_only:
        print(json.dumps(engine_doc))
        return
    eng_probed = engine_figures(study, "plain", args.seeds, probes=True, workers=(workers,))
    eng_bn_probed = engine_figures(study, "bn", args.seeds, probes=True, workers=(workers,))
    fit = fit_figures(study, "plain", args.fit_runs)
    fit_bn = fit_figures(study, "bn", args.fit_runs)
    rows = [
        (f"engine plain, {workers} workers (runs/s)", eng["runs_per_s"]),
        (f"engine bn, {workers} workers (runs/s)", eng_bn["runs_per_s"]),
        ("engine plain, 1 worker (runs/s)", one_plain),
        ("engine bn, 1 worker (runs/s)", one_bn),
        ("engine plain with probes (runs/s)", eng_probed["runs_per_s"]),
        ("engine bn with probes (runs/s)", eng_bn_probed["runs_per_s"]),
        ("model.fit plain, fresh model per seed (runs/s)", fit["runs_per_s"]),
        ("model.fit bn, fresh model per seed (runs/s)", fit_bn["runs_per_s"]),
        ("model.fit plain, warm compiled model (runs/s)", fit["warm_runs_per_s"]),
        ("model.fit bn, warm compiled model (runs/s)", fit_bn["warm_runs_per_s"]),
        (f"init {args.seeds} seeds after compile (s)", eng["init_s"]),
        ("compile plain / bn (s)", f"{eng['compile_s']:.2f} / {eng_bn['compile_s']:.2f}"),
        ("chunk (seeds per program call)", eng["chunk"]),
    ]
    print(
        f"# {cpu_model() or platform.machine()}, {os.cpu_count()} cores, "
        f"jax {jax.__version__} ({jax.devices()[0].platform}), keras {keras.__version__}"
    )
    for label, value in rows:
        text = f"{value:,.3f}" if isinstance(value, float) else str(value)
        print(f"{label:<52} {text:>14}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(
        json.dumps(
            {
                **engine_doc,
                "engine_probes_runs_per_s": round(eng_probed["runs_per_s"], 1),
                "engine_bn_probes_runs_per_s": round(eng_bn_probed["runs_per_s"], 1),
                "fit_runs_per_s": round(fit["runs_per_s"], 3),
                "fit_bn_runs_per_s": round(fit_bn["runs_per_s"], 3),
                "fit_warm_runs_per_s": round(fit["warm_runs_per_s"], 3),
                "fit_bn_warm_runs_per_s": round(fit_bn["warm_runs_per_s"], 3),
                "speedup": round(eng["runs_per_s"] / fit["runs_per_s"], 1),
                "speedup_bn": round(eng_bn["runs_per_s"] / fit_bn["runs_per_s"], 1),
                "speedup_vs_warm_fit": round(eng["runs_per_s"] / fit["warm_runs_per_s"], 1),
                "init_10k_s": round(eng["init_s"], 4),
                "peak_rss_mb": round(peak, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
