"""Train sampled seeds with plain ``model.fit`` under other Keras backends, in subprocesses.

Each backend gets one fresh interpreter (``KERAS_BACKEND`` set before Keras loads) running
``ablab/engine/fit_worker.py`` on a job folder: the model as Keras JSON, compile and fit
arguments, the rows, every seed's initial weights (``set_weights`` order), when shuffling
the engine's own per-epoch permutations, and where the worker loads the user's own layer
classes (and functions) from before it deserializes the model. Backends run concurrently.

Every (variant, seed) entry stands on its own: one that raises in the worker is an error of
that entry; a worker that dies (or times out) is blamed on the entry it was running, and a
fresh worker runs the entries it had not reached.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ablab.engine.model import several_outputs
from ablab.engine.program import VariantProgram
from ablab.engine.reference import (
    fit_arguments,
    fit_inputs,
    initial_weights_for_keras,
    permutations,
    user_objects,
)

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
        structure: dict[str, Any] = {}  # several inputs / outputs: their names (or count)
        for name, arr in fit_inputs(program).items():  # x, y and any weights / validation_data
            if isinstance(arr, dict):
                structure[name] = list(arr)
                arrays.update({f"{variant}/{name}.{k}": v for k, v in arr.items()})
            elif isinstance(arr, list | tuple):
                structure[name] = len(arr)
                arrays.update({f"{variant}/{name}.{i}": v for i, v in enumerate(arr)})
            elif arr is not None:
                arrays[f"{variant}/{name}"] = arr
        train = program.prepared.train
        users = [u.to_job() for u in user_objects(program.prepared.model) if u.problem is None]
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
                    "user_objects": users,
                    "optimizer": train.optimizer_config(),
                    "loss": train.loss_config(),
                    "per_output_loss": isinstance(train.loss, dict),
                    "data_loss": not several_outputs(program.prepared.model)
                    and not isinstance(train.loss, dict),
                    "structure": structure,
                    "metrics": train.metric_configs(),
                    "fit": fit_arguments(program),
                    "callbacks": callbacks or [],
                }
            )
    np.savez(job_dir / "arrays.npz", **arrays)  # type: ignore[arg-type]
    (job_dir / "job.json").write_text(json.dumps({"entries": entries}))


def _tail(path: Path, lines: int = 5) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return "\n".join(text.strip().splitlines()[-lines:])


@dataclass
class _Backend:
    """One backend's entries: what is done, what failed, the worker now running them."""

    name: str
    todo: list[str]
    timeout_s: float
    histories: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    attempt: int = 0

    def start(self, job_dir: Path) -> None:
        self.attempt += 1
        keys = job_dir / f"keys-{self.name}-{self.attempt}.json"
        keys.write_text(json.dumps(self.todo))
        (job_dir / f"result-{self.name}.json").unlink(missing_ok=True)
        env = {
            **os.environ,
            "KERAS_BACKEND": self.name,
            "TF_CPP_MIN_LOG_LEVEL": "3",
            "PYTHONWARNINGS": "ignore",
        }
        # stderr to a file, not a pipe: a chatty worker cannot block on it
        with open(job_dir / f"stderr-{self.name}-{self.attempt}.txt", "wb") as err:
            self.proc = subprocess.Popen(
                # -P: the worker's folder (engine/, with modules named data, model, ...)
                # must not shadow packages the worker or the user's code imports
                [sys.executable, "-P", str(WORKER), str(job_dir), str(keys)],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def finished(self, job_dir: Path, timed_out: bool) -> bool:
        """Take the ended (or timed-out) worker's results; False while entries remain that a
        fresh worker should run."""
        assert self.proc is not None
        self.stop()
        path = job_dir / f"result-{self.name}.json"
        result = json.loads(path.read_text()) if path.exists() else None
        if result is not None:
            self.histories.update(result["histories"])
            self.errors.update(result["errors"])
        done = set(self.histories) | set(self.errors)
        self.todo = [k for k in self.todo if k not in done]
        if not self.todo:
            return True
        code = self.proc.returncode
        tail = _tail(job_dir / f"stderr-{self.name}-{self.attempt}.txt")
        why = f"timed out after {self.timeout_s:.0f} s" if timed_out else f"worker exit {code}"
        cause = f"{why}: {tail}" if tail else why
        running = result["running"] if result is not None else None
        if running is None or timed_out:  # died outside any entry (starting up?), or no time left
            for key in self.todo:
                on_other = running is not None and key != running
                self.errors[key] = f"not run: {why} on {running}" if on_other else cause
            self.todo = []
            return True
        self.errors[running] = cause
        variant = running.rsplit("/", 1)[0]
        for key in self.todo:  # the variant's other seeds would likely die the same way
            if key != running and key.rsplit("/", 1)[0] == variant:
                self.errors[key] = f"not run: {running} failed"
        self.todo = [k for k in self.todo if k not in self.errors]
        return not self.todo


def run_backends(
    programs: dict[str, VariantProgram],
    seeds: dict[str, list[int]],
    backends: list[str],
    *,
    callbacks: list[dict[str, Any]] | None = None,
    timeout_s: float = 1800.0,
) -> dict[str, dict[str, Any]]:
    """``{backend: {"histories": {"variant/seed": {name: [...]}}, "errors": {"variant/seed":
    message}}}``: every (variant, seed) has a History or an error of its own.

    callbacks: Keras callbacks the worker builds (``{"path", "name", "kwargs", "backend"}``),
    for fault injection in tests; ``backend`` limits one to that backend.
    timeout_s: for each backend's workers together.
    """
    keys = [f"{v}/{s}" for v in programs for s in seeds[v]]
    with tempfile.TemporaryDirectory(prefix="ablab-backends-") as tmp:
        job_dir = Path(tmp)
        write_job(job_dir, programs, seeds, callbacks)
        deadline = time.monotonic() + timeout_s
        running = [_Backend(b, list(keys), timeout_s) for b in backends]
        done: list[_Backend] = []
        try:
            for backend in running:
                backend.start(job_dir)
            while running:
                time.sleep(0.05)
                for backend in list(running):
                    assert backend.proc is not None
                    timed_out = time.monotonic() > deadline
                    if backend.proc.poll() is None and not timed_out:
                        continue
                    if backend.finished(job_dir, timed_out):
                        running.remove(backend)
                        done.append(backend)
                    else:
                        backend.start(job_dir)  # a fresh worker for the entries left
        finally:  # an error or Ctrl-C here must not leave workers running on a deleted folder
            for backend in running:
                backend.stop()
    return {b.name: {"histories": b.histories, "errors": b.errors} for b in done}
