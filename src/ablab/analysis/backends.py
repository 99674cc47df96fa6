"""Train sampled seeds with plain ``model.fit`` under other Keras backends, in subprocesses.

Each backend gets one fresh interpreter (``KERAS_BACKEND`` set before Keras loads) running
``ablab/engine/fit_worker.py`` on a job folder: the model as Keras JSON, compile and fit
arguments, the rows, every seed's initial weights (``set_weights`` order) and, when shuffling,
the engine's own per-epoch permutations. Backends run concurrently.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ablab.engine.program import VariantProgram
from ablab.engine.reference import all_rows, fit_arguments, initial_weights_for_keras, permutations

BACKENDS = ("jax", "torch", "tensorflow")
_MODULE = {"jax": "jax", "torch": "torch", "tensorflow": "tensorflow"}
WORKER = Path(__file__).resolve().parents[1] / "engine" / "fit_worker.py"


def available(backend: str) -> bool:
    """Is the backend's framework importable here?"""
    return importlib.util.find_spec(_MODULE[backend]) is not None


def write_job(
    job_dir: Path,
    programs: dict[str, VariantProgram],
    seeds: dict[str, list[int]],
    callbacks: list[dict[str, Any]] | None = None,
) -> None:
    """Write ``job.json`` + ``arrays.npz`` for the worker: every (variant, seed) entry."""
    arrays: dict[str, np.ndarray] = {}
    entries = []
    for variant, program in programs.items():
        x, y = all_rows(program)
        arrays[f"{variant}/x"], arrays[f"{variant}/y"] = x, y
        train = program.prepared.train
        for seed in seeds[variant]:
            key = f"{variant}/{seed}"
            weights = initial_weights_for_keras(program, seed)
            for i, w in enumerate(weights):
                arrays[f"{key}/w{i}"] = w
            perm = permutations(program, seed)
            if perm is not None:
                arrays[f"{key}/perm"] = perm
            entries.append(
                {
                    "key": key,
                    "data": variant,
                    "n_weights": len(weights),
                    "model_json": program.prepared.model.to_json(),
                    "optimizer": train.optimizer_config(),
                    "loss": train.loss_config(),
                    "metrics": train.metric_configs(),
                    "fit": fit_arguments(program),
                    "callbacks": callbacks or [],
                }
            )
    np.savez(job_dir / "arrays.npz", **arrays)  # type: ignore[arg-type]
    (job_dir / "job.json").write_text(json.dumps({"entries": entries}))


def _collect(
    backend: str, proc: subprocess.Popen[str], job_dir: Path, timeout_s: float
) -> dict[str, Any]:
    try:
        _, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return {"ok": False, "error": f"timed out after {timeout_s:.0f} s"}
    result = job_dir / f"result-{backend}.json"
    if proc.returncode != 0 or not result.exists():
        tail = "\n".join(err.strip().splitlines()[-5:])
        return {"ok": False, "error": f"worker exit {proc.returncode}: {tail}"}
    return {"ok": True, "histories": json.loads(result.read_text())}


def run_backends(
    programs: dict[str, VariantProgram],
    seeds: dict[str, list[int]],
    backends: list[str],
    *,
    callbacks: list[dict[str, Any]] | None = None,
    timeout_s: float = 1800.0,
) -> dict[str, dict[str, Any]]:
    """``{backend: {"ok": bool, "histories": {"variant/seed": {name: [...]}}, "error": str}}``.

    callbacks: Keras callbacks the worker builds (``{"path", "name", "kwargs", "backend"}``),
    for fault injection in tests; ``backend`` limits one to that backend.
    """
    out: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="ablab-backends-") as tmp:
        job_dir = Path(tmp)
        write_job(job_dir, programs, seeds, callbacks)
        procs: dict[str, subprocess.Popen[str]] = {}
        try:
            for backend in backends:
                env = {
                    **os.environ,
                    "KERAS_BACKEND": backend,
                    "TF_CPP_MIN_LOG_LEVEL": "3",
                    "PYTHONWARNINGS": "ignore",
                }
                procs[backend] = subprocess.Popen(
                    # -P: the worker's folder (engine/, with modules named data, model, ...)
                    # must not shadow packages the worker or the user's code imports
                    [sys.executable, "-P", str(WORKER), str(job_dir)],
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            for backend, proc in procs.items():
                out[backend] = _collect(backend, proc, job_dir, timeout_s)
        finally:  # an error or Ctrl-C here must not leave workers running on a deleted folder
            for proc in procs.values():
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    return out
