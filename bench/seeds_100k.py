"""100,000 seeds of the seed study, end to end (`ablab.run`), inside the memory budget.

Runs examples/bn_yes_or_no.toml (4 variants) with ``--seeds`` seeds per variant (default
100,000: 400,000 training runs) through the whole pipeline -- plan, compile, chunked
training under ``[engine] memory_budget_mb``, storing every cell, the declared checks,
verdicts, explanations -- and records wall time, runs/s, the chunking, the bytes stored and
the process's peak RSS against the budget. For scale, ``model.fit`` (a fresh model per
seed, as bench/throughput.py measures it) runs in the same process afterwards.

The last line printed is JSON:
{"seeds", "variants", "runs", "wall_s", "runs_per_s", "chunk_sizes", "cells",
 "probed_seeds_per_variant", "stored_mb", "peak_rss_mb", "memory_budget_mb",
 "within_budget", "fit_runs_per_s", "speedup", ...}
Usage: python bench/seeds_100k.py [--seeds 100000] [--fit-runs 3] [--runs-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax
import keras

import ablab
from ablab.execution.env import cpu_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import STUDY, fresh_fit_runs_per_s  # bench/ is not a package


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=100_000)
    parser.add_argument("--fit-runs", type=int, default=3)
    parser.add_argument("--runs-dir", type=Path, default=None, help="default: a temp folder")
    args = parser.parse_args()

    study = ablab.load_study(STUDY)
    budget = study.engine.memory_budget_mb
    runs_dir = args.runs_dir or Path(tempfile.mkdtemp(prefix="ablab-100k-"))
    rss_before = _peak_rss_mb()
    t0 = time.perf_counter()
    result = ablab.run(study, seeds=args.seeds, runs_dir=runs_dir)
    wall = time.perf_counter() - t0
    rss_run = _peak_rss_mb()
    meta = json.loads((result.run_dir / "study.json").read_text())
    plan = meta["plan"]
    stored = sum(f.stat().st_size for f in result.run_dir.rglob("*") if f.is_file())
    n_runs = args.seeds * len(result.histories)
    fit_rps = fresh_fit_runs_per_s(study, "plain", args.fit_runs)
    rows = [
        ("seeds per variant x variants", f"{args.seeds:,} x {len(result.histories)}"),
        ("training runs", f"{n_runs:,}"),
        ("wall time, whole pipeline (s)", f"{wall:,.1f}"),
        ("runs/s, whole pipeline (compile, checks, analysis incl.)", f"{n_runs / wall:,.0f}"),
        ("chunk size per variant", str(sorted(set(plan["chunk_sizes"].values())))),
        ("cells", str(plan["cells_total"])),
        ("stored (MB)", f"{stored / 2**20:,.1f}"),
        ("peak RSS before the run (MB, imports)", f"{rss_before:,.0f}"),
        ("peak RSS of the process (MB)", f"{rss_run:,.0f}"),
        ("memory budget (MB)", f"{budget:,.0f}"),
        ("model.fit, fresh model per seed (runs/s)", f"{fit_rps:.3f}"),
    ]
    print(
        f"# {cpu_model() or platform.machine()}, {os.cpu_count()} cores, "
        f"jax {jax.__version__} ({jax.devices()[0].platform}), keras {keras.__version__}"
    )
    for label, value in rows:
        print(f"{label:<58} {value:>16}")
    verdicts = {c.variant: c.verdict for c in result.comparisons}
    print(
        json.dumps(
            {
                "seeds": args.seeds,
                "variants": len(result.histories),
                "runs": n_runs,
                "wall_s": round(wall, 1),
                "runs_per_s": round(n_runs / wall, 1),
                "chunk_sizes": plan["chunk_sizes"],
                "cells": plan["cells_total"],
                "probed_chunks": plan["probed_chunks"],
                "stored_mb": round(stored / 2**20, 1),
                "peak_rss_mb": round(rss_run, 1),
                "peak_rss_before_run_mb": round(rss_before, 1),
                "memory_budget_mb": budget,
                "within_budget": rss_run <= budget,
                "verdicts": verdicts,
                "checks_passed": all(c.passed is not False for c in result.checks),
                "fit_runs_per_s": round(fit_rps, 3),
                "speedup": round((n_runs / wall) / fit_rps, 1),
                "device": jax.devices()[0].platform,
            }
        )
    )


if __name__ == "__main__":
    main()
