"""The XLA compiler options the engine compiles its programs with (and why)."""

from __future__ import annotations

import functools
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


@functools.cache
def compiler_options() -> dict[str, Any]:
    """``COMPILER_OPTIONS`` if this jaxlib accepts them all, else ``BASE_COMPILER_OPTIONS``.

    Checked once per process by compiling a one-op program: an unknown option or enum value
    fails every compile, and a speed setting must never stop a study from running.
    """
    lowered = jax.jit(lambda x: x + 1.0).lower(jax.ShapeDtypeStruct((1,), jnp.float32))
    try:
        lowered.compile(compiler_options=COMPILER_OPTIONS)
    except jax.errors.JaxRuntimeError:
        return dict(BASE_COMPILER_OPTIONS)
    return dict(COMPILER_OPTIONS)
