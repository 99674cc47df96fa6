"""Time to answer: the flagship study end to end, with a cold and a warm compilation cache.

``ablab run examples/bn_yes_or_no.toml`` as a user types it, in a fresh process each time,
timed from launch to exit (imports, data, model preparation, compile, 4 x 1,000 seeds,
verdicts, storage). Rounds alternate cold / warm: *cold* starts with an empty persistent
compilation cache folder (``ABLAB_COMPILATION_CACHE=<new empty folder>``), *warm* reuses the
folder the cold run of its round filled; ``off`` runs with the cache turned off
(``--no-compilation-cache``) for scale. The run's own figures (``wall_s``, ``compile_s``,
``train_s`` from ``--json``) are reported beside the process time. Not a test: the machines
are shared and noisy; report medians and state the machine.

The last line printed is JSON: {"rounds", "cold_s", "warm_s", "off_s", "warm_over_cold",
"runs": [...]}. Usage: python bench/latency.py [--rounds 3] [--seeds 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLAGSHIP = ROOT / "examples" / "bn_yes_or_no.toml"


def _run(cache: str, runs: str, seeds: int) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    argv = [sys.executable, "-m", "ablab", "run", str(FLAGSHIP), "--runs-dir", runs, "--json"]
    argv += ["--seeds", str(seeds)]
    if cache == "off":
        argv.append("--no-compilation-cache")
    else:
        env["ABLAB_COMPILATION_CACHE"] = cache
    t0 = time.perf_counter()
    out = subprocess.run(argv, capture_output=True, text=True, env=env, check=True)
    process_s = time.perf_counter() - t0
    doc = json.loads(out.stdout)
    return {
        "process_s": round(process_s, 2),
        "wall_s": round(doc["wall_s"], 2),
        "compile_s": round(doc["compile_s"] or 0.0, 2),
        "train_s": round(doc["train_s"] or 0.0, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=1000)
    args = parser.parse_args()
    runs = tempfile.mkdtemp(prefix="ablab-latency-runs-")
    times: dict[str, list[float]] = {"cold": [], "warm": [], "off": []}
    rows = []
    for r in range(args.rounds):
        cache = tempfile.mkdtemp(prefix="ablab-latency-cache-")
        for kind, where in (("cold", cache), ("warm", cache), ("off", "off")):
            row = {"round": r, "kind": kind, **_run(where, runs, args.seeds)}
            times[kind].append(row["process_s"])
            rows.append(row)
            print(
                f"round {r} {kind:4s}: {row['process_s']:6.2f} s process  (wall_s "
                f"{row['wall_s']:.2f}, compile {row['compile_s']:.2f}, train {row['train_s']:.2f})",
                flush=True,
            )
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"median of {args.rounds}: cold {med['cold']:.2f} s, warm {med['warm']:.2f} s, "
        f"cache off {med['off']:.2f} s"
    )
    print(
        json.dumps(
            {
                "rounds": args.rounds,
                "seeds": args.seeds,
                "cold_s": round(med["cold"], 2),
                "warm_s": round(med["warm"], 2),
                "off_s": round(med["off"], 2),
                "warm_over_cold": round(med["warm"] / med["cold"], 3),
                "runs": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
