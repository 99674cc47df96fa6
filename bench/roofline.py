"""Where the seed study's ceiling is on this machine: FLOPs, sgemm, and per-seed products.

The seed study (examples/bn_yes_or_no.toml, `plain`: Dense(8) -> Dense(12) on 12 features,
batch 32, 90 training rows, 20 epochs, Adam) costs per run, counting the dense matmuls
only (biases, the loss, Adam and BN are left out, so this is a lower bound)::

    per optimizer step (b rows): forward 2*b*(12*8 + 8*12); backward 1.5x that (dW and dX of
    the second layer, dW of the first: the data needs no gradient) -> 5*b*192 FLOPs
    per epoch: steps over 32 + 32 + 26 rows, then a forward pass over the 10 validation rows
    per run: 20 epochs

Two ceilings follow, both measured here in the same process as the engine's figure:

* **FLOP ceiling** = measured sgemm rate (numpy, a large square float32 matmul, every core)
  / FLOPs per run: what a perfectly efficient program would reach.
* **Per-seed product ceiling.** Three of the five products in each step have per-seed
  operands on both sides -- (32,8)@(8,12) forward, its two gradients -- so no program can
  batch them into one large matmul; thousands of tiny independent products remain. The
  script times each shape as XLA runs it for a chunk of seeds (`jnp.einsum` over a batch of
  1,000, compiled with the engine's compiler options, as many calls at once as the engine
  runs), and numpy's stacked `matmul` for comparison. Ceiling = 1 / (time of these products
  per run): the runs/s reachable if everything else (the two shared-data matmuls, the loss,
  Adam, validation, copies) took no time at all (each product's time is scaled by the
  step's rows: 32, 32, 26).

The engine's own runs/s at 10,000 seeds (as `ablab run` runs them: the local executor) is
measured in the same run. The last line printed is JSON: {"flops_per_run", "sgemm_gflops",
"flop_ceiling_runs_per_s", "product_gflops", "product_ceiling_runs_per_s",
"engine_runs_per_s", "engine_gflops", "engine_pct_of_sgemm", ...}.
Usage: python bench/roofline.py [--seeds 10000] [--workers N]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax
import jax.numpy as jnp
import numpy as np

import ablab
from ablab.engine.sizing import default_workers
from ablab.engine.xla import compiler_options

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cost_curves import machine, sgemm_gflops  # bench/ is not a package
from throughput import STUDY, engine_figures

# (einsum, lhs shape, rhs shape) per seed: the three products of one step with per-seed
# operands on both sides (b = 32 rows, h = 8 hidden units, o = 12 outputs).
PRODUCTS = {
    "forward h@W2": ("sbh,sho->sbo", (32, 8), (8, 12)),
    "grad dY@W2^T": ("sbo,sho->sbh", (32, 12), (8, 12)),
    "grad h^T@dY": ("sbh,sbo->sho", (32, 8), (32, 12)),
}
BATCH = 1_000  # seeds per chunk call, as the engine's chunks


def flops_per_run() -> tuple[float, float]:
    """(all dense FLOPs per run, the per-seed products' share of them) for the seed study."""
    macs = 12 * 8 + 8 * 12  # per row, one forward
    steps = [32, 32, 26]
    per_epoch = sum(5 * b * macs for b in steps) + 2 * 10 * macs
    per_seed_products = sum(3 * 2 * b * 8 * 12 for b in steps)  # three (b,8,12)-sized products
    return 20.0 * per_epoch, 20.0 * per_seed_products


def time_calls(fn: object, args: tuple, calls: int, workers: int) -> float:
    """Seconds per call of ``fn(*args)`` with ``workers`` threads calling it at once."""

    def loop(_: int) -> None:
        for _ in range(calls):
            jax.block_until_ready(fn(*args))  # type: ignore[operator]

    loop(0)  # warm-up
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(loop, range(workers)))
        best = min(best, time.perf_counter() - t0)
    return best / (calls * workers)


def product_seconds_per_seed(workers: int) -> dict[str, dict[str, float]]:
    """Per seed, seconds of each per-seed product: XLA (the engine's options) and numpy."""
    rng = np.random.default_rng(0)
    out: dict[str, dict[str, float]] = {}
    for name, (spec, a_shape, b_shape) in PRODUCTS.items():
        a = rng.normal(size=(BATCH, *a_shape)).astype(np.float32)
        b = rng.normal(size=(BATCH, *b_shape)).astype(np.float32)
        da, db = jnp.asarray(a), jnp.asarray(b)
        compiled = (
            jax.jit(lambda x, y, spec=spec: jnp.einsum(spec, x, y))
            .lower(da, db)
            .compile(compiler_options=compiler_options())
        )
        xla_s = time_calls(compiled, (da, db), 200, workers) / BATCH
        np_fn = lambda x, y, spec=spec: np.einsum(spec, x, y, optimize=True)  # noqa: E731
        np_s = time_calls(np_fn, (a, b), 50, 1) / BATCH
        out[name] = {"xla_s": xla_s, "numpy_s": np_s}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args()
    workers = args.workers or default_workers()

    flops, product_flops = flops_per_run()
    sgemm = sgemm_gflops()
    products = product_seconds_per_seed(workers)
    rows_per_epoch, epochs = 32 + 32 + 26, 20  # the products were timed at 32 rows
    per_run_s = epochs * rows_per_epoch / 32 * sum(p["xla_s"] for p in products.values())
    # Time per seed above is wall time with `workers` calls at once: per run on the machine.
    product_ceiling = 1.0 / per_run_s
    product_gflops = product_flops / per_run_s / 1e9
    study = ablab.load_study(STUDY)
    engine = engine_figures(study, "plain", args.seeds, workers=(workers,))
    engine_gflops = engine["runs_per_s"] * flops / 1e9
    sgemm_rate = sgemm["numpy_gflops"]

    rows = [
        ("FLOPs per run (dense matmuls only)", f"{flops:,.0f}"),
        ("  of which per-seed products", f"{product_flops:,.0f}"),
        ("sgemm (numpy, every core), GFLOP/s", f"{sgemm_rate:.1f}"),
        ("FLOP ceiling, runs/s", f"{sgemm_rate * 1e9 / flops:,.0f}"),
    ]
    for name, p in products.items():
        gf = 2 * 32 * 8 * 12 / p["xla_s"] / 1e9
        rows.append(
            (
                f"product {name}: XLA / numpy ns per seed",
                f"{p['xla_s'] * 1e9:.1f} ({gf:.1f} GFLOP/s) / {p['numpy_s'] * 1e9:.1f}",
            )
        )
    rows += [
        (f"per-seed product ceiling (XLA, {workers} workers), runs/s", f"{product_ceiling:,.0f}"),
        (f"engine, plain, {args.seeds:,} seeds, runs/s", f"{engine['runs_per_s']:,.0f}"),
    ]
    print(f"# {machine()}")
    for label, value in rows:
        print(f"{label:<56} {value:>28}")
    print(
        json.dumps(
            {
                "flops_per_run": flops,
                "per_seed_product_flops_per_run": product_flops,
                "sgemm_gflops": round(sgemm_rate, 1),
                "flop_ceiling_runs_per_s": round(sgemm_rate * 1e9 / flops),
                "product_ns_per_seed": {
                    k: {"xla": round(v["xla_s"] * 1e9, 1), "numpy": round(v["numpy_s"] * 1e9, 1)}
                    for k, v in products.items()
                },
                "product_gflops": round(product_gflops, 2),
                "product_ceiling_runs_per_s": round(product_ceiling),
                "engine_runs_per_s": round(engine["runs_per_s"], 1),
                "engine_gflops": round(engine_gflops, 2),
                "engine_pct_of_sgemm": round(100 * engine_gflops / sgemm_rate, 1),
                "workers": workers,
                "seeds": args.seeds,
                "device": jax.devices()[0].platform,
            }
        )
    )


if __name__ == "__main__":
    main()
