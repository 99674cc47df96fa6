"""Initial weights for many seeds at once, drawn from each variable's own Keras initializer.

Seed ``s`` and variable stable id ``v`` give the JAX key
``fold_in(PRNGKey(s), crc32(v))``; a Keras ``RandomInitializer`` (Glorot, He,
RandomNormal, Orthogonal, ...) is called with that key as its seed (the JAX
backend's random ops take a key array as ``seed``), so the draw is exactly the
initializer's own distribution. Deterministic initializers (zeros, ones,
constants) are called once and broadcast. SeedGenerator states (Dropout and
other random layers) get a per-seed key so their randomness differs per seed.
Nothing here builds or clones a model.
"""

from __future__ import annotations

import copy
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from ablab._keras import RandomInitializer
from ablab.engine.model import PreparedModel

SHUFFLE_STREAM = "ablab/shuffle"


def stream_key(seed_id: jax.Array, stream: str) -> jax.Array:
    """The raw uint32[2] JAX key of ``stream`` (a stable name) for seed ``seed_id``."""
    return jax.random.fold_in(jax.random.PRNGKey(seed_id), zlib.crc32(stream.encode()))


def _draw(
    init: Callable[..., Any], key: jax.Array, shape: tuple[int, ...], dtype: str
) -> jax.Array:
    if isinstance(init, RandomInitializer):
        init = copy.copy(init)
        init.seed = key  # type: ignore[attr-defined]  # the JAX backend takes a key as seed
    return jnp.asarray(init(shape, dtype=dtype))


def _init_one(
    seed_id: jax.Array,
    variables: Sequence[Any],
    inits: Sequence[Callable[..., Any]],
    ids: Sequence[str],
    seed_state: Sequence[bool],
) -> list[jax.Array]:
    out = []
    for v, init, vid, is_seed_state in zip(variables, inits, ids, seed_state, strict=True):
        key = stream_key(seed_id, vid)
        if is_seed_state:
            out.append(key.astype(v.dtype))
        else:
            out.append(_draw(init, key, tuple(v.shape), v.dtype))
    return out


def initial_state(
    prepared: PreparedModel, seed_ids: jax.Array
) -> tuple[list[jax.Array], list[jax.Array]]:
    """Trainable and non-trainable initial values for every seed.

    seed_ids: (seeds,) int. Returns two lists parallel to ``model.trainable_variables``
    and ``model.non_trainable_variables``; each array is (seeds, *variable.shape).
    Pure and traceable: call it under ``jax.jit``.
    """
    model = prepared.model
    tv, ntv = model.trainable_variables, model.non_trainable_variables

    def one(seed_id: jax.Array) -> tuple[list[jax.Array], list[jax.Array]]:
        t = _init_one(
            seed_id, tv, prepared.trainable_inits, prepared.trainable_ids, [False] * len(tv)
        )
        n = _init_one(
            seed_id,
            ntv,
            prepared.non_trainable_inits,
            prepared.non_trainable_ids,
            prepared.seed_state,
        )
        return t, n

    return jax.vmap(one)(seed_ids)
