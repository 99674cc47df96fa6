"""The engine of an earlier commit against this working tree's, alternated in one run.

Issue #17 measures the seed autoencoder at 10,000 seeds against the engine *before* its work
(e32f726), in the same run: a figure from another day moves with the VM (the same script gave
4,639 runs/s then and ~9,600 on the same VM a day later). This script takes the commit's own
``bench/throughput.py``, ``src/`` and ``examples/`` (``git archive``, into a temporary folder
removed after), and runs it and this tree's ``bench/throughput.py --engine-only`` one after the
other, ``--rounds`` times, in fresh processes with the same interpreter and packages. Each
child's ``import ablab`` is checked to come from its own source.

Prints each run's JSON, then per figure the commit's and this tree's medians and the median
of the per-round ratios (this tree / the commit); the last line is JSON:
{"commit", "rounds", "seeds", "old": {figure: median}, "new": {...}, "ratio": {...}}.
Compile time is not in the figures (``--engine-only``: runs/s after compiling).
Usage: python bench/against_commit.py [--commit e32f726] [--rounds 2] [--seeds 10000]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PRE_17 = "e32f726"  # the engine before issue #17's work
FIGURES = ("engine_runs_per_s", "engine_bn_runs_per_s")

# Runs a tree's bench/throughput.py with that tree's src/ first on the path, and refuses to
# measure another tree's ablab (an installed one would otherwise win unnoticed).
_CHILD = """
import runpy, sys
root, script = sys.argv[1], sys.argv[2]
sys.path.insert(0, root + "/src")
import ablab
if not ablab.__file__.startswith(root + "/src/"):
    raise SystemExit(f"measured the wrong tree: ablab from {ablab.__file__}, not {root}/src")
sys.argv = [script, *sys.argv[3:]]
runpy.run_path(script, run_name="__main__")
"""


def export_commit(commit: str, into: Path) -> None:
    """The commit's ``src/``, ``bench/`` and ``examples/`` written under ``into``."""
    try:
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", "--format=tar", commit, "src", "bench", "examples"],
            check=True,
            capture_output=True,
        ).stdout
    except subprocess.CalledProcessError as err:
        shallow = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--is-shallow-repository"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        hint = " (a shallow clone lacks old commits: git fetch --unshallow)"
        raise SystemExit(
            f"against_commit: git cannot export {commit!r} from {ROOT}: "
            f"{err.stderr.decode().strip()}{hint if shallow == 'true' else ''}"
        ) from err
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4: refuse links out of `into`
            tar.extractall(into, filter="data")
        else:  # git's own archive of this repository
            tar.extractall(into)


def throughput(root: Path, seeds: int) -> dict[str, Any]:
    """``root``'s bench/throughput.py --engine-only in a fresh process: its last line (JSON)."""
    script = root / "bench" / "throughput.py"
    command = [sys.executable, "-c", _CHILD, str(root), str(script)]
    command += ["--engine-only", "--seeds", str(seeds)]
    env = {**os.environ, "PYTHONPATH": str(root / "src")}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=root)
    if done.returncode != 0:
        raise SystemExit(f"against_commit: {script} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--commit", default=PRE_17, help=f"the earlier engine (default {PRE_17})")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=10_000)
    args = parser.parse_args()
    if args.rounds < 1 or args.seeds < 1:
        parser.error("--rounds and --seeds must be at least 1")

    runs: dict[str, list[dict[str, Any]]] = {"old": [], "new": []}
    with tempfile.TemporaryDirectory(prefix="ablab-against-") as folder:
        old_root = Path(folder)
        export_commit(args.commit, old_root)
        trees = {"old": old_root, "new": ROOT}
        for round_index in range(args.rounds):
            # alternated: which tree goes first changes every round
            order = ("old", "new") if round_index % 2 == 0 else ("new", "old")
            for which in order:
                result = throughput(trees[which], args.seeds)
                runs[which].append(result)
                label = args.commit if which == "old" else "this tree"
                print(f"round {round_index + 1} {label}: {json.dumps(result)}", flush=True)

    summary: dict[str, Any] = {"commit": args.commit, "rounds": args.rounds, "seeds": args.seeds}
    for which in ("old", "new"):
        summary[which] = {f: statistics.median(r[f] for r in runs[which]) for f in FIGURES}
    summary["ratio"] = {
        f: statistics.median(n[f] / o[f] for o, n in zip(runs["old"], runs["new"], strict=True))
        for f in FIGURES
    }
    for f in FIGURES:
        print(
            f"{f}: {args.commit} {summary['old'][f]:,.0f}, this tree {summary['new'][f]:,.0f} "
            f"runs/s; ratio (median of rounds) {summary['ratio'][f]:.2f}x"
        )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
