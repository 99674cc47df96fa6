"""Calibration of the verdict rule on simulated studies (>= 2,000 replicates per setting).

Each replicate is one comparison of a variant with its baseline over ``n`` seeds, judged by
the rule ablab uses (``ablab.stats.rule``: the same vectorized code that decides ``ablab run`` and
``ablab compare`` and plans seeds), with the default margin (0.1 x the replicate's own
baseline SD) and alpha = 0.05, as a study with one comparison (Holm over its rank test and,
where divergence differs between the arms, its divergence test).

Metric model: the baseline's final metric over seeds ~ N(0, 1) (higher = better; the rule is
symmetric); the variant's is ``rho * baseline + sqrt(1 - rho^2) * noise + shift``, so ``rho``
is how strongly a seed's result carries over between the arms (0 = nothing shared; the
paired design's shared initial weights and data order make it high) and the paired
differences have SD ``sqrt(2 (1 - rho))``.

Settings and what they must show:
* A/A (shift 0) at n = 10, 30, 100, 1000 with rho = 0, plus ties (accuracy on 50 validation
  rows), divergence (10 % of seeds in each arm, independently) and rho = 0.9 at n = 30:
  helps + hurts <= alpha + 1 %.
* power: n = 30, a 0.5-SD paired shift (differences N(0.5, 1)): P(helps).
* equivalence: rho = 0.995 (differences SD 0.1, about the margin), n = 30 and 100, a true
  difference of 0 (P(equivalent) should be high), of exactly the margin and of 2 x the margin
  (P(equivalent) must stay <= alpha, up to Monte Carlo error: the margin is estimated from
  the replicate's own baseline, and the TOST carries that uncertainty).
* power with divergence: a 0.5-SD paired shift when 10 % of seeds diverge in each arm.

The last line printed is JSON: {"alpha", "replicates", "settings": [{"name", "n", "rho",
"shift", "helps", "hurts", "equivalent", "inconclusive", "false_verdicts", "ok"}], "all_ok",
"seconds"}. Usage: python bench/calibration.py [--replicates 2000] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ablab.stats.rule import EQUIVALENT, HELPS, HURTS, INCONCLUSIVE, judge_alone, paired_evidence

ALPHA = 0.05
MARGIN_SD = 0.1


@dataclass
class Setting:
    name: str
    n: int
    rho: float = 0.0
    shift: float = 0.0
    """The variant's true improvement, in baseline SDs (or as ``shift_in_margins``)."""
    shift_in_margins: float | None = None
    transform: Callable[[np.ndarray, np.random.Generator], np.ndarray] | None = None
    check: str = "aa"
    """"aa": helps + hurts <= alpha + 1 %; "power": P(helps); "eq0/1/2": P(equivalent)."""


def _accuracy(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Accuracy on 50 validation rows: a few distinct values, many ties between arms."""
    p = np.clip(0.8 + 0.05 * x, 0.0, 1.0)
    return rng.binomial(50, p) / 50.0


def _diverge(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.where(rng.random(x.shape) < 0.1, -np.inf, x)


def simulate(s: Setting, reps: int, rng: np.random.Generator) -> dict[str, float]:
    base = rng.normal(0.0, 1.0, (reps, s.n))
    noise = rng.normal(0.0, 1.0, (reps, s.n))
    sd_diff = np.sqrt(2.0 * (1.0 - s.rho))
    var = s.rho * base + np.sqrt(1.0 - s.rho**2) * noise
    if s.transform is not None:
        base, var = s.transform(base, rng), s.transform(var, rng)
    finite_b = np.where(np.isfinite(base), base, np.nan)
    sd_b = np.nanstd(finite_b, axis=1, ddof=1)
    margin = MARGIN_SD * sd_b
    margin_se = margin / np.sqrt(2.0 * (np.isfinite(base).sum(axis=1) - 1))  # as ablab sets it
    if s.shift_in_margins is not None:
        var = var + s.shift_in_margins * MARGIN_SD  # true margin: 0.1 x the true SD (1)
    else:
        var = var + s.shift * (sd_diff if s.check == "power" else 1.0)
    with np.errstate(invalid="ignore"):
        gain = var - base  # -inf - -inf = NaN: both diverged
    ev = paired_evidence(gain, margin, margin_se)
    verdict, _ = judge_alone(ev, ALPHA)
    rates = {
        name: float(np.mean(verdict == code))
        for name, code in (
            ("helps", HELPS),
            ("hurts", HURTS),
            ("equivalent", EQUIVALENT),
            ("inconclusive", INCONCLUSIVE),
        )
    }
    rates["false_verdicts"] = rates["helps"] + rates["hurts"]
    return rates


def settings() -> list[Setting]:
    out = [Setting(f"A/A n={n}", n) for n in (10, 30, 100, 1000)]
    out += [
        Setting("A/A n=30, rho 0.9 (strongly paired)", 30, rho=0.9),
        Setting("A/A n=30, accuracy on 50 rows (ties)", 30, transform=_accuracy),
        Setting("A/A n=100, accuracy on 50 rows (ties)", 100, transform=_accuracy),
        Setting("A/A n=30, 10 % divergence per arm", 30, transform=_diverge),
        Setting("A/A n=100, 10 % divergence per arm", 100, transform=_diverge),
        Setting("power n=30, 0.5-SD paired shift", 30, rho=0.5, shift=0.5, check="power"),
        Setting("equivalence n=30, true diff 0", 30, rho=0.995, check="eq0"),
        Setting("equivalence n=100, true diff 0", 100, rho=0.995, check="eq0"),
        Setting(
            "equivalence n=30, true diff = margin", 30, rho=0.995, shift_in_margins=1.0, check="eq1"
        ),
        Setting(
            "equivalence n=100, true diff = margin",
            100,
            rho=0.995,
            shift_in_margins=1.0,
            check="eq1",
        ),
        Setting(
            "equivalence n=30, true diff 2x margin",
            30,
            rho=0.995,
            shift_in_margins=2.0,
            check="eq2",
        ),
        Setting(
            "equivalence n=100, true diff 2x margin",
            100,
            rho=0.995,
            shift_in_margins=2.0,
            check="eq2",
        ),
        Setting(
            "0.5-SD better, 10 % divergence per arm, n=100",
            100,
            rho=0.5,
            shift=0.5,
            transform=_diverge,
            check="power",
        ),
    ]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicates", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    rows = []
    print(f"{'setting':46s} {'helps':>7s} {'hurts':>7s} {'equiv':>7s} {'inconc':>7s}  check")
    for s in settings():
        r = simulate(s, args.replicates, rng)
        if s.check == "aa":
            ok = r["false_verdicts"] <= ALPHA + 0.01
            note = f"helps+hurts {r['false_verdicts']:.3f} <= {ALPHA + 0.01:.2f}"
        elif s.check in ("eq1", "eq2"):
            # at the margin the TOST's null is true: equivalent at most alpha (+ MC error)
            bound = ALPHA + 3 * np.sqrt(ALPHA * (1 - ALPHA) / args.replicates)
            ok = bool(r["equivalent"] <= bound)
            note = f"equivalent {r['equivalent']:.3f} <= {bound:.3f}"
        else:
            ok = True
            note = "power" if s.check == "power" else "rate of equivalent"
        print(
            f"{s.name:46s} {r['helps']:7.3f} {r['hurts']:7.3f} {r['equivalent']:7.3f} "
            f"{r['inconclusive']:7.3f}  {note}{'' if ok else '  FAILED'}"
        )
        rows.append(
            {
                "name": s.name,
                "n": s.n,
                "rho": s.rho,
                "shift": s.shift,
                "shift_in_margins": s.shift_in_margins,
                **r,
                "ok": ok,
            }
        )
    doc = {
        "alpha": ALPHA,
        "replicates": args.replicates,
        "settings": rows,
        "all_ok": all(r["ok"] for r in rows),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(doc))


if __name__ == "__main__":
    main()
