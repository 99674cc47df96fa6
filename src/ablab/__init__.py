"""ablab: does this layer / setting actually help my network?

Trains a Keras 3 model in several variants over many paired seeds at once (JAX
``vmap`` + ``scan`` over the model's own stateless functions), stores every
epoch of every seed, and summarises the result.

    >>> import ablab
    >>> result = ablab.run("examples/bn_yes_or_no.toml", seeds=100)  # doctest: +SKIP
    >>> result.summary["bn"]["final_val_loss"]["median"]  # doctest: +SKIP
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras

if keras.backend.backend() != "jax":  # pragma: no cover - depends on the caller's process
    msg = (
        f"ablab's engine runs Keras on the JAX backend, but Keras was already loaded with "
        f"the {keras.backend.backend()!r} backend. Set KERAS_BACKEND=jax before importing "
        f"keras (or import ablab first)."
    )
    raise ImportError(msg)

from ablab._compare import CompareResult, compare
from ablab._errors import AblabError, BadInput, InputError, RunInterrupted, StudyError
from ablab._records import VariantHistory
from ablab._report import ReportData, open_run
from ablab._run import RunResult, resume, run
from ablab._study import Study, VerdictSpec, load_study, study_from_dict
from ablab._verdict import Comparison

__version__ = "0.1.0"

__all__ = [
    "AblabError",
    "BadInput",
    "CompareResult",
    "Comparison",
    "InputError",
    "ReportData",
    "RunInterrupted",
    "RunResult",
    "Study",
    "StudyError",
    "VariantHistory",
    "VerdictSpec",
    "__version__",
    "compare",
    "load_study",
    "open_run",
    "resume",
    "run",
    "study_from_dict",
]
