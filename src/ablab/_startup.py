"""What the command line does before it imports the engine (no Keras, JAX or numpy here).

``import keras`` also imports scikit-learn (for ``keras.wrappers``' scikit-learn estimators)
and matplotlib (for ``keras.visualization``'s image galleries) wherever they are installed --
both are, for ablab's own data sets and reports. Neither is used by a model a study trains,
and they cost ~0.8 s of every ``ablab run`` (``bench/latency.py``; importing Keras alone takes
~2.4 s without them, ~3.2 s with). :func:`import_keras_lean` imports Keras with the two held
back, then lets them be imported normally: ablab's data loaders and reports import them when
they need them. The price: in that process ``keras.wrappers`` believes scikit-learn is not
installed and ``keras.visualization``'s galleries believe matplotlib is not. Only the command
line does this -- ``import ablab`` in a notebook or script leaves Keras' imports alone.
"""

from __future__ import annotations

import os
import sys

HELD_BACK = ("sklearn", "matplotlib")
"""Packages Keras imports only for its scikit-learn wrappers and its plotting helpers."""


def import_keras_lean() -> None:
    """Import Keras without :data:`HELD_BACK` (unless Keras or they are imported already);
    every other import is as usual, and afterwards the held-back packages import normally."""
    if "keras" in sys.modules:
        return
    os.environ.setdefault("KERAS_BACKEND", "jax")  # as ``import ablab`` does
    held = [name for name in HELD_BACK if name not in sys.modules]
    for name in held:
        sys.modules[name] = None  # type: ignore[assignment]  # ``import name`` -> ImportError
    try:
        import keras
    except ImportError:  # a Keras that needs them after all: import it the usual way
        _release(held)
        for name in [m for m in sys.modules if m == "keras" or m.startswith("keras.")]:
            del sys.modules[name]
        import keras  # noqa: F401
    finally:
        _release(held)


def _release(held: list[str]) -> None:
    for name in held:
        if name in sys.modules and sys.modules[name] is None:
            del sys.modules[name]
