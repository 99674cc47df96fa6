"""Traced programs kept between runs, so a warm ``ablab run`` does not trace its models again.

JAX's persistent compilation cache (``ablab.engine.xla``) skips XLA's compile, but every run
still traced every program -- Keras' ``train_step`` under ``vmap`` and ``scan``, 0.2-0.7 s per
program on 2 cores, ~3 s of the seed study's warm 14 s (train, checks' trajectory and
initial-weight programs). Here a traced program is exported (``jax.export``: its StableHLO
and pytree structure), stored under a key of everything the trace depends on, and a later
run loads it instead of tracing. The stored program is what would be traced again, so the
results are the same bits (the engine compiles the exported module on a miss too: one path,
one XLA cache entry).

The key is conservative. A trace depends on code, settings and shapes, never on the data's
values (the rows are the program's arguments); the key covers:

* the program (train / trajectory / init), its seed count and recorder (probes, their
  layers);
* the model's Keras JSON (architecture, every layer's config and initializers, its compile
  config) and the study's [train] table (loss, optimizer, metrics, fit arguments, early
  stopping, learning-rate schedule), the epoch layout (rows, batches, shuffle, steps), the
  optimizer's and metrics' initial values, and the argument shapes and dtypes;
* ablab's own source files, the versions of Python, jax, jaxlib, keras and numpy, every JAX
  config value (dtype promotion, x64, PRNG, matmul precision, ...) and Keras' (floatx,
  epsilon, dtype policy, image data format), and the lowerings in use
  (``$ABLAB_LOWERINGS``).

Only programs of Keras' (and ablab's) own objects are kept: a model holding the user's
classes or functions (a custom layer, activation, loss), a subclassed model or callback
objects is traced every time, since its Python code could change without its config
changing. Off with the compilation cache (``ABLAB_COMPILATION_CACHE=0`` / ``--no-compilation-
cache``); stored next to it (``<cache>/traces``), at most :data:`MAX_BYTES` (oldest dropped).
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

MAX_BYTES = 512 * 2**20
SUFFIX = ".jaxexport"
_lock = threading.Lock()


def source_root() -> Path:
    """The ``ablab`` package folder: every subpackage's code and templates below it."""
    return Path(__file__).resolve().parents[1]


@functools.cache
def source_digest() -> str:
    """sha256 of ablab's own source files: two installs of the same version number with
    different code (a local edit, another commit) must not pass as the same."""
    root = source_root()
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix in (".py", ".j2"):
            h.update(path.relative_to(root).as_posix().encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def trace_dir() -> Path | None:
    """Where traced programs are kept: ``<ablab's compilation cache>/traces``; None when the
    compilation cache is off."""
    from ablab.engine.xla import cache_dir

    folder = cache_dir()
    return None if folder is None else folder / "traces"


@functools.cache
def _environment_key() -> str:
    """Versions and settings every trace depends on (per process: they do not change)."""
    import jaxlib

    config = {
        k: repr(v)
        for k, v in sorted(jax.config.values.items())
        # where caches and logs go, and how chatty JAX is, do not change a program
        if not any(word in k for word in ("cache", "log", "explain", "traceback", "debug"))
    }
    return json.dumps(
        {
            "python": sys.version,
            "machine": platform.machine(),
            "jax": jax.__version__,
            "jaxlib": jaxlib.__version__,
            "keras": keras.__version__,
            "numpy": np.__version__,
            "ablab": source_digest(),
            "jax_config": config,
        },
        sort_keys=True,
    )


def _keras_config() -> dict[str, Any]:
    return {
        "floatx": keras.config.floatx(),
        "epsilon": keras.config.epsilon(),
        "image_data_format": keras.config.image_data_format(),
        "dtype_policy": keras.config.dtype_policy().name,
        "backend": keras.config.backend(),
    }


def own_objects_only(model: keras.Model, configs: list[str]) -> bool:
    """Are ``model`` (a Sequential or functional model) and ``configs`` (JSON: the study's
    layer list, its [train] table) made of Keras' and ablab's own classes and functions only?
    Only then do their configs describe their code."""
    from ablab.engine.reference import user_objects

    cls = type(model)
    if cls.__module__.split(".")[0] != "keras" or cls.__name__ not in ("Sequential", "Functional"):
        return False  # a subclassed model: its call() is code, not config
    for layer in flatten_layers(model, include_self=False):
        if type(layer).__module__.split(".")[0] not in ("keras", "ablab"):
            return False
    if user_objects(model):  # the user's activations, initializers, ... held by layers
        return False
    # a layer, loss, metric or callback of the user's is named "file.py:name" / "module:name"
    strings: list[str] = []
    for config in configs:
        _strings(json.loads(config), strings)
    return not any(":" in s for s in strings)


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
            "environment": _environment_key(),
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
    except OSError:
        return None
    try:
        return jax.export.deserialize(bytearray(blob))
    except Exception:  # damaged, or written by another version: trace again
        path.unlink(missing_ok=True)
        return None


def _store(folder: Path, path: Path, exported: Any) -> None:
    """Write atomically (a reader sees the old file or the whole new one), then keep the
    folder within MAX_BYTES (oldest first out). Failing to store is not an error."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(exported.serialize())
        os.replace(tmp, path)
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


def exported_program(
    key: str | None, fn: Callable[..., Any], args: tuple[Any, ...], trace: Callable[[], Any]
) -> Any:
    """``jax.export.Exported`` of ``fn`` at ``args``' shapes: loaded under ``key`` if stored,
    else exported (``trace()`` sets the tracing context: ``with trace(): ...``), stored when
    ``key`` is given. Raises what tracing raises."""
    folder = trace_dir() if key is not None else None
    path = None if folder is None else folder / f"{key}{SUFFIX}"
    if path is not None and path.exists():
        found = _load(path)
        if found is not None and found.in_tree == jax.tree.structure((args, {})):
            return found
    specs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args)
    with trace():
        exported = jax.export.export(jax.jit(fn))(*specs)
    if path is not None and folder is not None:
        _store(folder, path, exported)
    return exported
