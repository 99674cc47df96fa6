"""The environment a run was made in: versions of what matters and the machine."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from typing import Any

_PACKAGES = ("ablab", "keras", "jax", "jaxlib", "numpy", "scipy", "pyarrow", "duckdb")


def environment() -> dict[str, Any]:
    """Versions of python, keras, jax, numpy, ... and a description of the machine."""
    import jax

    versions = {"python": platform.python_version()}
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
        "cpu_count": os.cpu_count(),
        "jax_devices": [str(d) for d in jax.devices()],
        "executable": sys.executable,
    }
