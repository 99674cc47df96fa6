"""Plain Keras training for one backend: ``model.fit`` from given initial weights.

This file runs in two ways:

* imported (``ablab.engine.reference``): the JAX backend, in ablab's own process;
* as a script, ``python -P ablab/engine/fit_worker.py JOB_DIR``, in a fresh interpreter whose
  ``KERAS_BACKEND`` is set to jax, torch or tensorflow -- so it must not import ablab.

A job folder holds ``job.json`` (model JSON, compile and fit arguments, per-seed entries)
and ``arrays.npz`` (rows, per-seed initial weights in ``model.weights`` order, per-seed
shuffle permutations). The worker writes ``result-<backend>.json``:
``{"variant/seed": {name: [per epoch]}}``.

With ``shuffle`` every epoch is one ``model.fit(epochs=1, shuffle=False)`` call on that
epoch's row order (Keras' own shuffle draws from numpy's global RNG and cannot be shared):
the optimizer state carries over between the calls, and each epoch's metrics are fit's own
(streaming: exact for AUC, precision, recall too).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np


def fit_history(
    model: Any,
    x: np.ndarray,
    y: np.ndarray,
    fit: dict[str, Any],
    permutations: np.ndarray | None = None,
    callbacks: list[Any] | None = None,
) -> dict[str, list[float]]:
    """Train a compiled ``model`` like ``fit`` and return its History ``{name: [per epoch]}``.

    x, y: all rows (the validation rows last, as ``validation_split`` cuts them).
    fit: epochs, batch_size, validation_split, validation_batch_size, shuffle.
    permutations: (epochs, n_train) training-row orders when ``shuffle`` is true -- each
    epoch is then one ``fit(epochs=1, shuffle=False)`` on that order, validated on the
    validation rows as ``validation_split`` would.
    """
    epochs, bs = fit["epochs"], fit["batch_size"]
    vbs = fit.get("validation_batch_size") or bs
    split = fit.get("validation_split", 0.0)
    if not fit.get("shuffle"):
        hist = model.fit(
            x,
            y,
            epochs=epochs,
            batch_size=bs,
            validation_split=split,
            validation_batch_size=vbs,
            shuffle=False,
            verbose=0,
            callbacks=callbacks or [],
        )
        return {k: [float(v) for v in vals] for k, vals in hist.history.items()}
    n_train = int(np.floor(len(x) * (1.0 - split))) if split else len(x)
    x_tr, y_tr, x_va, y_va = x[:n_train], y[:n_train], x[n_train:], y[n_train:]
    assert permutations is not None
    rows: dict[str, list[float]] = {}
    for epoch in range(epochs):  # one fit() per epoch, on that epoch's row order
        perm = permutations[epoch]
        hist = model.fit(
            x_tr[perm],
            y_tr[perm],
            initial_epoch=epoch,  # callbacks see the real epoch number
            epochs=epoch + 1,
            batch_size=bs,
            validation_data=(x_va, y_va) if len(x_va) else None,
            validation_batch_size=vbs,
            shuffle=False,
            verbose=0,
            callbacks=callbacks or [],
        )
        for k, vals in hist.history.items():
            rows.setdefault(k, []).append(float(vals[-1]))
    return rows


def _load_callback(spec: dict[str, Any]) -> Any:
    path = Path(spec["path"])
    module_spec = importlib.util.spec_from_file_location(f"ablab_cb_{path.stem}", path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return getattr(module, spec["name"])(**spec.get("kwargs", {}))


def run_job(job_dir: Path) -> dict[str, dict[str, list[float]]]:
    """Run every entry of a job folder under the current Keras backend."""
    import keras

    job = json.loads((job_dir / "job.json").read_text())
    arrays = np.load(job_dir / "arrays.npz")
    out: dict[str, dict[str, list[float]]] = {}
    for entry in job["entries"]:
        model = keras.models.model_from_json(entry["model_json"])
        model.compile(
            optimizer=keras.optimizers.get(entry["optimizer"]),
            loss=keras.losses.get(entry["loss"])
            if isinstance(entry["loss"], dict)
            else entry["loss"],
            metrics=[keras.metrics.get(m) if isinstance(m, dict) else m for m in entry["metrics"]],
        )
        key = entry["key"]
        weights = [arrays[f"{key}/w{i}"] for i in range(entry["n_weights"])]
        model.set_weights(weights)
        perms = arrays[f"{key}/perm"] if f"{key}/perm" in arrays.files else None
        callbacks = [
            _load_callback(c)
            for c in entry.get("callbacks", [])
            if c.get("backend") in (None, keras.backend.backend())
        ]
        out[key] = fit_history(
            model,
            arrays[f"{entry['data']}/x"],
            arrays[f"{entry['data']}/y"],
            entry["fit"],
            perms,
            callbacks,
        )
    return out


def main(argv: list[str]) -> int:
    job_dir = Path(argv[0])
    result = run_job(job_dir)
    backend = os.environ.get("KERAS_BACKEND", "?")
    tmp = job_dir / f".result-{backend}.json.tmp"
    tmp.write_text(json.dumps(result))
    os.replace(tmp, job_dir / f"result-{backend}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
