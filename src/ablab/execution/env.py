"""The environment a run was made in: versions of what matters and the machine; and the
numerics fingerprint -- what must be equal for two processes to compute the same bits
(Ray workers vs their driver, a resumed run vs the one that started it)."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
from collections.abc import Mapping
from importlib import metadata
from typing import Any

import numpy as np

from ablab._source import source_digest as _source_digest

_VERSIONED = ("ablab", "keras", "jax", "jaxlib", "numpy")

_PACKAGES = ("ablab", "keras", "jax", "jaxlib", "numpy", "scipy", "pyarrow", "duckdb")


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str | None:
    """The CPU's model name as Linux lists it (the first non-empty ``model name`` in
    ``cpuinfo``), else what ``platform.processor()`` says, else None (e.g. Linux on ARM lists
    no model name, and ``platform.processor()`` is often empty there). Benchmarks print it:
    VMs of one pool may be different CPUs (an AMD EPYC one day, an Intel Xeon the next)."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or None


def environment() -> dict[str, Any]:
    """Versions of python, keras, jax, numpy, ... and a description of the machine."""
    import jax

    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "versions": versions,
        "keras_backend": os.environ.get("KERAS_BACKEND", "jax"),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "jax_devices": [str(d) for d in jax.devices()],
        "executable": sys.executable,
    }


def differing_keys(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """The keys (sorted) whose values differ between two fingerprints, a key missing on one
    side included: what a resume or a Ray worker check reports."""
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def environment_fingerprint() -> dict[str, str]:
    """What must be equal on the driver and a worker for a cell's numbers to be equal:
    versions, ablab's source, the OS and architecture, and the settings that change numbers
    (Keras backend and floatx, JAX's x64 / matmul precision / PRNG, XLA flags, the JAX
    backend in use, the engine's compiler options and lowerings)."""
    import jax
    import keras

    fp = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            fp[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            fp[name] = "missing"
    fp["ablab_source"] = _source_digest()
    fp["platform"] = f"{platform.system()} {platform.machine()}"
    fp["keras_backend"] = keras.backend.backend()
    fp["floatx"] = keras.config.floatx()
    for option in (
        "jax_enable_x64",
        "jax_default_matmul_precision",
        "jax_default_prng_impl",
        "jax_threefry_partitionable",
    ):
        fp[option] = str(getattr(jax.config, option, None))
    fp["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "")
    fp["jax_backend"] = jax.default_backend()
    from ablab.engine.program import compiler_options  # the options the engine really compiles with

    fp["compiler_options"] = json.dumps(compiler_options(), sort_keys=True)
    # a model with BatchNormalization over feature maps (ablab.engine.xla.wants_library_fusions)
    fp["compiler_options_library_fusions"] = json.dumps(compiler_options(True), sort_keys=True)
    # the engine's lowerings ($ABLAB_LOWERINGS; `small` only where its C++ kernel builds):
    # each sums in its own float32 order
    from ablab.engine import lowering, small_products

    lowerings = lowering.enabled()
    fp["lowerings"] = ",".join(sorted(lowerings))
    # the kernel's own rounding: a build with or without fused multiply-adds
    fp["small_products"] = small_products.numerics() if lowerings & lowering.NEEDS_KERNEL else "off"
    return fp


def _digest_arrays(h: Any, arrays: Any) -> None:
    if isinstance(arrays, dict):  # several inputs / outputs: by name
        named = list(arrays.items())
    elif isinstance(arrays, list | tuple):
        named = [(str(i), a) for i, a in enumerate(arrays)]
    else:
        named = [("", arrays)]
    for name, a in named:
        h.update(f"{name}{a.dtype.str}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).data)


def data_digest(
    x: Any,
    y: Any,
    sample_weight: Any = None,
    validation: tuple[Any, Any, Any] | None = None,
) -> str:
    """sha256 of a dataset's rows (dtype, shape, bytes): a resumed run must see the same data.
    ``sample_weight`` ([data] sample_weight) and ``validation`` ((x, y, sample weights or
    None) of [data.validation]) count too, where given -- without them the digest is that of
    x and y alone, as runs stored before they counted have it."""
    h = hashlib.sha256()
    for arrays in (x, y):
        _digest_arrays(h, arrays)
    if sample_weight is not None:
        h.update(b"sample_weight")
        _digest_arrays(h, sample_weight)
    if validation is not None:
        h.update(b"validation")
        vx, vy, vsw = validation
        for arrays in (vx, vy):
            _digest_arrays(h, arrays)
        if vsw is not None:
            h.update(b"sample_weight")
            _digest_arrays(h, vsw)
    return h.hexdigest()[:24]


def study_data_digest(study: Any, data: Any) -> str:
    """:func:`data_digest` of ``study``'s rows ``data`` (an ``ablab.engine.data.Dataset``):
    x, y, their sample weights and the [data.validation] rows (loaded here, as ``fit_split``
    loads them)."""
    validation = None
    if study.data.validation is not None:
        from ablab.engine.data import load_dataset

        val = load_dataset(study.model_copy(update={"data": study.data.validation}))
        validation = (val.x, val.y, val.sample_weight)
    return data_digest(data.x, data.y, data.sample_weight, validation)
