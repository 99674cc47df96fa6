"""ablab's own code: its folder, and a digest of its source files (light: no Keras, no JAX).

The run's environment fingerprint (``ablab.execution.env``) and the engine's kept traces
(``ablab.engine.trace_cache``) key on the same digest."""

from __future__ import annotations

import hashlib
from functools import cache
from pathlib import Path


def source_root() -> Path:
    """The ``ablab`` package folder: every subpackage's code and templates below it."""
    return Path(__file__).resolve().parent


@cache
def source_digest() -> str:
    """sha256 of ablab's own source files (Python, templates, the engine's C++ kernel): two
    installs of the same version number with different code (a local edit, another commit)
    must not pass as the same."""
    root = source_root()
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix in (".py", ".j2", ".cc"):
            h.update(path.relative_to(root).as_posix().encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]
