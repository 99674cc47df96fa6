"""Cost curves of the vectorized engine: runs/s against seeds and against hidden width.

Two curves on the seed study (examples/bn_yes_or_no.toml: linear autoencoder
Dense(8) -> Dense(12) on 100 x 12 rows, 20 epochs, batch 32, Adam, MSE), each with its
``model.fit`` baseline measured in the same process:

* **Seeds** -- the `plain` and `bn` variants at 1, 10, 100, 1,000, 10,000 and 100,000
  seeds. Seeds are chunked and run exactly as `ablab run` does it (``choose_chunk_size``
  with the study's ``[engine] memory_budget_mb``; the local executor with
  ``default_workers()`` chunk calls at once, bounded by the budget), so 100,000 seeds run
  inside that budget.
  Per point: the compile time of that chunk size (reported apart, never in runs/s), the
  train time of all the seeds (after one warm-up call of the compiled program: the first
  call allocates), runs/s = seeds / train time, CPU use (process CPU time / wall time
  while timing: how many cores the program kept busy) and the process' peak RSS so far.
  Points whose train time is short are timed several times and the median is kept.
  Ideal scaling is linear (runs/s proportional to seeds) until the machine is busy; the
  plot draws that line from the 1-seed point, so the knee is where the measured curve
  leaves it.
* **Width** -- the same study with its first Dense(8) widened to Dense(w), w = 8 ... 512, at
  a fixed seed count (``--width-seeds``, default 10,000): runs/s and the achieved GFLOP/s.
  FLOPs per run count the dense matmuls only (biases, BN, the loss and Adam's elementwise
  updates are left out, so small widths are under-counted)::

      F(rows)       = sum over Dense layers of 2 * rows * fan_in * fan_out   (one forward)
      F1(rows)      = the first Dense layer's share of F(rows)
      train step    = 3 * F(b) - F1(b)   (forward, d/dW of every layer, d/dx of every layer
                                          but the first: the data needs no gradient)
      flops per run = epochs * (3 * F(n_train) - F1(n_train) + F(n_val))
                      (every row once per epoch, validation forward only)
      GFLOP/s       = runs/s * flops per run / 1e9

  (bench/roofline.py counts the seed study the same way: 1,804,800 FLOPs per run.)

  It is compared with the machine's measured sgemm rate, timed at the start and at the end
  of the run (the better one is kept: a shared machine's rate moves): a square float32
  matmul in numpy (host CPU) and in jax on the default device (the accelerator when there
  is one; ``% sgemm`` is against the device's rate). ``GF/CPU-s`` divides GFLOP/s by the
  CPU use: the rate per busy core, which holds still when others share the machine. The
  width where GFLOP/s flattens is where the machine saturates; how far below sgemm it
  flattens is what batched small matmuls lose to one large one.
* **model.fit** -- for the `plain` and `bn` variants at width 8, and `plain` at a few widths
  (``--fit-widths``, default 8 and 512): runs/s the way bench/throughput.py measures it, the
  way a user trains one seed: build + compile + fit a fresh model per seed (after one
  warm-up fit), ``--fit-runs`` fits each (default 3).

Nothing here assumes a CPU: the device (``jax.devices()[0].platform``), core count and
versions are recorded, and the same script runs unchanged on a GPU machine (there the
device's peak memory in use is recorded too).

Outputs: a table on stdout; a PNG (two panels: runs/s vs seeds, log-log, with the ideal
linear line; runs/s and GFLOP/s vs width) at ``--plot``; every figure as JSON at
``--json``; and, last line on stdout, a JSON summary.

Usage:
  python bench/cost_curves.py                       # full curves (100,000 seeds: minutes)
  python bench/cost_curves.py --max-seeds 1000 --widths 8,64
  python bench/cost_curves.py --quick               # smoke run: small sizes, seconds
Options: --max-seeds N, --seeds-variants plain,bn, --widths 8,16,..., --width-seeds N,
--width-variant plain, --fit-runs N, --fit-widths 8,512, --max-chunk N (default: the
engine's cap, as `ablab run`), --workers N (default: as `ablab run`), --probes, --plot PATH,
--json PATH.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax
import jax.numpy as jnp
import keras
import numpy as np

import ablab
from ablab.engine.build import build_program
from ablab.engine.program import VariantProgram
from ablab.engine.sizing import DEFAULT_MAX_CHUNK, default_workers
from ablab.execution.env import cpu_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import fresh_fit_runs_per_s, prepared_cells, train_cells  # bench/ is not a package

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "examples" / "bn_yes_or_no.toml"
SEEDS = (1, 10, 100, 1_000, 10_000, 100_000)
WIDTHS = (8, 16, 32, 64, 128, 256, 512)
QUICK_SEEDS = (1, 10, 100)
QUICK_WIDTHS = (8, 64)

# A point is timed again until this much train time has accumulated (median kept), at
# most MAX_REPEATS times; a single pass longer than this is timed once.
MIN_TIMED_S = 2.0
MAX_REPEATS = 15


# -- machine -----------------------------------------------------------------------------
def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (MiB)."""
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024 if sys.platform != "darwin" else kib / 2**20  # macOS reports bytes


def device_peak_mb() -> float | None:
    """Peak memory in use on the default device (MiB) where the backend reports it (GPU)."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:
        return None
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return stats["peak_bytes_in_use"] / 2**20


def machine() -> dict[str, Any]:
    dev = jax.devices()[0]
    return {
        "processor": cpu_model() or platform.machine(),
        "cores": os.cpu_count(),
        "device": dev.platform,
        "device_kind": dev.device_kind,
        "device_count": jax.device_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "ablab": getattr(ablab, "__version__", "?"),
    }


def sgemm_gflops(n: int = 2048, seconds: float = 1.0) -> dict[str, float]:
    """Measured float32 matmul rate (GFLOP/s, best of repeats): numpy on the host CPU and
    jax on the default device. n x n @ n x n = 2 n^3 FLOPs."""
    flops = 2.0 * n**3
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)

    def best(call: Callable[[], Any]) -> float:
        call()  # warm-up
        times: list[float] = []
        t_end = time.perf_counter() + seconds
        while len(times) < 3 or (time.perf_counter() < t_end and len(times) < 50):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
        return flops / min(times) / 1e9

    da, db = jnp.asarray(a), jnp.asarray(b)
    matmul = jax.jit(jnp.matmul)
    return {
        "numpy_gflops": best(lambda: a @ b),
        "device_gflops": best(lambda: matmul(da, db).block_until_ready()),
        "n": n,
    }


# -- study and model -----------------------------------------------------------------------
def widened(study: ablab.Study, variant: str, width: int) -> ablab.Study:
    """A copy of ``study`` whose ``variant`` has its first Dense layer at ``width`` units."""
    layers = [dict(s) for s in study.variant_layers(variant) or []]
    first = next(i for i, s in enumerate(layers) if s["layer"] == "Dense")
    layers[first]["units"] = width
    spec = study.variants[variant].model_copy(update={"layers": layers})
    return study.model_copy(update={"variants": {**study.variants, variant: spec}})


def flops_per_run(program: VariantProgram) -> float:
    """Dense-matmul FLOPs of training one seed (formula in the module docstring)."""
    macs = [  # fan_in * fan_out of each Dense layer, in order
        int(np.prod(layer.kernel.shape))
        for layer in program.prepared.model.layers
        if isinstance(layer, keras.layers.Dense)
    ]
    lay = program.layout

    def forward(rows: int) -> float:
        return 2.0 * rows * sum(macs)

    first = 2.0 * lay.n_train * macs[0]  # the first layer's input gradient is never computed
    return lay.epochs * (3 * forward(lay.n_train) - first + forward(lay.n_val))


# -- the engine ----------------------------------------------------------------------------
def engine_point(
    program: VariantProgram,
    seeds: int,
    budget_mb: float,
    max_chunk: int = DEFAULT_MAX_CHUNK,
    workers: int | None = None,
) -> dict[str, Any]:
    """Compile, warm up and time ``seeds`` seeds of ``program``, chunked and run like
    `ablab run` (``workers`` chunk calls at once, default as `ablab run` picks them)."""
    wanted = workers or default_workers()
    cells, compile_s, (workers,) = prepared_cells(program, seeds, budget_mb, (wanted,), max_chunk)
    chunk = len(cells[0].seed_ids)

    cpu_s = 0.0

    def one_pass() -> float:
        nonlocal cpu_s
        c0, t0 = time.process_time(), time.perf_counter()
        train_cells(program, cells, workers)
        cpu_s += time.process_time() - c0
        return time.perf_counter() - t0

    times = [one_pass()]
    if times[0] < MIN_TIMED_S:
        repeats = min(MAX_REPEATS, max(3, math.ceil(MIN_TIMED_S / max(times[0], 1e-9))))
        times += [one_pass() for _ in range(repeats - 1)]
    train_s = statistics.median(times)
    return {
        "seeds": seeds,
        "chunk": chunk,
        "n_chunks": len(cells),
        "workers": workers,
        "compile_s": compile_s,
        "train_s": train_s,
        "repeats": len(times),
        "spread": (max(times) - min(times)) / train_s,
        "runs_per_s": seeds / train_s,
        "cpu_util": cpu_s / sum(times),
        "per_seed_mb": program.per_seed_bytes() / 2**20,
        "peak_rss_mb": peak_rss_mb(),
        "device_peak_mb": device_peak_mb(),
    }


# -- model.fit -----------------------------------------------------------------------------
# -- output --------------------------------------------------------------------------------
def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    colors = {"plain": "tab:blue", "bn": "tab:orange"}
    m = results["machine"]
    fits = results["fit"]

    for variant, points in results["seeds_curve"].items():
        color = colors.get(variant)
        xs = [p["seeds"] for p in points]
        ys = [p["runs_per_s"] for p in points]
        ax1.plot(xs, ys, "o-", color=color, label=f"engine {variant}")
        if xs and xs[0] == 1:  # ideal linear, drawn up to 30x the best measured point
            ideal = [(x, ys[0] * x) for x in xs if ys[0] * x <= 30 * max(ys)]
            ax1.plot(*zip(*ideal, strict=True), ":", color=color, alpha=0.6)
        base = next((f for f in fits if f["variant"] == variant and f["width"] == 8), None)
        if base is not None:
            ax1.axhline(base["runs_per_s"], ls="--", color=color, alpha=0.6)
            ax1.annotate(
                f"model.fit {variant}",
                (xs[0] if xs else 1, base["runs_per_s"]),
                textcoords="offset points",
                xytext=(2, 3 if variant == "plain" else -10),
                fontsize=8,
                color=color,
            )
    ax1.plot([], [], "k:", alpha=0.6, label="ideal linear (from 1 seed)")
    ax1.set_xscale("log")
    ax1.set_yscale("log")
    ax1.set_xlabel("seeds")
    ax1.set_ylabel("runs/s (compile excluded)")
    ax1.set_title("runs/s vs seeds (Dense(8) autoencoder)")
    ax1.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=8, loc="upper left")

    width = results["width_curve"]
    xs = [p["width"] for p in width["points"]]
    ax2.plot(xs, [p["runs_per_s"] for p in width["points"]], "o-", color="tab:blue")
    wf = [f for f in fits if f["variant"] == width["variant"]]
    ax2.plot(
        [f["width"] for f in wf],
        [f["runs_per_s"] for f in wf],
        "s--",
        color="tab:blue",
        alpha=0.6,
        label="model.fit runs/s",
    )
    ax2.plot([], [], "o-", color="tab:blue", label=f"engine runs/s ({width['seeds']:,} seeds)")
    ax2.set_xscale("log", base=2)
    ax2.set_yscale("log")
    ax2.set_xlabel("hidden width w (Dense(w) -> Dense(12))")
    ax2.set_ylabel("runs/s", color="tab:blue")
    ax2.grid(True, which="both", alpha=0.3)
    g = ax2.twinx()
    g.plot(xs, [p["gflops"] for p in width["points"]], "^-", color="tab:red", label="GFLOP/s")
    if m["device"] == "cpu":  # per busy core: what the curve is without others' load
        per_core = [p["gflops"] / max(p["cpu_util"], 1e-9) for p in width["points"]]
        g.plot(xs, per_core, "^:", color="tab:red", alpha=0.6, label="GFLOP/s per busy core")
    sg = results["sgemm"]
    g.axhline(sg["numpy_gflops"], ls="--", color="tab:red", alpha=0.5)
    g.annotate(
        f"numpy sgemm {sg['numpy_gflops']:.0f}",
        (xs[0] if xs else 8, sg["numpy_gflops"]),
        textcoords="offset points",
        xytext=(2, -10),
        fontsize=8,
        color="tab:red",
    )
    if m["device"] != "cpu":
        g.axhline(sg["device_gflops"], ls="-.", color="tab:red", alpha=0.5)
        g.annotate(
            f"{m['device']} sgemm {sg['device_gflops']:.0f}",
            (xs[0] if xs else 8, sg["device_gflops"]),
            textcoords="offset points",
            xytext=(2, 3),
            fontsize=8,
            color="tab:red",
        )
    g.set_yscale("log")
    g.set_ylabel("achieved GFLOP/s (dense matmuls)", color="tab:red")
    lines = ax2.get_legend_handles_labels()
    glines = g.get_legend_handles_labels()
    ax2.legend(lines[0] + glines[0], lines[1] + glines[1], fontsize=8, loc="lower left")
    ax2.set_title(f"runs/s and GFLOP/s vs width ({width['variant']})")
    fig.suptitle(
        f"ablab engine cost curves -- {m['device']} ({m['device_kind']}), {m['cores']} CPU cores, "
        f"jax {m['jax']}, keras {m['keras']}",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_tables(results: dict[str, Any]) -> None:
    m = results["machine"]
    print(
        f"# {m['processor']}, {m['cores']} cores, jax {m['jax']} ({m['device']}: "
        f"{m['device_kind']}), keras {m['keras']}"
    )
    sg = results["sgemm"]
    s0, s1 = results["sgemm_start"], results["sgemm_end"]
    print(
        f"# sgemm {sg['n']}x{sg['n']} float32 (start / end of run): numpy "
        f"{s0['numpy_gflops']:,.1f} / {s1['numpy_gflops']:,.1f} GFLOP/s, jax on {m['device']} "
        f"{s0['device_gflops']:,.1f} / {s1['device_gflops']:,.1f} GFLOP/s"
    )
    print()
    print(
        "runs/s vs seeds (compile excluded; median of `reps` timed passes; CPU use = process "
        "CPU time / wall time)"
    )
    head = (
        f"{'variant':<8}{'seeds':>9}{'chunk':>7}{'x':>5}{'compile s':>11}{'train s':>10}"
        f"{'reps':>6}{'runs/s':>11}{'vs 1 seed':>11}{'CPU use':>9}{'peak RSS MB':>13}"
    )
    print(head)
    for variant, points in results["seeds_curve"].items():
        first = points[0]["runs_per_s"] if points else 1.0
        for p in points:
            print(
                f"{variant:<8}{p['seeds']:>9,}{p['chunk']:>7,}{p['n_chunks']:>5}"
                f"{p['compile_s']:>11.2f}{p['train_s']:>10.3f}{p['repeats']:>6}"
                f"{p['runs_per_s']:>11,.1f}{p['runs_per_s'] / first:>10,.1f}x"
                f"{p['cpu_util']:>8.2f}x{p['peak_rss_mb']:>13,.0f}"
            )
    w = results["width_curve"]
    rate = sg["device_gflops"] if m["device"] != "cpu" else sg["numpy_gflops"]
    print()
    print(f"runs/s vs hidden width ({w['variant']}, {w['seeds']:,} seeds)")
    print(
        f"{'width':>6}{'chunk':>7}{'compile s':>11}{'train s':>10}{'runs/s':>11}"
        f"{'MFLOP/run':>11}{'GFLOP/s':>10}{'% sgemm':>9}{'CPU use':>9}{'GF/CPU-s':>10}"
        f"{'peak RSS MB':>13}"
    )
    for p in w["points"]:
        print(
            f"{p['width']:>6}{p['chunk']:>7,}{p['compile_s']:>11.2f}{p['train_s']:>10.3f}"
            f"{p['runs_per_s']:>11,.1f}{p['flops_per_run'] / 1e6:>11.2f}{p['gflops']:>10.2f}"
            f"{100 * p['gflops'] / rate:>8.1f}%{p['cpu_util']:>8.2f}x"
            f"{p['gflops_per_cpu_s']:>10.2f}{p['peak_rss_mb']:>13,.0f}"
        )
    print()
    print("model.fit, fresh model per seed (build + compile + fit)")
    print(f"{'variant':<8}{'width':>6}{'runs':>6}{'runs/s':>10}")
    for f in results["fit"]:
        print(f"{f['variant']:<8}{f['width']:>6}{f['runs']:>6}{f['runs_per_s']:>10.3f}")


def ints(text: str) -> list[int]:
    return [int(s) for s in text.split(",") if s.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: small sizes")
    parser.add_argument("--max-seeds", type=int, default=None, help="cut the seeds curve")
    parser.add_argument("--seeds-variants", default="plain,bn")
    parser.add_argument("--widths", type=ints, default=None, help="e.g. 8,64,512")
    parser.add_argument("--width-seeds", type=int, default=None, help="default 10,000")
    parser.add_argument("--width-variant", default="plain")
    parser.add_argument("--fit-runs", type=int, default=None, help="default 3")
    parser.add_argument("--fit-widths", type=ints, default=None, help="default 8,512")
    parser.add_argument(
        "--max-chunk",
        type=int,
        default=DEFAULT_MAX_CHUNK,
        help="seeds per program call at most (default: the engine's, as `ablab run`)",
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="chunk calls at once (default: as ablab run)"
    )
    parser.add_argument("--probes", action="store_true", help="record probes (default off)")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "cost_curves.png")
    parser.add_argument(
        "--json", type=Path, default=ROOT / "bench" / "results" / "cost_curves.json"
    )
    args = parser.parse_args()

    seeds = list(QUICK_SEEDS if args.quick else SEEDS)
    if args.max_seeds is not None:
        seeds = [s for s in seeds if s <= args.max_seeds]
    widths = args.widths or list(QUICK_WIDTHS if args.quick else WIDTHS)
    width_seeds = args.width_seeds or (200 if args.quick else 10_000)
    fit_runs = args.fit_runs or (1 if args.quick else 3)
    fit_widths = args.fit_widths or [min(widths), max(widths)]
    variants = [v for v in args.seeds_variants.split(",") if v]

    study = ablab.load_study(STUDY)
    budget = study.engine.memory_budget_mb
    t_start = time.perf_counter()
    results: dict[str, Any] = {
        "machine": machine(),
        "study": str(STUDY.relative_to(ROOT)),
        "memory_budget_mb": budget,
        "max_chunk": args.max_chunk,
        "probes": args.probes,
        "quick": args.quick,
        "sgemm_start": sgemm_gflops(),
        "flops_formula": "epochs * (3 * F(n_train) + F(n_val)), F(r) = sum_dense 2*r*in*out",
    }

    curve: dict[str, list[dict[str, Any]]] = {}
    for variant in variants:
        program = build_program(study, variant, probes=args.probes)
        curve[variant] = []
        for n in seeds:
            point = engine_point(program, n, budget, args.max_chunk, args.workers)
            curve[variant].append(point)
            print(
                f"  seeds {variant} {n:,}: {point['runs_per_s']:,.1f} runs/s",
                file=sys.stderr,
                flush=True,
            )
    results["seeds_curve"] = curve

    wpoints: list[dict[str, Any]] = []
    for w in widths:
        wide = widened(study, args.width_variant, w)
        program = build_program(wide, args.width_variant, probes=args.probes)
        point = engine_point(program, width_seeds, budget, args.max_chunk, args.workers)
        point["width"] = w
        point["flops_per_run"] = flops_per_run(program)
        point["gflops"] = point["runs_per_s"] * point["flops_per_run"] / 1e9
        # per busy core: robust to others sharing the CPU (meaningful on a CPU device only)
        point["gflops_per_cpu_s"] = point["gflops"] / max(point["cpu_util"], 1e-9)
        wpoints.append(point)
        print(
            f"  width {w}: {point['runs_per_s']:,.1f} runs/s, {point['gflops']:.2f} GFLOP/s",
            file=sys.stderr,
            flush=True,
        )
    results["width_curve"] = {
        "variant": args.width_variant,
        "seeds": width_seeds,
        "points": wpoints,
    }

    fits: list[dict[str, Any]] = []
    fit_cases = [(v, 8) for v in variants]
    fit_cases += [
        (args.width_variant, w) for w in fit_widths if (args.width_variant, w) not in fit_cases
    ]
    for variant, w in fit_cases:
        rps = fresh_fit_runs_per_s(widened(study, variant, w), variant, fit_runs)
        fits.append({"variant": variant, "width": w, "runs": fit_runs, "runs_per_s": rps})
    results["fit"] = fits
    end = sgemm_gflops()
    results["sgemm_end"] = end
    results["sgemm"] = {  # the machine's rate: the better of the two (others may share it)
        k: max(results["sgemm_start"][k], end[k]) for k in ("numpy_gflops", "device_gflops", "n")
    }
    results["total_s"] = time.perf_counter() - t_start
    results["peak_rss_mb"] = peak_rss_mb()
    results["device_peak_mb"] = device_peak_mb()

    print_tables(results)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.plot)
    print(f"# wrote {args.json} and {args.plot}")

    def fit_of(variant: str, width: int) -> float | None:
        return next(
            (f["runs_per_s"] for f in fits if f["variant"] == variant and f["width"] == width),
            None,
        )

    summary: dict[str, Any] = {
        "device": results["machine"]["device"],
        "cores": results["machine"]["cores"],
        "seeds_runs_per_s": {
            v: {str(p["seeds"]): round(p["runs_per_s"], 1) for p in pts} for v, pts in curve.items()
        },
        "width_seeds": width_seeds,
        "width_runs_per_s": {str(p["width"]): round(p["runs_per_s"], 1) for p in wpoints},
        "width_gflops": {str(p["width"]): round(p["gflops"], 2) for p in wpoints},
        "sgemm_numpy_gflops": round(results["sgemm"]["numpy_gflops"], 1),
        "sgemm_device_gflops": round(results["sgemm"]["device_gflops"], 1),
        "fit_runs_per_s": {f"{f['variant']}@{f['width']}": round(f["runs_per_s"], 3) for f in fits},
        "peak_rss_mb": round(results["peak_rss_mb"], 1),
        "total_s": round(results["total_s"], 1),
    }
    top = curve.get("plain", [])
    base = fit_of("plain", 8)
    if top and base:
        summary["speedup_at_max_seeds"] = round(top[-1]["runs_per_s"] / base, 1)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
