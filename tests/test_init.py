"""Vectorized initial weights: each initializer's own distribution, keyed by (seed, stable id)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import ablab
from ablab.engine.initial_state import initial_state
from ablab.engine.program import VariantProgram
from tests.conftest import make_program

SEEDS = np.arange(1000, dtype=np.uint32)


@pytest.fixture(scope="module")
def inits(seed_programs: dict[str, VariantProgram]) -> dict[str, tuple[list, list]]:
    return {v: p.initial_weights(SEEDS) for v, p in seed_programs.items()}


def test_plain_and_plain_identity_start_identical_for_every_seed(inits: dict) -> None:
    plain_tv, _ = inits["plain"]
    ident_tv, _ = inits["plain_identity"]
    assert len(plain_tv) == len(ident_tv) == 4
    for a, b in zip(plain_tv, ident_tv, strict=True):
        np.testing.assert_array_equal(a, b)


def test_bn_variants_share_the_dense_weights_of_plain(inits: dict) -> None:
    plain_tv, _ = inits["plain"]
    for variant in ("bn", "bn_after"):
        tv, ntv = inits[variant]
        dense = [tv[0], tv[1], tv[4], tv[5]]  # dense#0 kernel/bias, dense#1 kernel/bias
        for a, b in zip(plain_tv, dense, strict=True):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(tv[2], 1.0)  # gamma: ones
        np.testing.assert_array_equal(tv[3], 0.0)  # beta: zeros
        np.testing.assert_array_equal(ntv[0], 0.0)  # moving_mean: zeros
        np.testing.assert_array_equal(ntv[1], 1.0)  # moving_variance: ones


def test_kernels_follow_glorot_uniform(inits: dict) -> None:
    kernel = inits["plain"][0][0]  # (seeds, 12, 8)
    assert kernel.shape == (1000, 12, 8)
    limit = np.sqrt(6.0 / (12 + 8))  # Glorot & Bengio 2010; keras GlorotUniform
    assert np.abs(kernel).max() <= limit
    # Kolmogorov-Smirnov against U(-limit, limit) over all 96,000 draws.
    assert stats.kstest(kernel.ravel(), stats.uniform(-limit, 2 * limit).cdf).pvalue > 1e-3
    # Seeds differ from each other; biases are zeros (keras' default bias_initializer).
    assert not np.array_equal(kernel[0], kernel[1])
    np.testing.assert_array_equal(inits["plain"][0][1], 0.0)


def test_same_seed_same_weights_across_calls_and_chunks(
    seed_programs: dict[str, VariantProgram],
) -> None:
    program = seed_programs["plain"]
    a, _ = program.initial_weights(np.array([5, 6, 7], np.uint32))
    b, _ = program.initial_weights(np.array([7], np.uint32))
    np.testing.assert_array_equal(a[0][2], b[0][0])


def test_eager_jit_and_vmap_agree(seed_programs: dict[str, VariantProgram]) -> None:
    program = seed_programs["plain"]
    ids = jnp.arange(3, dtype=jnp.uint32)
    eager, _ = initial_state(program.prepared, ids)
    jitted, _ = program.initial_weights(np.asarray(ids))  # jit, XLA-compiled ahead of time
    single, _ = program.initial_weights(np.asarray(ids[1:2]))
    for e, j, s in zip(eager, jitted, single, strict=True):
        np.testing.assert_array_equal(e, j)
        np.testing.assert_array_equal(e[1], s[0])


def test_dropout_seed_generators_get_a_key_per_seed() -> None:
    study = ablab.Study(
        data={"synthetic": {"shape": [40, 6]}},
        train={"loss": "mse"},
        variants={
            "d": {
                "layers": [
                    {"layer": "Dense", "units": 4},
                    {"layer": "Dropout", "rate": 0.5},
                    {"layer": "Dense", "units": 6},
                ]
            }
        },
    )
    program = make_program(study, "d")
    assert program.prepared.seed_state == [True]
    _, ntv = program.initial_weights(np.arange(4, dtype=np.uint32))
    state = ntv[0]
    assert state.shape == (4, 2) and state.dtype == np.uint32  # keras random_seed_dtype() on JAX
    assert len({tuple(row) for row in state.tolist()}) == 4
