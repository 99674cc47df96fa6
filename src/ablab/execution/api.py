"""``ablab.ablate``: a study in Keras' own vocabulary -- model functions, arrays, ``compile``
and ``fit`` arguments -- trained over many paired seeds like any study.

    >>> result = ablab.ablate(  # doctest: +SKIP
    ...     {"plain": build_plain, "bn": build_bn}, x, y,
    ...     compile=dict(optimizer="adam", loss="mse"),
    ...     fit=dict(epochs=20, batch_size=32, validation_split=0.1, shuffle=False),
    ...     seeds=1000,
    ... )

The arrays and every model that a fresh process could not import are stored in the run folder
(``data/*.npz``, ``models/<variant>.json``; their SHA-256 in ``cells.sha256``), and the run's
study document names them, so ``ablab run --resume``, ``ablab show`` and ``ablab report``
work on the run from the command line like on a study file's.
"""

from __future__ import annotations

import importlib
import io
import re
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import keras
import numpy as np

from ablab.errors import StudyError, short_repr
from ablab.execution.executors import Executor
from ablab.execution.pipeline import run
from ablab.execution.progress import Progress
from ablab.execution.result import RunResult
from ablab.study.loading import study_from_dict
from ablab.study.schema import TrainSpec

SOURCE = "ablab.ablate"
"""The ``where`` of every error about ``ablate``'s arguments (and the stored study's source)."""

COMPILE_KEYS = ("optimizer", "loss", "metrics")
"""The ``model.compile`` arguments ablab takes (the rest change nothing ablab records)."""
DATA_FIT_KEYS = ("sample_weight", "validation_data")
"""``fit`` arguments that are arrays: stored with ``x`` and ``y``."""
IGNORED_FIT_KEYS = ("verbose",)
"""``fit`` arguments accepted and ignored (ablab prints no per-seed progress)."""

ModelFactory = Callable[[], keras.Model]


def _err(key: str, expected: str, got: str, fix: str) -> StudyError:
    return StudyError(where=SOURCE, key=key, expected=expected, got=got, fix=fix)


def _several(value: Any) -> bool:
    """A dict / list of arrays (a multi-input / multi-output model's), not one array?"""
    return isinstance(value, Mapping) or (
        isinstance(value, list | tuple) and any(hasattr(v, "shape") for v in value)
    )


def _arrays(key: str, value: Any) -> Any:
    """One numeric array, or a dict (input / output name -> array) or list of them -- as
    ``fit`` takes ``x`` and ``y`` of a multi-input / multi-output model -- all with the
    same number of rows."""
    if not _several(value):
        return _array(key, value)
    if not value:
        raise _err(key, "at least one array", f"an empty {type(value).__name__}", "pass arrays")
    if isinstance(value, Mapping):
        bad = [k for k in value if not isinstance(k, str) or not k]
        if bad:
            raise _err(
                key,
                "a dict keyed by the model's input / output names",
                f"key {bad[0]!r}",
                "key each array by its keras.Input (or output layer) name",
            )
        out: Any = {k: _array(f"{key}.{k}", v) for k, v in value.items()}
        named = list(out.items())
        names = [f"{key}.{k}" for k in out]
    else:
        out = [_array(f"{key}[{i}]", v) for i, v in enumerate(value)]
        named = list(enumerate(out))
        names = [f"{key}[{i}]" for i in range(len(out))]
    rows = _rows(out)
    for name, (_, arr) in zip(names, named, strict=True):
        _same_rows(name, arr, rows, names[0])
    return out


def _leaves(value: Any) -> list[np.ndarray]:
    if isinstance(value, Mapping):
        return list(value.values())
    return list(value) if isinstance(value, list) else [value]


def _rows(value: Any) -> int:
    return int(_leaves(value)[0].shape[0])


def _same_rows_all(key: str, value: Any, rows: int, of: str) -> None:
    """Every array of ``value`` (one, or a dict / list) has ``rows`` rows."""
    if isinstance(value, Mapping):
        for k, arr in value.items():
            _same_rows(f"{key}.{k}", arr, rows, of)
    elif isinstance(value, list):
        for i, arr in enumerate(value):
            _same_rows(f"{key}[{i}]", arr, rows, of)
    else:
        _same_rows(key, value, rows, of)


def _store(
    arrays: dict[str, np.ndarray], spec: dict[str, Any], name: str, value: Any, one: str, many: str
) -> None:
    """Put ``value`` in ``arrays`` (npz names ``name`` or ``name.<key>``) and name it in the
    ``[data]`` table ``spec``: ``one`` (x_key / target) or ``many`` (x_keys / targets)."""
    if isinstance(value, Mapping):
        spec[many] = {k: f"{name}.{k}" for k in value}
        arrays.update({f"{name}.{k}": v for k, v in value.items()})
    elif isinstance(value, list):
        spec[many] = [f"{name}.{i}" for i in range(len(value))]
        arrays.update({f"{name}.{i}": v for i, v in enumerate(value)})
    else:
        spec[one] = name
        arrays[name] = value


def _array(key: str, value: Any) -> np.ndarray:
    """One numeric array with a row dimension."""
    if _several(value):
        raise _err(
            key,
            "one array (one value per row)",
            f"a {type(value).__name__} of {len(value)} arrays",
            "pass one array (per-input / per-output arrays are taken for x and y only)",
        )
    try:
        arr = np.asarray(value)
    except Exception as exc:  # ragged lists and the like
        raise _err(
            key, "a numeric array", f"{type(exc).__name__}: {exc}", "pass a numpy array"
        ) from exc
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise _err(
            key,
            "a numeric array",
            f"dtype {arr.dtype} ({short_repr(value, 40)})",
            "encode the data as numbers first",
        )
    if arr.ndim == 0 or arr.shape[0] == 0:
        raise _err(key, "an array with at least one row", f"shape {arr.shape}", "pass the rows")
    return arr


def _same_rows(key: str, arr: np.ndarray, rows: int, of: str) -> None:
    if arr.shape[0] != rows:
        raise _err(
            key,
            f"{rows} rows, one per row of {of}",
            f"{arr.shape[0]} rows (shape {arr.shape})",
            f"give {key} and {of} the same number of rows",
        )


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def _importable_name(fn: Any) -> str | None:
    """``module:qualname`` of a module-level function a fresh interpreter can import (the same
    object), else None (a lambda, a closure, a function of ``__main__`` or a notebook)."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if not module or not qualname or module == "__main__" or not re.fullmatch(r"\w+", qualname):
        return None
    try:
        found = getattr(importlib.import_module(module), qualname)
    except Exception:
        return None
    return f"{module}:{qualname}" if found is fn else None


def _architecture(name: str, model: Any) -> str:
    """``model.to_json()``: the architecture a stored run rebuilds the variant from."""
    key = f"variants.{name}"
    if not isinstance(model, keras.Model):
        raise _err(
            key,
            "a function returning a keras.Model, or a keras.Model",
            f"{type(model).__name__} ({short_repr(model, 40)})",
            "return the (uncompiled) model from the function, e.g. "
            "`def build(): return keras.Sequential([...])`",
        )
    try:
        text = model.to_json()
        keras.models.model_from_json(text)  # a subclass without get_config fails here
    except Exception as exc:
        raise _err(
            key,
            "a model Keras can serialize (model.to_json(); a custom layer registered with "
            "keras.saving.register_keras_serializable)",
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
            "define the model function at the top level of an importable module (ablab then "
            "stores its name), or make its layers serializable",
        ) from exc
    return text


def _builders(variants: Any, staging: Path) -> dict[str, dict[str, Any]]:
    """The study's variants: an importable function by name, anything else as a saved
    architecture file under ``staging/models``."""
    if not isinstance(variants, Mapping) or not variants:
        raise _err(
            "variants",
            'a dict of named variants, e.g. {"plain": build_plain, "bn": build_bn}',
            short_repr(variants),
            "map each variant's name to a function returning its keras.Model (or a model)",
        )
    out: dict[str, dict[str, Any]] = {}
    for name, spec in variants.items():
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.~+-]*", name):
            raise _err(
                "variants",
                "names of letters, digits and _ . ~ + -",
                repr(name),
                "rename the variant, e.g. bn_after",
            )
        if name == "baseline":  # the study's [variants] table keeps that key for itself
            raise _err(
                "variants",
                "variant names other than 'baseline'",
                "'baseline'",
                "rename the variant and pass baseline='<its name>' to choose the baseline",
            )
        if isinstance(spec, keras.Model):
            model = spec
        elif callable(spec):
            ref = _importable_name(spec)
            if ref is not None:
                out[name] = {"builder": ref}
                continue
            try:
                model = spec()
            except Exception as exc:
                raise _err(
                    f"variants.{name}",
                    "a function that builds the model when called without arguments",
                    f"{type(exc).__name__}: {exc}",
                    "fix the function (or use functools.partial to bind its arguments)",
                ) from exc
        else:
            model = spec  # refused with the message below
        path = staging / "models" / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(_architecture(name, model), encoding="utf-8")
        out[name] = {"builder": f"models/{name}.json"}
    return out


def _keras_object(key: str, value: Any) -> Any:
    """A compile argument as a study takes it: a name or table stays; a Keras optimizer
    object becomes ``{name = class, **config}``."""
    if value is None or isinstance(value, str | Mapping | list | tuple):
        return list(value) if isinstance(value, tuple) else value
    if isinstance(value, keras.optimizers.Optimizer):
        config = {k: v for k, v in value.get_config().items() if k != "name"}
        if not isinstance(config.get("learning_rate"), int | float):
            raise _err(
                key,
                "an optimizer with a fixed learning rate (or a table naming its schedule)",
                short_repr(config.get("learning_rate")),
                'give it as a table: {"name": "adam", "learning_rate": {"schedule": '
                '"ExponentialDecay", "initial_learning_rate": 0.01, ...}}',
            )
        return {"name": type(value).__name__, **config}
    raise _err(
        key,
        "a Keras name or a table, e.g. 'mse' or {'name': 'Huber', 'delta': 1.0}",
        f"a {type(value).__name__} object",
        "give the loss / metric by name (with its arguments as a table)",
    )


def _train(compile: Mapping[str, Any] | None, fit: Mapping[str, Any] | None) -> dict[str, Any]:
    train: dict[str, Any] = {}
    for key, value in (compile or {}).items():
        if key not in COMPILE_KEYS:
            raise _err(
                f"compile.{key}",
                f"one of the compile arguments ablab takes: {', '.join(COMPILE_KEYS)}",
                f"unknown argument {key!r}",
                "remove it (the others do not change the History ablab records)",
            )
        if key == "metrics":
            value = [_keras_object(f"compile.metrics[{i}]", m) for i, m in enumerate(value or [])]
        else:
            value = _keras_object(f"compile.{key}", value)
        train[key] = value
    # `callbacks` is no field: TrainSpec turns EarlyStopping objects / tables into
    # `early_stopping` and refuses any other callback with the reason
    fit_keys = [k for k in TrainSpec.model_fields if k not in COMPILE_KEYS] + ["callbacks"]
    for key, value in (fit or {}).items():
        if key in IGNORED_FIT_KEYS or key in DATA_FIT_KEYS:
            continue
        if key not in fit_keys:
            raise _err(
                f"fit.{key}",
                "one of the fit arguments ablab takes: " + ", ".join([*fit_keys, *DATA_FIT_KEYS]),
                f"unknown argument {key!r}",
                "remove it (x and y are ablate's own arguments)"
                if key in ("x", "y")
                else "remove it, or train that setting with model.fit",
            )
        train[key] = value
    return train


def _data(x: Any, y: Any, fit: Mapping[str, Any] | None, staging: Path) -> dict[str, Any]:
    """Validate the arrays and store them under ``staging/data``; the ``[data]`` table naming
    them."""
    if y is None:
        raise _err(
            "y",
            "a target array (one row per row of x)",
            "None",
            "pass y=x for an autoencoder (the target is the input)",
        )
    fit = fit or {}
    arrays, spec = _rows_of(
        "data/arrays.npz", "x", x, "y", y, "fit.sample_weight", fit.get("sample_weight"), "x"
    )
    if fit.get("validation_data") is not None:
        val = fit["validation_data"]
        if not isinstance(val, list | tuple) or len(val) not in (2, 3):
            raise _err(
                "fit.validation_data",
                "a tuple (x_val, y_val) or (x_val, y_val, sample_weight_val)",
                short_repr(val),
                "pass validation_data=(x_val, y_val)",
            )
        vals, vspec = _rows_of(
            "data/validation.npz",
            "fit.validation_data[0]", val[0],
            "fit.validation_data[1]", val[1],
            "fit.validation_data[2]", val[2] if len(val) == 3 else None,
            "validation_data[0]",
        )  # fmt: skip
        (staging / "data").mkdir(parents=True, exist_ok=True)
        (staging / "data" / "validation.npz").write_bytes(_npz(vals))
        spec["validation"] = vspec
    (staging / "data").mkdir(parents=True, exist_ok=True)
    (staging / "data" / "arrays.npz").write_bytes(_npz(arrays))
    return spec


def _rows_of(
    path: str, x_key: str, x: Any, y_key: str, y: Any, sw_key: str, sw: Any, x_name: str
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """One set of rows (training, or ``validation_data``): its arrays, checked for one row
    count (named by ``x_key`` / ``y_key`` / ``sw_key``, against ``x_name``), and the data
    table entries that name them in the npz file ``path``."""
    xa, ya = _arrays(x_key, x), _arrays(y_key, y)
    rows = _rows(xa)
    _same_rows_all(y_key, ya, rows, x_name)
    arrays: dict[str, np.ndarray] = {}
    spec: dict[str, Any] = {"path": path}
    _store(arrays, spec, "x", xa, "x_key", "x_keys")
    _store(arrays, spec, "y", ya, "target", "targets")
    if sw is not None:
        weights = _array(sw_key, sw)
        _same_rows(sw_key, weights, rows, x_name)
        arrays["sample_weight"], spec["sample_weight"] = weights, "sample_weight"
    return arrays, spec


def _in_ablate_terms(exc: StudyError) -> StudyError:
    """A study error named by ablate's arguments: ``train.loss`` -> ``compile.loss``,
    ``train.epochs`` -> ``fit.epochs``."""
    key = exc.key
    if key.startswith("train."):
        field = key.removeprefix("train.").split(".", 1)[0].split("[", 1)[0]
        key = ("compile." if field in COMPILE_KEYS else "fit.") + key.removeprefix("train.")
    elif key == "train":
        key = "compile / fit"
    if key == exc.key:
        return exc
    return StudyError(where=SOURCE, key=key, expected=exc.expected, got=exc.got, fix=exc.fix)


def ablate(
    variants: Mapping[str, ModelFactory | keras.Model],
    x: Any,
    y: Any = None,
    *,
    compile: Mapping[str, Any] | None = None,
    fit: Mapping[str, Any] | None = None,
    seeds: int = 1000,
    seed_base: int = 0,
    baseline: str | None = None,
    name: str = "ablate",
    description: str = "",
    verdicts: Mapping[str, Any] | None = None,
    checks: Mapping[str, Any] | None = None,
    probes: Mapping[str, Any] | None = None,
    engine: Mapping[str, Any] | None = None,
    runs_dir: str | Path | None = None,
    progress: Progress | None = None,
    executor: str | Executor = "local",
    workers: int | None = None,
) -> RunResult:
    """Train each variant's model over ``seeds`` paired seeds, as ``model.compile(**compile)``
    then ``model.fit(x, y, **fit)`` would one seed, and judge each against the baseline.

    variants: ``{name: model}`` in order, the first the baseline unless ``baseline`` names
    another; a model is a function returning a fresh, uncompiled ``keras.Model`` (called
    without arguments) or a ``keras.Model`` object (its architecture is cloned; its weights
    are not used: ablab draws every seed's initial weights from the layers' initializers).
    x, y: numpy arrays (anything ``np.asarray`` takes) with the same number of rows; y=x for an
    autoencoder. A multi-input / multi-output model takes dicts (keyed by its input / output
    names) or lists of arrays, as ``fit`` does (its probes are not recorded).
    compile: optimizer (a name, a table ``{"name": "adam", "learning_rate": 1e-3}`` or a
    Keras optimizer object with a fixed rate), loss and metrics (names or tables).
    fit: the ``[train]`` keys of a study file (epochs, batch_size, validation_split, shuffle,
    ...) and the arrays ``sample_weight`` and ``validation_data``; ``verbose`` is ignored.
    verdicts / checks / probes / engine: the study file's tables of those names.
    The other arguments are :func:`ablab.run`'s.

    What is stored, besides the run's usual files: ``data/arrays.npz`` (x, y and any
    sample_weight; ``data/validation.npz`` for validation_data), and per variant either the
    ``module:function`` name of a module-level function a fresh interpreter can import, or
    ``models/<variant>.json`` (``model.to_json()``: the architecture, no weights) for a
    lambda, a closure, a function of ``__main__`` / a notebook, or a model object -- so a
    resumed run (``ablab run --resume``) rebuilds exactly the models it started with. Every
    stored file's SHA-256 is in ``cells.sha256``; a resume refuses changed files.

    Raises StudyError (``where`` = "ablab.ablate"; the key names the argument, e.g.
    ``fit.epochs``) on bad input, before anything is written.
    """
    with tempfile.TemporaryDirectory(prefix="ablab-ablate-") as tmp:
        staging = Path(tmp)
        spec = {
            "name": name,
            "description": description,
            "data": _data(x, y, fit, staging),
            "train": _train(compile, fit),
            "variants": {**_builders(variants, staging), "baseline": baseline},
            "seeds": {"count": seeds, "base": seed_base},
        }
        extra = {"verdicts": verdicts, "checks": checks, "probes": probes, "engine": engine}
        spec.update({k: dict(v) for k, v in extra.items() if v is not None})
        try:
            study = study_from_dict(spec, source=SOURCE, root=str(staging))
        except StudyError as exc:
            raise _in_ablate_terms(exc) from exc
        try:
            return run(
                study,
                runs_dir=runs_dir,
                progress=progress,
                executor=executor,
                workers=workers,
                attachments=staging,
            )
        except StudyError as exc:
            raise _in_ablate_terms(exc) from exc
