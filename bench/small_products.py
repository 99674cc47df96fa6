"""The small-products kernel against XLA, one product at a time (``ablab.engine.small_products``).

For the seed autoencoder's second layer (8 -> 12) at a cell of 625 seeds and batches of 32
rows, each of the three per-seed products -- forward ``x @ k``, input gradient ``g @ k.T``,
kernel gradient ``x.T @ g`` -- and the first layer's two with its data shared by every seed,
computed (a) by the kernel, (b) as the engine computes them without it (the ``dense``
lowering's forms: the fused-loop forward product, XLA's matmul, the transposed kernel
gradient behind barriers) and (c) as Keras writes them, all compiled with the engine's XLA
options; alternated calls, median and minimum. Values are checked against numpy (float64).

Usage: python bench/small_products.py [--seeds 625] [--calls 60]. The last line printed is
JSON: {"seeds", "products": {name: {"kernel_us", "engine_xla_us", "keras_us", "max_rel_err"}}}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax
import jax.numpy as jnp
import numpy as np

from ablab.engine import lowering
from ablab.engine import small_products as sp
from ablab.engine.xla import compiler_options


def _compiled(fn: Callable, *args: jax.Array) -> Callable:
    return jax.jit(fn).lower(*args).compile(compiler_options())


def _time(fns: dict[str, Callable], args: tuple, calls: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn(*args).block_until_ready()
    for _ in range(calls):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn(*args).block_until_ready()
            out[name].append(time.perf_counter() - t0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=625)
    parser.add_argument("--calls", type=int, default=60)
    args = parser.parse_args()
    if not sp.available():
        raise SystemExit(f"the kernel is not available here: {sp.unavailable_reason()}")
    rng = np.random.default_rng(0)
    s, rows = args.seeds, 32

    def arr(*shape: int) -> jax.Array:
        return jnp.asarray(rng.normal(size=shape), jnp.float32)

    h, k2, g2 = arr(s, rows, 8), arr(s, 8, 12), arr(s, rows, 12)  # second layer: per seed
    x, k1, g1 = arr(rows, 12), arr(s, 12, 8), arr(s, rows, 8)  # first layer: shared data
    cases = {
        # name: (operands, kernel mode, the engine's XLA form, Keras' form, numpy)
        "forward (32x8)@(8x12)": (
            (h, k2), sp.FORWARD, jax.vmap(lowering._forward_product),
            jax.vmap(jnp.matmul), lambda a, b: a @ b,
        ),
        "input grad (32x12)@(8x12)^T": (
            (g2, k2), sp.INPUT_GRAD, jax.vmap(lambda g, k: jnp.matmul(g, k.T)),
            jax.vmap(lambda g, k: jnp.matmul(g, k.T)), lambda a, b: a @ np.swapaxes(b, 1, 2),
        ),
        "kernel grad (32x8)^T@(32x12)": (
            (h, g2), sp.KERNEL_GRAD, jax.vmap(lowering._kernel_grad),
            jax.vmap(lambda a, b: a.T @ b), lambda a, b: np.swapaxes(a, 1, 2) @ b,
        ),
        "shared forward (32x12)@(12x8)": (
            (x, k1), sp.FORWARD, jax.vmap(lowering._forward_product, in_axes=(None, 0)),
            jax.vmap(jnp.matmul, in_axes=(None, 0)), lambda a, b: a @ b,
        ),
        "shared kernel grad (32x12)^T@(32x8)": (
            (x, g1), sp.KERNEL_GRAD, jax.vmap(lowering._kernel_grad, in_axes=(None, 0)),
            jax.vmap(lambda a, b: a.T @ b, in_axes=(None, 0)), lambda a, b: a.T @ b,
        ),
    }  # fmt: skip
    results = {}
    for name, (operands, mode, engine_xla, keras, reference) in cases.items():
        fns = {
            "kernel": _compiled(lambda a, b, m=mode: sp.call(m, a, b), *operands),
            "engine_xla": _compiled(engine_xla, *operands),
            "keras": _compiled(keras, *operands),
        }
        want = reference(*(np.asarray(o, np.float64) for o in operands))
        got = np.asarray(fns["kernel"](*operands))
        err = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
        t = _time(fns, operands, args.calls)
        med = {k: statistics.median(v) * 1e6 for k, v in t.items()}
        low = {k: min(v) * 1e6 for k, v in t.items()}
        print(
            f"{name:38s} kernel {med['kernel']:7.1f} us (min {low['kernel']:6.1f}) | "
            f"engine's XLA form {med['engine_xla']:7.1f} (min {low['engine_xla']:6.1f}) | "
            f"Keras' form {med['keras']:7.1f} (min {low['keras']:6.1f}) | "
            f"{med['engine_xla'] / med['kernel']:.1f}x | max rel err {err:.1e}",
            flush=True,
        )
        results[name] = {
            "kernel_us": med["kernel"],
            "engine_xla_us": med["engine_xla"],
            "keras_us": med["keras"],
            "max_rel_err": err,
        }
    print(json.dumps({"seeds": s, "calls": args.calls, "products": results}))


if __name__ == "__main__":
    main()
