"""ablab: does this layer / setting actually help my network?

Trains a Keras 3 model in several variants over many paired seeds at once (JAX ``vmap`` +
``scan`` over the model's own stateless functions), stores every epoch of every seed, and
judges each variant against the baseline.

    >>> import ablab
    >>> result = ablab.run("examples/bn_yes_or_no.toml", seeds=100)  # doctest: +SKIP
    >>> result.summary["bn"]["final_val_loss"]["median"]  # doctest: +SKIP

The package follows the flow of a study (docs/architecture.md): ``study`` (the validated
specification) -> ``engine`` (vectorized training) -> ``execution`` (plan, executors, the run)
-> ``store`` (run folders, catalog) -> ``stats`` (verdicts) and ``analysis`` (checks,
explanations, the run document) -> ``output`` (terminal, report, MLflow) -> ``cli``.

The public names below are imported on first use, so ``import ablab`` (and the CLI's
``--help``, ``show``, ``query``) does not load Keras, JAX or matplotlib.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

# Keras reads this when it is first imported: ablab's engine runs on the JAX backend.
os.environ.setdefault("KERAS_BACKEND", "jax")

from ablab.errors import AblabError, BadInput, InputError, RunInterrupted, StudyError

__version__ = "0.1.0"

_LAZY = {
    "CompareResult": "ablab.stats.compare",
    "compare": "ablab.stats.compare",
    "Comparison": "ablab.stats.verdicts",
    "CheckResult": "ablab.analysis.checks",
    "check": "ablab.analysis.checks",
    "VariantHistory": "ablab.store.records",
    "ReportData": "ablab.output.report",
    "open_run": "ablab.output.report",
    "RunResult": "ablab.execution.result",
    "Progress": "ablab.execution.progress",
    "Executor": "ablab.execution.executors",
    "run": "ablab.execution.pipeline",
    "ablate": "ablab.execution.api",
    "resume": "ablab.execution.pipeline",
    "Study": "ablab.study.schema",
    "VerdictSpec": "ablab.study.schema",
    "load_study": "ablab.study.loading",
    "study_from_dict": "ablab.study.loading",
}

__all__ = [
    "AblabError",
    "BadInput",
    "CheckResult",
    "CompareResult",
    "Comparison",
    "Executor",
    "InputError",
    "Progress",
    "ReportData",
    "RunInterrupted",
    "RunResult",
    "Study",
    "StudyError",
    "VariantHistory",
    "VerdictSpec",
    "__version__",
    "ablate",
    "check",
    "compare",
    "load_study",
    "open_run",
    "resume",
    "run",
    "study_from_dict",
]


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use (PEP 562)."""
    module = _LAZY.get(name)
    if module is None:
        msg = f"module 'ablab' has no attribute {name!r}"
        raise AttributeError(msg)
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


if TYPE_CHECKING:
    from ablab.analysis.checks import CheckResult, check
    from ablab.execution.api import ablate
    from ablab.execution.executors import Executor
    from ablab.execution.pipeline import resume, run
    from ablab.execution.progress import Progress
    from ablab.execution.result import RunResult
    from ablab.output.report import ReportData, open_run
    from ablab.stats.compare import CompareResult, compare
    from ablab.stats.verdicts import Comparison
    from ablab.store.records import VariantHistory
    from ablab.study.loading import load_study, study_from_dict
    from ablab.study.schema import Study, VerdictSpec
