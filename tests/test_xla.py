"""XLA compiler options (ablab.engine.xla): this jaxlib takes them, and a flag it does not know
falls back to the base options instead of failing every compile."""

from __future__ import annotations

from pathlib import Path

import pytest

from ablab.engine import xla
from ablab.engine.xla import compiler_options


def test_compiler_options_fall_back_when_a_flag_is_unknown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert compiler_options() == xla.COMPILER_OPTIONS  # this jaxlib takes them all
    bogus = {**xla.COMPILER_OPTIONS, "xla_cpu_no_such_flag_for_ablab": True}
    monkeypatch.setattr(xla, "COMPILER_OPTIONS", bogus)
    compiler_options.cache_clear()
    try:
        assert compiler_options() == xla.BASE_COMPILER_OPTIONS
    finally:
        compiler_options.cache_clear()


def test_an_accelerator_compiles_with_xlas_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    # the options are XLA CPU settings (and a GPU compiler reads the optimization level too)
    import jax

    assert compiler_options()["xla_backend_optimization_level"] == 1  # on this CPU
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    compiler_options.cache_clear()
    try:
        assert compiler_options() == {}
        assert compiler_options(library_fusions=True) == {}
    finally:
        compiler_options.cache_clear()


def _model(*layers: object, shape: tuple[int, ...] = (8, 8, 1)) -> object:
    import keras

    return keras.Sequential([keras.Input(shape), *layers])


def test_library_fusions_for_batch_norm_over_feature_maps_only() -> None:
    # the rule's measurements are in ablab/engine/xla.py (digits CNN + BN faster with
    # YNNPACK's default fusions; dense BN and LayerNormalization slower)
    import keras

    from ablab.engine.xla import wants_library_fusions

    conv = keras.layers.Conv2D(4, 3)
    assert wants_library_fusions(_model(conv, keras.layers.BatchNormalization()))
    assert not wants_library_fusions(  # 1-d maps / sequences: not measured
        _model(keras.layers.Conv1D(4, 3), keras.layers.BatchNormalization(), shape=(8, 2))
    )
    with_rms = _model(
        keras.layers.Conv2D(4, 3),
        keras.layers.BatchNormalization(),
        keras.layers.RMSNormalization(),
    )
    assert not wants_library_fusions(with_rms)
    assert not wants_library_fusions(_model(keras.layers.Conv2D(4, 3), keras.layers.ReLU()))
    assert not wants_library_fusions(  # the seed autoencoder's BN: (batch, features)
        _model(keras.layers.Dense(8), keras.layers.BatchNormalization(), shape=(12,))
    )
    with_ln = _model(
        keras.layers.Conv2D(4, 3),
        keras.layers.BatchNormalization(),
        keras.layers.LayerNormalization(),
    )
    assert not wants_library_fusions(with_ln)
    options = compiler_options(library_fusions=True)
    assert "xla_cpu_experimental_ynn_fusion_type" not in options
    assert options["xla_backend_optimization_level"] == 1


def test_a_variant_compiles_with_the_options_its_model_wants() -> None:
    import ablab
    from ablab.engine.build import build_program

    conv_bn = [
        {"layer": "Reshape", "target_shape": [4, 4, 1]},
        {"layer": "Conv2D", "filters": 2, "kernel_size": 3, "padding": "same"},
        {"layer": "BatchNormalization"},
        {"layer": "Flatten"},
        {"layer": "Dense", "units": 16},
    ]
    dense_bn = [{"layer": "Dense", "units": 8}, {"layer": "BatchNormalization"}]
    study = ablab.Study(
        data={"synthetic": {"shape": [40, 16], "seed": 1}, "target": "input"},
        train={"optimizer": "adam", "loss": "mse", "epochs": 1, "validation_split": 0.1},
        variants={
            "conv_bn": {"layers": conv_bn},
            "dense_bn": {"layers": [*dense_bn, {"layer": "Dense", "units": 16}]},
        },
        seeds={"count": 2},
    )
    conv = build_program(study, "conv_bn").compiler_options()
    dense = build_program(study, "dense_bn").compiler_options()
    assert conv == compiler_options(True) and dense == compiler_options()
    assert "xla_cpu_experimental_ynn_fusion_type" not in conv
    assert dense["xla_cpu_experimental_ynn_fusion_type"] == "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"


def _cache_in_a_fresh_process(tmp_path: object, **env: str) -> str:
    import os
    import subprocess
    import sys

    # (the suite sets both for itself: conftest.py)
    ours = ("JAX_COMPILATION_CACHE_DIR", "ABLAB_COMPILATION_CACHE", xla.MIN_COMPILE_ENV)
    clean = {k: v for k, v in os.environ.items() if k not in ours}
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import ablab.engine, jax; c = jax.config; print("
            "c.jax_persistent_cache_min_compile_time_secs, c.jax_compilation_cache_dir)",
        ],
        capture_output=True,
        text=True,
        check=True,
        env={**clean, "XDG_CACHE_HOME": str(tmp_path), **env},
        timeout=120,
    )
    return out.stdout.strip().splitlines()[-1]


def test_the_persistent_compilation_cache_is_on_by_default_per_versions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every `ablab run` compiled every program again (issue #17): the cache is on in the
    user cache folder, keyed by the versions that shape the programs; off with
    ABLAB_COMPILATION_CACHE=0 (or `ablab run --no-compilation-cache`); the user's own
    JAX_COMPILATION_CACHE_DIR wins (the suite sets one: conftest.py)."""
    import jax
    import jaxlib
    import keras

    import ablab

    min_s, folder_name = _cache_in_a_fresh_process(tmp_path).split(" ", 1)
    used = Path(folder_name)
    assert used.parent == tmp_path / "ablab" / "xla" and used.is_dir()
    for version in (jax.__version__, jaxlib.__version__, keras.__version__, ablab.__version__):
        assert version in used.name
    # programs compiling in 0.1-1 s are kept too (JAX's default keeps only those over 1 s)
    assert float(min_s) == xla.MIN_COMPILE_S == 0.1
    assert _cache_in_a_fresh_process(tmp_path, ABLAB_COMPILATION_CACHE="0") == "1.0 None"
    monkeypatch.setenv("ABLAB_COMPILATION_CACHE", str(tmp_path / "mine"))
    folder = xla.cache_dir()
    assert folder is not None and folder.parent == tmp_path / "mine"
    monkeypatch.setenv("ABLAB_COMPILATION_CACHE", "off")
    assert xla.cache_dir() is None
    own = jax.config.jax_compilation_cache_dir  # type: ignore[attr-defined]
    assert own and xla.use_persistent_cache() == own


def test_the_users_own_minimum_compile_time_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    import jax

    name = "jax_persistent_cache_min_compile_time_secs"
    saved = getattr(jax.config, name)
    try:
        for env, configured, kept in [
            (None, xla.JAX_MIN_COMPILE_S, xla.MIN_COMPILE_S),  # JAX's default: ours
            ("2.5", xla.JAX_MIN_COMPILE_S, xla.JAX_MIN_COMPILE_S),  # set in the environment
            (None, 3.0, 3.0),  # set with jax.config before ablab
        ]:
            if env is None:
                monkeypatch.delenv(xla.MIN_COMPILE_ENV, raising=False)
            else:
                monkeypatch.setenv(xla.MIN_COMPILE_ENV, env)
            jax.config.update(name, configured)
            xla.keep_quick_programs()
            assert getattr(jax.config, name) == kept
    finally:
        jax.config.update(name, saved)
