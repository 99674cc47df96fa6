"""Traced programs kept between runs, so a warm ``ablab run`` does not trace its models again.

JAX's persistent compilation cache (``ablab.engine.xla``) skips XLA's compile, but every run
still traced every program -- Keras' ``train_step`` under ``vmap`` and ``scan``, 0.2-0.7 s per
program on 2 cores, ~3 s of the seed study's warm 14 s (train, checks' trajectory and
initial-weight programs). Here a traced program is exported (``jax.export``: its StableHLO
and pytree structure), stored under a key of everything the trace depends on, and a later
run loads it instead of tracing. The stored program is what would be traced again, so the
results are the same bits (the engine compiles the exported module on a miss too: one path,
one XLA cache entry per program).

The key is conservative. A trace depends on code, settings and shapes, never on the data's
values (the rows are the program's arguments); the key covers:

* the program (train / trajectory / init), its seed count and recorder (probes: their
  layers, BatchNormalization's, the rows per BN-probe chunk);
* the study's description of the model -- its layer list, as strict JSON (with the data's
  shapes it is the whole Keras model: ``keras.Sequential`` of those layers) -- and the
  variant's [train] table (loss, optimizer, metrics, fit arguments, early stopping,
  ReduceLROnPlateau, dtype policy), the epoch layout (rows, batches, shuffle, steps), the
  optimizer's and metrics' initial values, and the argument shapes and dtypes;
* ablab's own source files, the versions of Python, jax, jaxlib, keras and numpy, the
  backend and device kind, every JAX config value (dtype promotion, x64, PRNG, matmul
  precision, ...) and Keras' (floatx, epsilon, dtype policy, image data format), and the
  lowerings in use (``$ABLAB_LOWERINGS``).

Only models built from a study's layer list of Keras' (and ablab's) own objects are kept
(:func:`own_objects_only`): a builder, a stored or given model object, a layer or function of
the user's (``"file.py:Class"``, a registered ``"Package>name"``, a callable held by a layer),
or anything the user registered with Keras is traced every time, since its Python code could
change without its config changing. Off with the compilation cache
(``ABLAB_COMPILATION_CACHE=0`` / ``--no-compilation-cache``); stored next to it
(``<cache>/traces``), at most :data:`MAX_BYTES` (least recently used dropped first). A trace
that fails to load, export or lower is traced again the plain way.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import keras
import numpy as np

from ablab._keras import flatten_layers
from ablab._source import source_digest

MAX_BYTES = 512 * 2**20
SUFFIX = ".jaxexport"
_lock = threading.Lock()


def trace_dir() -> Path | None:
    """Where traced programs are kept: ``<ablab's compilation cache>/traces``; None when the
    compilation cache is off."""
    from ablab.engine.xla import cache_dir

    folder = cache_dir()
    return None if folder is None else folder / "traces"


@functools.cache
def _versions() -> dict[str, str]:
    """The versions every trace depends on (fixed for the process)."""
    import jaxlib

    return {
        "python": sys.version,
        "machine": platform.machine(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "ablab": source_digest(),
    }


def _environment() -> dict[str, Any]:
    """Versions, the backend and every JAX config value, thread-local ones included (read at
    each key: a ``jax.config.update`` between two programs must change the key)."""
    config = {
        k: repr(v)
        for k, v in sorted(jax.config.values.items())
        # where caches and logs go, and how chatty JAX is, do not change a program
        if not any(word in k for word in ("cache", "log", "explain", "traceback", "debug"))
    }
    device = jax.devices()[0]
    return {
        **_versions(),
        "backend": jax.default_backend(),
        "device": getattr(device, "device_kind", str(device.platform)),
        "jax_config": config,  # (with a `with jax.default_matmul_precision(...)` block's)
    }


def _keras_config() -> dict[str, Any]:
    return {
        "floatx": keras.config.floatx(),
        "epsilon": keras.config.epsilon(),
        "image_data_format": keras.config.image_data_format(),
        "dtype_policy": keras.config.dtype_policy().name,
        "backend": keras.config.backend(),
    }


_OWN = ("keras", "ablab")
_HARMLESS = (*_OWN, "builtins", "numpy", "jax", "jaxlib")


def own_objects_only(model: keras.Model, configs: list[str]) -> bool:
    """Are ``model`` (a Sequential or functional model) and ``configs`` (strict JSON: the
    study's layer list, its [train] table) made of Keras' and ablab's own classes and
    functions only? Only then do their configs describe their code: any class of the user's,
    any function or callable object a layer holds that is not Keras', any object registered
    with Keras by the user, or a name of the user's code (``"file.py:name"``,
    ``"module:name"``, ``"Package>name"``) keeps no trace."""
    cls = type(model)
    if cls.__module__.split(".")[0] != "keras" or cls.__name__ not in ("Sequential", "Functional"):
        return False  # a subclassed model: its call() is code, not config
    registered = keras.saving.get_custom_objects()
    if any(not name.startswith("ablab>") for name in registered):
        return False  # a plain name in a config may resolve to the user's object
    for layer in flatten_layers(model, include_self=False):
        if type(layer).__module__.split(".")[0] not in _OWN:
            return False
        for held in _held(vars(layer).values()):
            if isinstance(held, keras.Layer | type):
                continue
            if callable(held) or hasattr(held, "get_config"):
                module = getattr(held, "__module__", None) or type(held).__module__
                if (module or "").split(".")[0] not in _HARMLESS:
                    return False
    strings: list[str] = []
    for config in configs:
        _strings(json.loads(config), strings)
    return not any(":" in s or ">" in s for s in strings)


def _held(values: Any) -> list[Any]:
    """Objects held directly or in lists, tuples and dicts (one level deep)."""
    out: list[Any] = []
    for v in values:
        if isinstance(v, list | tuple):
            out.extend(v)
        elif isinstance(v, dict):
            out.extend(v.values())
        else:
            out.append(v)
    return out


def _strings(tree: Any, out: list[str]) -> None:
    if isinstance(tree, str):
        out.append(tree)
    elif isinstance(tree, dict):
        for k, v in tree.items():
            out.append(str(k))
            _strings(v, out)
    elif isinstance(tree, list | tuple):
        for v in tree:
            _strings(v, out)


def program_key(parts: dict[str, Any]) -> str:
    """The key of one traced program: ``parts`` (the program's own description, JSON-able)
    with the environment's versions and settings."""
    from ablab.engine import lowering

    text = json.dumps(
        {
            "program": parts,
            "keras": _keras_config(),
            "lowerings": sorted(lowering.enabled()),
            "environment": _environment(),
        },
        sort_keys=True,
        default=repr,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def array_digest(arrays: list[Any]) -> str:
    """sha256 of arrays' dtypes, shapes and bytes (the optimizer's and metrics' initial values,
    constants of the trace)."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:32]


def _load(path: Path) -> Any | None:
    try:
        blob = path.read_bytes()
        os.utime(path)  # used now: the eviction drops the least recently used first
    except OSError:
        return None
    try:
        return jax.export.deserialize(bytearray(blob))
    except Exception:  # damaged, or written by another version: trace again
        path.unlink(missing_ok=True)
        return None


def _store(folder: Path, path: Path, exported: Any) -> None:
    """Write atomically (a reader sees the old file or the whole new one), then keep the
    folder within MAX_BYTES (least recently used first out). Failing to store is not an error."""
    tmp = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(exported.serialize())
        os.replace(tmp, path)
        tmp = None
        with _lock:
            files = sorted(folder.glob(f"*{SUFFIX}"), key=lambda p: p.stat().st_mtime)
            total = sum(p.stat().st_size for p in files)
            for old in files:
                if total <= MAX_BYTES:
                    break
                total -= old.stat().st_size
                old.unlink(missing_ok=True)
    except OSError:
        pass
    finally:
        if tmp is not None:  # a failed write leaves nothing behind
            Path(tmp).unlink(missing_ok=True)


def exported_program(
    key: str, fn: Callable[..., Any], args: tuple[Any, ...], trace: Callable[[], Any]
) -> Any:
    """``jax.export.Exported`` of ``fn`` at ``args``' shapes: loaded under ``key`` if stored,
    else exported (``trace()`` sets the tracing context: ``with trace(): ...``) and stored
    (unless the cache is off). Raises what tracing raises."""
    folder = trace_dir()
    path = None if folder is None else folder / f"{key}{SUFFIX}"
    if path is not None and path.exists():
        found = _load(path)
        if found is not None and found.in_tree == jax.tree.structure((args, {})):
            return found
    specs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args)
    from ablab.engine.small_products import TARGETS

    # the engine's own kernels (``small_products``) are custom calls JAX's export would refuse
    allowed = [jax.export.DisabledSafetyCheck.custom_call(t) for t in TARGETS]
    with trace():
        exported = jax.export.export(jax.jit(fn), disabled_checks=allowed)(*specs)
    if folder is not None and path is not None:
        _store(folder, path, exported)
    return exported
