"""Plain Keras training for one backend: ``model.fit`` from given initial weights.

This file runs in two ways:

* imported (``ablab.engine.reference``): the JAX backend, in ablab's own process;
* as a script, ``python -P ablab/engine/fit_worker.py JOB_DIR [KEYS_JSON]``, in a fresh
  interpreter whose ``KERAS_BACKEND`` is set to jax, torch or tensorflow -- so it must not
  import ablab.

A job folder holds ``job.json`` (model JSON, compile and fit arguments, the user's classes
and functions the model names, per-seed entries) and ``arrays.npz`` (rows, per-seed initial
weights in ``model.weights`` order, per-seed shuffle permutations). The worker writes
``result-<backend>.json`` after every entry: ``{"histories": {"variant/seed": {name: [per
epoch]}}, "errors": {"variant/seed": message}, "running": "variant/seed" or null}``. An
entry that raises is an error of its own (and the later seeds of that variant are not run);
the other entries still run. ``running`` names the entry a worker that died was training.

The user's layer classes (``layer = "layers.py:MyLayer"`` or ``"package.module:MyLayer"``),
custom activations and the like are loaded before the model is deserialized, as the engine
loaded them: a study's file under the engine's module name, a module by name (its folder
appended to ``sys.path``); then given to Keras as custom objects by their registered names.

With ``shuffle`` every epoch is one ``model.fit(epochs=1, shuffle=False)`` call on that
epoch's row order (Keras' own shuffle draws from numpy's global RNG and cannot be shared):
the optimizer state carries over between the calls, and each epoch's metrics are fit's own
(streaming: exact for AUC, precision, recall too).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def _take(arrays: Any, index: Any) -> Any:
    """``arrays[index]`` of an array, or of each array of a dict / list (several inputs or
    outputs, as ``fit`` takes them)."""
    if isinstance(arrays, dict):
        return {k: v[index] for k, v in arrays.items()}
    if isinstance(arrays, list | tuple):
        return [v[index] for v in arrays]
    return arrays[index]


def _rows(arrays: Any) -> int:
    if isinstance(arrays, dict):
        return len(next(iter(arrays.values())))
    if isinstance(arrays, list | tuple):
        return len(arrays[0])
    return len(arrays)


def fit_history(
    model: Any,
    x: np.ndarray,
    y: np.ndarray,
    fit: dict[str, Any],
    permutations: np.ndarray | None = None,
    callbacks: list[Any] | None = None,
    sample_weight: np.ndarray | None = None,
    validation: tuple[np.ndarray, np.ndarray, np.ndarray | None] | None = None,
) -> dict[str, list[float]]:
    """Train a compiled ``model`` like ``fit`` and return its History ``{name: [per epoch]}``.

    x, y: all rows (the validation rows last, as ``validation_split`` cuts them), or the
    training rows alone when ``validation`` = ``(x_val, y_val, sample_weight or None)`` is
    given (``fit(validation_data=...)``). sample_weight: (rows,) one per row of ``x``.
    fit: epochs, batch_size, validation_split, validation_batch_size, shuffle, and optionally
    class_weight, steps_per_epoch, early_stopping (``keras.callbacks.EarlyStopping``'s
    arguments), reduce_lr_on_plateau (``keras.callbacks.ReduceLROnPlateau``'s).
    permutations: (epochs, rows) training-row orders when ``shuffle`` is true -- each
    epoch is then one ``fit(epochs=1, shuffle=False)`` on that order (the rows that epoch
    trains on), validated on the validation rows as ``validation_split`` would; an early
    stopper (and a ReduceLROnPlateau) then keeps its state from one call to the next and
    restores at the very end.
    After an early stop every name repeats its last epoch's value up to ``epochs`` (as the
    engine stores it); ``fit["stopped_epoch"]`` is set to the 1-based stop epoch (0: none).
    """
    import keras

    epochs, bs = fit["epochs"], fit["batch_size"]
    vbs = fit.get("validation_batch_size") or bs
    split = fit.get("validation_split", 0.0)
    class_weight = fit.get("class_weight")
    if class_weight is not None:  # JSON keys are strings
        class_weight = {int(k): float(v) for k, v in class_weight.items()}
    steps = fit.get("steps_per_epoch")
    stopper = None
    if fit.get("early_stopping"):
        stopper = keras.callbacks.EarlyStopping(**fit["early_stopping"])
    plateau = None
    if fit.get("reduce_lr_on_plateau"):
        plateau = keras.callbacks.ReduceLROnPlateau(**fit["reduce_lr_on_plateau"])
    # callbacks whose state lasts the whole training (across one-epoch fit calls)
    stateful = [c for c in (plateau, stopper) if c is not None]
    cbs = [*(callbacks or []), *stateful]
    rows: dict[str, list[float]] = {}
    if not fit.get("shuffle"):
        with warnings.catch_warnings():  # steps_per_epoch > batches: fit warns, each epoch
            warnings.filterwarnings("ignore", "Your input ran out of data")
            hist = model.fit(
                x,
                y,
                sample_weight=sample_weight,
                class_weight=class_weight,
                epochs=epochs,
                batch_size=bs,
                steps_per_epoch=steps,
                validation_split=split if validation is None else 0.0,
                validation_data=validation,
                validation_batch_size=vbs,
                shuffle=False,
                verbose=0,
                callbacks=cbs,
            )
        rows = {k: [float(v) for v in vals] for k, vals in hist.history.items()}
    else:
        if validation is None:
            rows_all = _rows(x)
            n_train = int(np.floor(rows_all * (1.0 - split))) if split else rows_all
            x_va, y_va = _take(x, slice(n_train, None)), _take(y, slice(n_train, None))
            sw_va = None if sample_weight is None else sample_weight[n_train:]
            if n_train < rows_all:
                validation = (x_va, y_va, sw_va)
        else:
            n_train = _rows(x)
        x_tr, y_tr = _take(x, slice(None, n_train)), _take(y, slice(None, n_train))
        sw_tr = None if sample_weight is None else sample_weight[:n_train]
        assert permutations is not None
        end = stopper.on_train_end if stopper is not None else None
        for epoch in range(epochs):  # one fit() per epoch, on that epoch's row order
            perm = permutations[epoch]
            for cb in stateful:  # one training across the calls: no reset, restore last
                cb.on_train_end = lambda logs=None: None
                if epoch:
                    cb.on_train_begin = lambda logs=None: None
            hist = model.fit(
                _take(x_tr, perm),
                _take(y_tr, perm),
                sample_weight=None if sw_tr is None else sw_tr[perm],
                class_weight=class_weight,
                initial_epoch=epoch,  # callbacks see the real epoch number
                epochs=epoch + 1,
                batch_size=bs,
                validation_data=validation,
                validation_batch_size=vbs,
                shuffle=False,
                verbose=0,
                callbacks=cbs,
            )
            for k, vals in hist.history.items():
                rows.setdefault(k, []).append(float(vals[-1]))
            if model.stop_training:
                break
        if end is not None:
            end()
    ran = len(next(iter(rows.values())))
    if stopper is not None:  # Keras' own (0-based, 0 = never: it cannot stop at epoch 0)
        fit["stopped_epoch"] = stopper.stopped_epoch + 1 if stopper.stopped_epoch else 0
    return {k: v + [v[-1]] * (epochs - ran) for k, v in rows.items()}


def _load_callback(spec: dict[str, Any]) -> Any:
    path = Path(spec["path"])
    module_spec = importlib.util.spec_from_file_location(f"ablab_cb_{path.stem}", path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return getattr(module, spec["name"])(**spec.get("kwargs", {}))


def _user_module(spec: dict[str, Any]) -> Any:
    name = spec["module"]
    module = sys.modules.get(name)
    if module is not None:
        return module
    if spec.get("file"):  # a study's own file: loaded as ablab.engine.model loads it
        module_spec = importlib.util.spec_from_file_location(name, spec["file"])
        assert module_spec is not None and module_spec.loader is not None
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        try:
            module_spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
        return module
    root = spec.get("sys_path")
    if root and root not in sys.path:  # last: it must not shadow what the worker imports
        sys.path.append(root)
    return importlib.import_module(name)


def load_user_objects(specs: list[dict[str, Any]]) -> tuple[dict[str, Any], list[str]]:
    """``({registered name: object}, [why one could not be loaded])`` for the user's classes
    and functions ``specs`` name (``{"module", "attr", "file", "sys_path"}``, as
    ``ablab.engine.reference.UserObject.to_job`` writes them)."""
    import keras

    found: dict[str, Any] = {}
    problems: list[str] = []
    for spec in specs:
        where = spec["file"] or spec["module"]
        try:
            obj = _user_module(spec)
            for part in spec["attr"].split("."):
                obj = getattr(obj, part)
        except Exception as exc:
            problems.append(f"loading {spec['attr']} from {where}: {type(exc).__name__}: {exc}")
            continue
        found[keras.saving.get_registered_name(obj)] = obj
    return found, problems


def _deserialize(entry: dict[str, Any]) -> Any:
    import keras

    custom, problems = load_user_objects(entry.get("user_objects", []))
    try:
        with keras.saving.custom_object_scope(custom):
            return keras.models.model_from_json(entry["model_json"], custom_objects=custom)
    except Exception as exc:
        if problems:  # the cause, more likely than the Keras message
            raise RuntimeError(f"{'; '.join(problems)} (then: {exc})") from exc
        raise


def _data_loss_class() -> Any:
    """``ablab.engine.data_loss.DataLoss``, loaded from its file: importing the package
    ``ablab.engine`` would load the JAX-only engine under this worker's backend."""
    name = "ablab_fit_worker_data_loss"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, Path(__file__).with_name("data_loss.py")
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name].DataLoss


def run_entry(entry: dict[str, Any], arrays: Any) -> dict[str, list[float]]:
    """One (variant, seed) entry of a job under the current Keras backend: its History."""
    import keras

    policy = entry["fit"].get("dtype_policy", "float32")
    before = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)  # the model as the engine built it (mixed precision)
    data_loss = _data_loss_class()  # registered before the model's compile config is read
    try:
        model = _deserialize(entry)
    finally:
        keras.config.set_dtype_policy(before)
    get = lambda c: keras.losses.get(c) if isinstance(c, dict) else c  # noqa: E731
    loss = entry["loss"]
    per_output = entry.get("per_output_loss", False)  # {output: loss}
    model.compile(
        optimizer=keras.optimizers.get(entry["optimizer"]),
        loss={k: get(c) for k, c in loss.items()} if per_output else get(loss),
        metrics=[keras.metrics.get(m) if isinstance(m, dict) else m for m in entry["metrics"]],
        # History data_loss, as the engine (not for several outputs)
        weighted_metrics=[data_loss(loss)] if entry.get("data_loss", True) else None,
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
    data = entry["data"]
    structure = entry.get("structure", {})

    def got(name: str) -> Any:
        """One array, or the dict / list of a multi-input / multi-output model's arrays."""
        nested = structure.get(name)
        if isinstance(nested, list):
            return {k: arrays[f"{data}/{name}.{k}"] for k in nested}
        if isinstance(nested, int):
            return [arrays[f"{data}/{name}.{i}"] for i in range(nested)]
        return arrays[f"{data}/{name}"] if f"{data}/{name}" in arrays.files else None

    validation = None
    if got("x_val") is not None:  # fit(validation_data=...)
        validation = (got("x_val"), got("y_val"), got("sw_val"))
    return fit_history(
        model, got("x"), got("y"), entry["fit"], perms, callbacks, got("sw"), validation
    )


def _message(exc: BaseException, limit: int = 600) -> str:
    """One line: Keras' layer-call errors lose their bold and their argument dump."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).split("\n\nArguments received")[0]
    text = " ".join(f"{type(exc).__name__}: {text}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def run_job(
    job_dir: Path,
    keys: list[str] | None = None,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run the entries of a job folder (those named in ``keys``; None: all) under the
    current Keras backend, each on its own: ``{"histories", "errors", "running"}``.

    on_progress(result): called before and after every entry (the script writes the
    result file, so a worker that dies leaves what it finished and what it was running).
    """
    job = json.loads((job_dir / "job.json").read_text())
    arrays = np.load(job_dir / "arrays.npz")
    wanted = None if keys is None else set(keys)
    result: dict[str, Any] = {"histories": {}, "errors": {}, "running": None}
    failed: dict[str, str] = {}  # variant -> the key that failed
    for entry in job["entries"]:
        key, variant = entry["key"], entry["data"]
        if wanted is not None and key not in wanted:
            continue
        if variant in failed:
            result["errors"][key] = f"not run: {failed[variant]} failed"
            continue
        result["running"] = key
        if on_progress is not None:
            on_progress(result)
        try:
            result["histories"][key] = run_entry(entry, arrays)
        except Exception as exc:
            result["errors"][key] = _message(exc)
            failed[variant] = key
        result["running"] = None
        if on_progress is not None:
            on_progress(result)
    return result


def main(argv: list[str]) -> int:
    """``fit_worker.py JOB_DIR [KEYS_JSON]``: KEYS_JSON, a file listing the entries to run."""
    job_dir = Path(argv[0])
    keys = json.loads(Path(argv[1]).read_text()) if len(argv) > 1 else None
    backend = os.environ.get("KERAS_BACKEND", "?")
    tmp = job_dir / f".result-{backend}.json.tmp"

    def write(result: dict[str, Any]) -> None:
        tmp.write_text(json.dumps(result))
        os.replace(tmp, job_dir / f"result-{backend}.json")

    run_job(job_dir, keys, write)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
