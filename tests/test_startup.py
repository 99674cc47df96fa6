"""ablab._startup: the command line imports Keras without scikit-learn and matplotlib."""

from __future__ import annotations

import subprocess
import sys

_SCRIPT = """
import sys
from ablab._startup import import_keras_lean

import_keras_lean()
held = sorted(m for m in ("sklearn", "matplotlib") if m in sys.modules)
print("during", held, "keras" in sys.modules)
import keras
import matplotlib.colors
import sklearn.base

print("after", sklearn.base.__name__, matplotlib.colors.__name__, keras.backend.backend())
"""


def test_keras_comes_without_sklearn_and_matplotlib_which_import_normally_after() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "during [] True"
    assert lines[1] == "after sklearn.base matplotlib.colors jax"


def test_nothing_is_held_back_once_keras_is_imported() -> None:
    import keras  # the test session has it already: the call must change nothing

    from ablab._startup import HELD_BACK, import_keras_lean

    import_keras_lean()
    assert sys.modules["keras"] is keras
    assert all(sys.modules.get(name, "absent") is not None for name in HELD_BACK)


_NEEDS_SKLEARN = """
import sys
import ablab._startup as startup

# a Keras whose import needs scikit-learn: the lean import falls back to the usual one
class Finder:
    def find_spec(self, name, path=None, target=None):
        if name != "keras":
            return None
        import importlib.util
        return importlib.util.spec_from_loader(name, Loader())

class Loader:
    def create_module(self, spec):
        return None
    def exec_module(self, module):
        import sklearn  # raises while it is held back
        module.ok = sklearn.__name__

sys.meta_path.insert(0, Finder())
startup.import_keras_lean()
print(sys.modules["keras"].ok, sys.modules.get("sklearn") is not None)
"""


def test_a_keras_that_needs_a_held_back_package_is_imported_the_usual_way() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _NEEDS_SKLEARN],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["sklearn", "True"]
