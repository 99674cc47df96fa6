"""The engine's lowerings A/B, in one process: the seed study's variants under several
``$ABLAB_LOWERINGS`` settings, each compiled once, then trained in alternating rounds.

Each setting's programs are traced while ``$ABLAB_LOWERINGS`` holds it (the engine reads it
when it traces; kept traces are keyed by it, so a setting never gets another's program). Per
round every (variant, setting) trains ``--seeds`` seeds as ``ablab run`` does (its chunks, 2
workers), in turn: a shared machine's drift hits every setting alike. Reported: runs/s
(median of rounds) and the ratio to the first setting, and the seed-mean final val_loss of
64 seeds per setting (they agree to float32 rounding, not bit for bit).

``--cases`` takes bench/peers.py's cases instead (e.g. ``cnn_none,cnn_bn``: their studies,
variants and seed counts, the digits data written to a temporary folder).

Usage: python bench/lowering_ab.py [--variants plain,bn | --cases cnn_none,...] [--settings
xla=conv,pool,norm,dense all=all] [--rounds 3] [--seeds 10000]. The last line printed is JSON:
{"seeds", "rounds", "settings", "runs_per_s": {variant: {setting: r/s}}, "ratio": {...}}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")

import numpy as np

import ablab
from ablab.engine.build import build_program
from ablab.engine.program import VariantProgram
from ablab.engine.small_products import TARGET
from ablab.execution.executors import Cell

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import STUDY, prepared_cells, train_cells  # bench/ is not a package

LOWERINGS = "ABLAB_LOWERINGS"


def build(study: ablab.Study, variant: str, setting: str, seeds: int) -> tuple:
    """``variant``'s program traced and compiled under ``$ABLAB_LOWERINGS=setting``."""
    saved = os.environ.get(LOWERINGS)
    os.environ[LOWERINGS] = setting
    try:
        program = build_program(study, variant, probes=False)
        cells, compile_s, _ = prepared_cells(program, seeds, study.engine.memory_budget_mb, (2,))
        history = program.train(np.arange(64, dtype=np.uint32))  # traced here, too
        calls = kernel_calls(program, cells)
    finally:
        if saved is None:
            os.environ.pop(LOWERINGS, None)
        else:
            os.environ[LOWERINGS] = saved
    return program, cells, compile_s, float(np.mean(history["val_loss"][:, -1])), calls


def kernel_calls(program: VariantProgram, cells: list[Cell]) -> int:
    """Calls of the small-products kernel in the program's text (traced with the lowerings
    in force: call it while the setting holds)."""
    return program.lower("train", len(cells[0].seed_ids)).as_text().count(f"@{TARGET}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="plain,bn")
    parser.add_argument(
        "--settings", nargs="+", default=["xla=conv,pool,norm,dense", "all=all"],
        help="name=value of $ABLAB_LOWERINGS; the first is the reference",
    )  # fmt: skip
    parser.add_argument("--cases", default=None, help="bench/peers.py cases, comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=None, help="default 10,000 / the case's")
    args = parser.parse_args()
    settings = dict(s.split("=", 1) for s in args.settings)
    if args.cases:
        from peers import build_cases  # bench/peers.py (imports torch)

        known = {c.name: c for c in build_cases(Path(tempfile.mkdtemp()))}
        names = args.cases.split(",")
        jobs = {n: (known[n].study, known[n].variant, known[n].seeds) for n in names}
    else:
        study = ablab.load_study(STUDY)
        jobs = {v: (study, v, 10_000) for v in args.variants.split(",")}
    seeds = {v: args.seeds or n for v, (_, _, n) in jobs.items()}
    variants = list(jobs)
    programs = {}
    for variant, (study, name_in_study, _) in jobs.items():
        for name, value in settings.items():
            program, cells, compile_s, val, calls = build(
                study, name_in_study, value, seeds[variant]
            )
            programs[(variant, name)] = (program, cells)
            print(
                f"{variant} {name} ({LOWERINGS}={value}): chunk {len(cells[0].seed_ids)}, "
                f"compile {compile_s:.2f} s, kernel calls {calls}, "
                f"mean final val_loss (64 seeds) {val:.7f}",
                flush=True,
            )
    times: dict[tuple[str, str], list[float]] = {k: [] for k in programs}
    for r in range(args.rounds):
        for key, (program, cells) in programs.items():
            t0 = time.perf_counter()
            train_cells(program, cells, 2)
            times[key].append(time.perf_counter() - t0)
        row = {f"{v}/{n}": round(seeds[v] / t[-1]) for (v, n), t in times.items()}
        print(f"round {r + 1}: {row}", flush=True)
    first = next(iter(settings))
    rates = {
        v: {n: seeds[v] / statistics.median(times[(v, n)]) for n in settings} for v in variants
    }
    ratio = {v: {n: rates[v][n] / rates[v][first] for n in settings} for v in variants}
    for v in variants:
        text = ", ".join(f"{n} {rates[v][n]:,.0f} runs/s ({ratio[v][n]:.2f}x)" for n in settings)
        print(f"{v}: {text}")
    print(
        json.dumps(
            {
                "seeds": seeds,
                "rounds": args.rounds,
                "settings": settings,
                "runs_per_s": rates,
                "ratio": ratio,
            }
        )
    )


if __name__ == "__main__":
    main()
