"""Shared fixtures. The engine compiles one XLA program per variant and chunk size (~2 s each
on a 2-core CPU), so programs are built once per session and shared."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from collections.abc import Iterator
from pathlib import Path

# JAX's persistent compilation cache: many tests (and the CLI subprocesses they start, which
# inherit these variables) compile the very same programs -- the same study, variant and chunk
# size -- at ~2-3 s each; each is compiled once per suite and loaded from disk after. A cache
# hit is the same XLA executable, so results are unchanged bit for bit. `make clean` removes it.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    str(Path(__file__).resolve().parents[1] / ".pytest_cache" / "xla-compilation-cache"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# ablab's own cache folder (the traced programs it keeps: ablab.engine.trace_cache) beside it,
# not in the user's ~/.cache
os.environ.setdefault(
    "ABLAB_COMPILATION_CACHE",
    str(Path(__file__).resolve().parents[1] / ".pytest_cache" / "ablab-cache"),
)

import jax
import keras
import pytest

import ablab
from ablab.engine.build import build_program
from ablab.engine.program import VariantProgram

# Strict dtype promotion: silent float64/int promotions inside the engine fail loudly.
jax.config.update("jax_numpy_dtype_promotion", "strict")

ROOT = Path(__file__).resolve().parents[1]
SEED_STUDY = ROOT / "examples" / "bn_yes_or_no.toml"


def require_extra(module: str, extra: str) -> None:
    """Skip a test whose optional dependency ``module`` (from ``ablab[extra]``) is missing --
    but fail under CI (``CI`` set, as .ci/run does): there `make test` installs it, so a
    missing one is a broken install, not a reason to skip."""
    import importlib

    try:
        importlib.import_module(module)
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail(f"{module} is missing: `make test` installs the extra ablab[{extra}]")
        pytest.skip(f"{module} is not installed (pip install 'ablab[{extra}]')")


@pytest.fixture(scope="session")
def seed_study() -> ablab.Study:
    return ablab.load_study(SEED_STUDY)


make_program = build_program  # the name the tests use


@pytest.fixture
def no_user_objects() -> Iterator[None]:
    """Keras' registry of custom objects emptied for the test (ablab's own entries kept):
    other test files in this process register their layers (tests/layer_models.py), and
    while anything of the user's is registered no model counts as made of Keras' own
    objects (``trace_cache.own_objects_only``: no trace kept, no twin proven)."""
    registry = keras.saving.get_custom_objects()
    saved = dict(registry)
    for name in [n for n in registry if not n.startswith("ablab>")]:
        del registry[name]
    try:
        yield
    finally:
        registry.clear()
        registry.update(saved)


@pytest.fixture(scope="session")
def seed_programs(seed_study: ablab.Study) -> dict[str, VariantProgram]:
    """The four seed-study variants, as written in examples/bn_yes_or_no.toml."""
    return {v: make_program(seed_study, v) for v in seed_study.variants}


TINY_STUDY = """
name = "tiny"
[data]
synthetic = { kind = "normal", shape = [100, 12], seed = 1 }
[train]
optimizer = "adam"
loss = "mse"
epochs = 3
batch_size = 32
validation_split = 0.1
shuffle = false
[variants]
baseline = "plain"
[variants.plain]
layers = [{ layer = "Dense", units = 8 }, { layer = "Dense", units = 12 }]
[variants.bn]
layers = [{ layer = "Dense", units = 8 }, { layer = "BatchNormalization" },
          { layer = "Dense", units = 12 }]
[seeds]
count = 6
[engine]
chunk_size = 4
"""


@pytest.fixture
def tiny_study(tmp_path: Path) -> Path:
    """A two-variant, 6-seed, 3-epoch study in 2 chunks per variant (4 cells)."""
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_STUDY)
    return path


REPORT_STUDY = """
name = "report"
description = "tiny study with every figure: BN, an identity twin, a declared check"
[data]
synthetic = { kind = "normal", shape = [100, 12], seed = 1 }
[train]
optimizer = "adam"
loss = "mse"
epochs = 3
batch_size = 32
validation_split = 0.1
shuffle = false
[variants]
baseline = "plain"
[variants.plain]
description = "Dense(8) -> Dense(12)"
layers = [{ layer = "Dense", units = 8 }, { layer = "Dense", units = 12 }]
[variants.plain_id]
layers = [{ layer = "Dense", units = 8 }, { layer = "Activation", activation = "linear" },
          { layer = "Dense", units = 12 }]
[variants.bn]
layers = [{ layer = "Dense", units = 8 }, { layer = "BatchNormalization" },
          { layer = "Dense", units = 12 }]
[seeds]
count = 12
[engine]
chunk_size = 8
[checks]
equivalent = [["plain", "plain_id"]]
seeds = 2
"""


@pytest.fixture(scope="session")
def report_run(tmp_path_factory: pytest.TempPathFactory) -> ablab.RunResult:
    """A finished run with data for every figure of the report (3 variants x 12 seeds in
    chunks of 8, probes, a BatchNormalization variant, a linear optimum, a passed check)."""
    root = tmp_path_factory.mktemp("report")
    path = root / "report.toml"
    path.write_text(REPORT_STUDY)
    return ablab.run(path, runs_dir=root / "runs")
