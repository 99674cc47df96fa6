"""A dense layer's per-seed kernel gradient, three ways, on the shapes of bench/peers.py.

Under ``vmap`` over seeds, a Dense layer's kernel gradient ``x.T @ g`` is a product of
``x (seeds, rows, in)`` and ``g (seeds, rows, out)`` contracting the rows axis of both.
Timed here, each in a ``lax.scan`` of 60 products (as inside a training program), median of
7 calls, compiled with the engine's compiler options:

  * ``keras``: Keras' own product (``jnp.einsum('sbi,sbo->sio')``);
  * ``old``: the ``dense`` lowering until 2026-12-03: ``(out, in)`` behind a barrier on the
    product, transposed after (XLA folds the operand's transpose back in);
  * ``now``: ``src/ablab/engine/lowering.py``'s ``_matmul_t_bwd``: ``gᵀ`` materialized behind
    a barrier, the product ``(out, rows) @ (rows, in)`` behind another, transposed after.

Not a test: the machines are shared and noisy; compare the columns of one run. The last line
printed is JSON: {"ms_per_product": {shape: {form: ms}}}. Usage: python bench/dense_grad.py
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ablab.engine.lowering import _matmul_t
from ablab.engine.xla import compiler_options

# (seeds a cell, rows a batch, in, out): the layer whose kernel gradient is per seed
SHAPES = {
    "seed autoencoder, 8 -> 12 (834 seeds)": (834, 32, 8, 12),
    "seed autoencoder + BN, 8 -> 12 (455 seeds)": (455, 32, 8, 12),
    "MLP 64-32-10, output layer (100 seeds)": (100, 64, 32, 10),
    "MLP 64-128-10, output layer (34 seeds)": (34, 64, 128, 10),
    "MLP 64-512-10, output layer (10 seeds)": (10, 64, 512, 10),
    "digits CNN, dense layer (9 seeds)": (9, 64, 128, 10),
}
STEPS = 60
barrier = jax.lax.optimization_barrier


def _now(x: jax.Array, g: jax.Array) -> jax.Array:
    """The engine's form, from the lowering's own VJP (one seed; vmapped below)."""
    _, vjp = jax.vjp(_matmul_t, x, jnp.zeros((x.shape[-1], g.shape[-1]), x.dtype))
    return vjp(g)[1]


FORMS: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "keras": lambda x, g: jnp.einsum("bi,bo->io", x, g),
    "old": lambda x, g: barrier(jnp.einsum("bo,bi->oi", g, x)).T,
    "now": _now,
}


def time_form(form: Callable, x: jax.Array, g: jax.Array) -> float:
    """Milliseconds a product: ``STEPS`` products in a scan, median of 7 calls."""
    per_seed = jax.vmap(form)

    def body(carry: tuple[jax.Array, jax.Array], _: None) -> tuple[tuple, None]:
        a, b = carry
        return (a + 1e-7 * per_seed(a, b).sum(), b), None

    def run(a: jax.Array, b: jax.Array) -> jax.Array:
        return jax.lax.scan(body, (a, b), None, length=STEPS)[0][0]

    compiled = jax.jit(run).lower(x, g).compile(compiler_options=compiler_options())
    compiled(x, g).block_until_ready()
    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        compiled(x, g).block_until_ready()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3 / STEPS


def main() -> None:
    results: dict[str, dict[str, float]] = {}
    print(f"# {jax.default_backend()}, jax {jax.__version__}; ms a product, {STEPS} in a scan")
    print(f"{'shape':44s} " + " ".join(f"{f:>7s}" for f in FORMS) + "   keras/now  old/now")
    for name, (seeds, rows, n_in, n_out) in SHAPES.items():
        kx, kg = jax.random.split(jax.random.key(0))
        x = jax.random.normal(kx, (seeds, rows, n_in))
        g = jax.random.normal(kg, (seeds, rows, n_out))
        want = np.asarray(jax.vmap(FORMS["keras"])(x, g))
        for form in FORMS.values():  # the same values, another float32 summation order
            np.testing.assert_allclose(jax.vmap(form)(x, g), want, rtol=1e-4, atol=1e-4)
        ms = {f: time_form(form, x, g) for f, form in FORMS.items()}
        results[name] = ms
        print(
            f"{name:44s} "
            + " ".join(f"{ms[f]:7.3f}" for f in FORMS)
            + f"   {ms['keras'] / ms['now']:8.2f}x {ms['old'] / ms['now']:7.2f}x"
        )
    print(json.dumps({"ms_per_product": results}))


if __name__ == "__main__":
    main()
