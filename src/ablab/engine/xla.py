"""The XLA compiler options the engine compiles its programs with (and why)."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

# XLA's CPU backend at optimization level 1 compiles the seed study's program in ~2 s
# instead of ~7 s and runs it as fast (measured with bench/throughput.py; the results
# are identical to the bit on the seed study).
#
# YNNPACK fusions are limited to individual dots. By default XLA's CPU backend also hands
# YNNPACK whole dot + elementwise + reduce graphs, and on the engine's vmapped program that
# is slow twice over: the loss's reduce_sum over each seed's tiny (batch, features) block
# runs at ~0.2 G elements/s, and the fused graph recomputes the forward matmul that the
# gradient path computes again (profiled on the seed study, 2,000 seeds: YNN reductions were
# 31 % of the op time). With individual dots only, the reductions and elementwise math go to
# XLA's own loop emitter: bench/throughput.py, interleaved A/B on the 2-core CPU, median of
# 9: plain +16 %, bn +37 %. Summation order changes (plain History within 3e-7 of the
# default; BN val_loss, a long running sum of moving statistics, within 5e-5); fit fidelity
# stays inside tests/test_reference.py's tolerances, and the program stays deterministic.
COMPILER_OPTIONS: dict[str, Any] = {
    "xla_backend_optimization_level": 1,
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
}
# The options every XLA build accepts: the fallback when this jaxlib rejects an
# experimental flag above (such flags come and go between releases).
BASE_COMPILER_OPTIONS: dict[str, Any] = {"xla_backend_optimization_level": 1}


# The exception: BatchNormalization over 2-d feature maps (its input has rank >= 4, e.g. after
# a Conv2D), where XLA's default YNNPACK fusions are the faster ones. BN's statistics and their
# gradients there reduce over batch x height x width per channel, and XLA's own emitter runs
# those (rewritten into reduce-windows for precision) at ~5 GB/s; YNNPACK's reductions and
# fused graphs do better. Interleaved A/B on the 2-core CPU (median of 5-7 calls,
# bench/peers.py's programs and examples/digits_cnn.toml's variants with probes, 2026-12-03):
# digits CNN + BN 1.09-1.29x faster with the default fusions; the same CNN without a
# normalization 1.0-1.05x; with LayerNormalization 0.59x (its per-pixel reductions over 8
# channels); dense models with BN over (batch, features): seed autoencoder + BN 0.78-0.88x,
# MLP + BN 0.95x. Hence the rule in :func:`wants_library_fusions`. The summation order differs
# (CNN + BN val_loss within 3e-4 relative after 3 epochs), inside the fit-fidelity tolerances
# (tests/test_lowering.py's conv + BN model against ``model.fit``).


def wants_library_fusions(model: Any) -> bool:
    """Compile ``model``'s programs with XLA's default YNNPACK fusions: it has a
    BatchNormalization layer over 2-d feature maps (an input of rank >= 4: batch, height,
    width, channels; sequences and Conv1D maps were not measured), and no per-row
    normalization (Layer-, Group-, RMS-, UnitNormalization: YNNPACK runs their reductions
    slowly)."""
    import keras

    from ablab._keras import flatten_layers

    layers = flatten_layers(model, include_self=False)
    slow = tuple(  # per-row normalizations: reductions over a few features per position
        getattr(keras.layers, name)
        for name in (
            "LayerNormalization",
            "GroupNormalization",
            "RMSNormalization",
            "UnitNormalization",
        )
        if hasattr(keras.layers, name)
    )
    if any(isinstance(layer, slow) for layer in layers):
        return False
    for layer in layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            spec = getattr(layer, "input_spec", None)
            ndim = getattr(spec, "ndim", None)
            if ndim is not None and ndim >= 4:  # 2-d feature maps: what was measured
                return True
    return False


@functools.cache
def compiler_options(library_fusions: bool = False) -> dict[str, Any]:
    """``COMPILER_OPTIONS`` if this jaxlib accepts them all, else ``BASE_COMPILER_OPTIONS``;
    with ``library_fusions`` (:func:`wants_library_fusions`), without the limit on YNNPACK
    fusions.

    Checked once per process by compiling a one-op program: an unknown option or enum value
    fails every compile, and a speed setting must never stop a study from running. The
    library-fusion set is the checked one less an option (no second check: what a jaxlib
    accepts, it accepts without that option too).

    On an accelerator (any backend but ``cpu``): none, XLA's defaults. Every option here was
    measured on XLA's CPU backend, and the optimization level is not CPU-only: XLA's GPU
    compiler takes its LLVM optimization level from the same option, and GPU kernels were
    never measured at level 1.
    """
    if jax.default_backend() != "cpu":
        return {}
    if library_fusions:
        options = dict(compiler_options())
        options.pop("xla_cpu_experimental_ynn_fusion_type", None)
        return options
    lowered = jax.jit(lambda x: x + 1.0).lower(jax.ShapeDtypeStruct((1,), jnp.float32))
    try:
        lowered.compile(compiler_options=COMPILER_OPTIONS)
    except jax.errors.JaxRuntimeError:
        return dict(BASE_COMPILER_OPTIONS)
    return dict(COMPILER_OPTIONS)


# JAX's persistent compilation cache, on by default for users: every `ablab run` compiled
# every program again (2-5 s per variant, most of a small study's wall time). A cache hit is
# the same XLA executable, so results are bit-identical. The folder is keyed by the versions
# that shape the program (JAX also keys each entry by its HLO, jaxlib and options).
CACHE_ENV = "ABLAB_COMPILATION_CACHE"
"""``0`` / ``off`` turns the cache off; a path puts it there (default: the user cache folder,
``$XDG_CACHE_HOME/ablab/xla`` or ``~/.cache/ablab/xla``)."""
_OFF = ("0", "off", "false", "no")
CACHE_MAX_BYTES = 4 * 2**30
# JAX keeps only programs that took >= 1 s to compile (its default). The engine's small
# programs compile in 0.1-1 s -- each variant's initial-weights program ("init", ~0.45 s),
# the initializers Keras runs while building a model (~0.3 s each) -- so a warm run compiled
# them all again: ~1 s of the flagship's warm 10 s (bench/latency.py). Loading an entry
# takes ~10 ms, so anything over 0.1 s is worth keeping.
MIN_COMPILE_S = 0.1
JAX_MIN_COMPILE_S = 1.0  # JAX's own default
MIN_COMPILE_ENV = "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"


def cache_dir() -> Path | None:
    """Where ablab's compilation cache is (None when turned off by ``$ABLAB_COMPILATION_CACHE``)."""
    setting = os.environ.get(CACHE_ENV, "").strip()
    if setting.lower() in _OFF:
        return None
    if setting and setting.lower() not in ("1", "on", "true", "yes"):
        root = Path(setting).expanduser()
    else:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        root = Path(base) / "ablab" / "xla"
    from importlib.metadata import PackageNotFoundError, version

    import jaxlib
    import keras

    try:
        ablab_version = version("ablab")
    except PackageNotFoundError:  # run from a source tree without installing
        ablab_version = "source"
    key = f"jax-{jax.__version__}_jaxlib-{jaxlib.__version__}_keras-{keras.__version__}"
    return root / f"{key}_ablab-{ablab_version}"


def keep_quick_programs() -> None:
    """Keep programs that took over :data:`MIN_COMPILE_S` to compile in the persistent cache
    -- unless the user chose a minimum (``$JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`` or
    ``jax.config``)."""
    own_minimum = (
        MIN_COMPILE_ENV in os.environ
        or getattr(jax.config, "jax_persistent_cache_min_compile_time_secs", JAX_MIN_COMPILE_S)
        != JAX_MIN_COMPILE_S
    )
    if not own_minimum:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_S)


def use_persistent_cache() -> str | None:
    """Turn JAX's persistent compilation cache on in :func:`cache_dir` -- unless the user chose
    one already (``JAX_COMPILATION_CACHE_DIR`` / ``jax.config``) or turned it off. Must run
    before the process' first compilation (JAX settles on its cache then); ablab calls it
    when ``ablab.engine`` is imported. In ablab's own folder, programs that took over
    :data:`MIN_COMPILE_S` to compile are kept (JAX's default: 1 s). Returns the folder in use,
    or None."""
    chosen = getattr(jax.config, "jax_compilation_cache_dir", None)
    if chosen:
        return str(chosen)
    folder = cache_dir()
    if folder is None:
        return None
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:  # a read-only home: compile every time, as without a cache
        return None
    jax.config.update("jax_compilation_cache_dir", str(folder))
    keep_quick_programs()
    try:  # bounded, evicting least recently used, and entries written under a file lock
        import filelock  # noqa: F401  (JAX needs it for a size limit)

        jax.config.update("jax_compilation_cache_max_size", CACHE_MAX_BYTES)
    except ImportError:
        pass
    return str(folder)
