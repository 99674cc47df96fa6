"""A CNN study end to end with ablab vs a fresh ``model.fit`` per seed, in one run.

The question of issue #17: how much faster is ``ablab run`` on a study of
examples/digits_cnn.toml's size (Conv2D(8)-pool-Dense on scikit-learn digits; 3 variants: no
norm / BatchNormalization / LayerNormalization; 200 seeds each, 10 epochs, batch 64, Adam)
than what a user does without ablab -- build, compile and ``fit`` a fresh Keras model per
seed -- on the same machine?

* **ablab**: ``ablab run examples/digits_cnn.toml --json`` in a subprocess (the user's
  command, its persistent compilation cache as users have it: the first round may compile,
  later rounds find the programs cached). From its run document: runs/s **end to end**
  (``wall_s``: from the command's start to the stored result -- compile, training, checks,
  verdicts) and **training only** (``train_s``).
* **model.fit**: the same variants' Keras models (the engine's model JSON, the engine's
  initial weights for those seeds), each seed a fresh model: deserialized, compiled, then
  ``fit`` with the study's settings and metrics -- ablab's backend cross-check worker
  (``ablab/engine/fit_worker.run_entry``; its extra data-loss metric left out), in a fresh
  interpreter with ``KERAS_BACKEND=torch``, at 1 torch thread and at every core; the faster
  is the figure. One warm-up fit first (first-use costs of Keras and torch), then
  ``--fit-seeds`` seeds per variant timed.

Rounds interleave ablab and both model.fit settings (A/B/A/B: a shared machine's drift hits
all alike); ratio = ablab runs/s / best model.fit runs/s, median of the per-round ratios.
Target (issue #17): end to end >= 30x. The last line printed is JSON.
Usage: python bench/cnn_vs_fit.py [--rounds 2] [--fit-seeds 2] [--seeds 200]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Keras' model serialization (the fit job's model JSON) imports TensorFlow where it is
# installed: keep its start-up logging off this benchmark's output
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "examples" / "digits_cnn.toml"
WORKER = ROOT / "src" / "ablab" / "engine" / "fit_worker.py"


def fit_child(job_dir: Path, threads: int) -> None:
    """In a fresh interpreter (KERAS_BACKEND=torch): one warm-up entry, then every other
    entry of the job timed one by one; prints {"times": [...], "threads": n}."""
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    spec = importlib.util.spec_from_file_location("fit_worker", WORKER)
    assert spec is not None and spec.loader is not None
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    entries = json.loads((job_dir / "job.json").read_text())["entries"]
    arrays = np.load(job_dir / "arrays.npz")
    worker.run_entry(entries[0], arrays)  # warm-up: first-use costs of Keras and torch
    times, finals = [], []
    for entry in entries[1:]:
        t0 = time.perf_counter()
        history = worker.run_entry(entry, arrays)
        times.append(time.perf_counter() - t0)
        finals.append(history["val_loss"][-1])
    print(json.dumps({"times": times, "val_loss": finals, "threads": torch.get_num_threads()}))


def write_fit_job(job_dir: Path, fit_seeds: int) -> int:
    """The study's variants as fit jobs: 1 warm-up entry, then ``fit_seeds`` per variant."""
    import ablab
    from ablab.analysis.backends import write_job
    from ablab.engine.build import build_program

    study = ablab.load_study(STUDY)
    programs = {v: build_program(study, v, probes=False) for v in study.variants}
    first = next(iter(programs))
    seeds = {v: list(range(fit_seeds)) for v in programs}
    seeds[first] = [10_000, *seeds[first]]  # the warm-up entry (a seed no timed entry uses)
    write_job(job_dir, programs, seeds)
    job = json.loads((job_dir / "job.json").read_text())
    for entry in job["entries"]:
        entry["data_loss"] = False  # what a user's fit records: the study's loss and metrics
    (job_dir / "job.json").write_text(json.dumps(job))
    return len(job["entries"]) - 1


def run_fit(job_dir: Path, threads: int) -> dict[str, Any]:
    env = {**os.environ, "KERAS_BACKEND": "torch", "PYTHONWARNINGS": "ignore"}
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--fit-child", str(job_dir), str(threads)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    result["runs_per_s"] = len(result["times"]) / sum(result["times"])
    return result


def run_ablab(runs_dir: Path, seeds: int) -> dict[str, Any]:
    ablab_cli = Path(sys.executable).parent / "ablab"
    t0 = time.perf_counter()
    out = subprocess.run(
        [
            str(ablab_cli),
            "run",
            str(STUDY),
            "--json",
            "--quiet",
            "--seeds",
            str(seeds),
            "--runs-dir",
            str(runs_dir),
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    process_s = time.perf_counter() - t0
    doc = json.loads(out)
    runs = sum(v["n_seeds"] for v in doc["variants"].values())
    return {
        "runs": runs,
        "wall_s": doc["wall_s"],
        "process_s": process_s,
        "train_s": doc["train_s"],
        "compile_s": doc["compile_s"],
        "end_to_end_runs_per_s": runs / doc["wall_s"],
        "process_runs_per_s": runs / process_s,
        "train_runs_per_s": runs / doc["train_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--fit-seeds", type=int, default=2, help="timed fits per variant")
    parser.add_argument("--seeds", type=int, default=200, help="ablab seeds per variant")
    parser.add_argument(
        "--fit-child", nargs=2, metavar=("JOB_DIR", "THREADS"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.fit_child:
        fit_child(Path(args.fit_child[0]), int(args.fit_child[1]))
        return

    cores = os.cpu_count() or 1
    thread_settings = sorted({1, cores})
    work = Path(tempfile.mkdtemp(prefix="ablab-cnn-vs-fit-"))
    timed = write_fit_job(work, args.fit_seeds)
    print(
        f"# {cores} cores; model.fit: {timed} fresh models per setting, "
        f"torch threads {thread_settings}"
    )
    rounds: list[dict[str, Any]] = []
    for r in range(args.rounds):
        got: dict[str, Any] = {"ablab": run_ablab(work / "runs", args.seeds)}
        for threads in thread_settings:
            got[f"fit@{threads}"] = run_fit(work, threads)
        fits = {k: v["runs_per_s"] for k, v in got.items() if k.startswith("fit@")}
        best = max(fits, key=lambda k: fits[k])
        a = got["ablab"]
        got["best_fit"], got["ratio"] = best, a["end_to_end_runs_per_s"] / fits[best]
        got["ratio_process"] = a["process_runs_per_s"] / fits[best]
        got["ratio_train"] = a["train_runs_per_s"] / fits[best]
        rounds.append(got)
        print(
            f"round {r + 1}: ablab {a['runs']} runs in {a['wall_s']:.1f} s from the command's "
            f"start ({a['process_s']:.1f} s with the interpreter's start; compile "
            f"{a['compile_s']:.1f} s, training {a['train_s']:.1f} s) = "
            f"{a['end_to_end_runs_per_s']:.2f} runs/s end to end, "
            f"{a['train_runs_per_s']:.1f} training; model.fit runs/s "
            + ", ".join(f"{k} {v:.3f}" for k, v in fits.items())
            + f"; ratio {got['ratio']:.1f}x end to end (best {best})",
            flush=True,
        )
    summary = {
        "study": STUDY.name,
        "seeds_per_variant": args.seeds,
        "rounds": args.rounds,
        "cores": cores,
        "ratio_end_to_end": statistics.median(r["ratio"] for r in rounds),
        "ratio_with_interpreter_start": statistics.median(r["ratio_process"] for r in rounds),
        "ratio_training_only": statistics.median(r["ratio_train"] for r in rounds),
        "ablab_end_to_end_runs_per_s": statistics.median(
            r["ablab"]["end_to_end_runs_per_s"] for r in rounds
        ),
        "ablab_train_runs_per_s": statistics.median(r["ablab"]["train_runs_per_s"] for r in rounds),
        "fit_runs_per_s": {
            f"fit@{t}": statistics.median(r[f"fit@{t}"]["runs_per_s"] for r in rounds)
            for t in thread_settings
        },
        "target_end_to_end": 30,
    }
    print(
        f"ratio (median of rounds): {summary['ratio_end_to_end']:.1f}x end to end, "
        f"{summary['ratio_with_interpreter_start']:.1f}x with the interpreter's start, "
        f"{summary['ratio_training_only']:.1f}x training only (target: 30x end to end)"
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
